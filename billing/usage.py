"""Metered services: usage debited at the tenant's unit prices (seed 002).

``Tenant.meters`` maps a meter name to its unit price (a decimal string). One usage event
debits ``quantity x unit price`` (rounded half up to the micro) through
``Store.adjust(kind="usage", op_id="usage:<account>:<event id>")``: the event id is remembered for
32 days, so a replayed event never debits twice, and the account floor is enforced
(a debit that would cross it is refused and changes nothing).
"""

from __future__ import annotations

import re

from billing.context import BillingContext
from billing.schemas import Usage, UsageResult
from engine.core import money
from engine.core.billing_errors import (
    AccountClosed,
    BillingError,
    InsufficientFunds,
    InvalidRequest,
    UnknownAccount,
)
from engine.core.untrusted import ascii_micros
from engine.store.store import USAGE_TTL_S

MAX_BATCH = 1_000
_EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # fullmatch: "$" took "e1\n"


def _quantity_micros(q: int | str) -> int:
    """Quantity in millionths of a unit: ints or decimal strings, positive, bounded."""
    if isinstance(q, bool):
        raise InvalidRequest("quantity: a positive number of units", code="invalid_quantity")
    if isinstance(q, int):
        if not 0 < q <= 1_000_000_000:
            raise InvalidRequest("quantity: 1 to 1000000000", code="invalid_quantity")
        return q * 1_000_000
    # ASCII digits only: full-width or Arabic-Indic "11" was billed as 11, and "11\n"
    # passed the pattern's "$"
    micros = ascii_micros(q, max_whole_digits=9) if isinstance(q, str) else None
    if micros is None:
        raise InvalidRequest(f"quantity: {q!r} is not a positive decimal of ASCII digits "
                             "(at most 6 decimals)", code="invalid_quantity")
    if micros <= 0:
        raise InvalidRequest("quantity: must be more than zero", code="invalid_quantity")
    return micros


def price(ctx: BillingContext, tenant: str, meter: str, quantity: int | str) -> tuple[int, int]:
    """(unit price, cost) in micros, or InvalidRequest for an unknown meter / quantity."""
    prices = ctx.tenant(tenant).meters
    if meter not in prices:
        raise InvalidRequest(f"unknown meter {meter!r}; known: {', '.join(sorted(prices))}",
                             code="unknown_meter")
    unit = money.parse(prices[meter], field=f"meters.{meter}")
    cost = (unit * _quantity_micros(quantity) + 500_000) // 1_000_000
    if cost > money.MAX_ABS_MICROS:
        raise InvalidRequest("quantity: the cost is out of range", code="invalid_quantity")
    return unit, cost


def _check(ctx: BillingContext, tenant: str, u: Usage) -> tuple[int, int]:
    if not isinstance(u.event_id, str) or not _EVENT_ID.fullmatch(u.event_id):
        raise InvalidRequest("event_id: 1-128 characters of A-Z a-z 0-9 _ . : -",
                             code="invalid_event_id")
    ctx.settings(tenant, u.account)
    return price(ctx, tenant, u.meter, u.quantity)


async def _debit(ctx: BillingContext, tenant: str, u: Usage, unit: int,
                 cost: int) -> UsageResult:
    res = await ctx.store.adjust(
        tenant, u.account, -cost, "usage", op_id=f"usage:{u.account}:{u.event_id}",
        ttl_s=USAGE_TTL_S,
        enforce_floor=True,
        extra={"meter": u.meter, "quantity": str(u.quantity), "unit_price": money.format(unit),
               "process": u.meter, "user": u.user},
    )
    if not res.ok:
        err: BillingError
        if res.error == "below_floor":
            err = InsufficientFunds(f"account {u.account}: the balance cannot cover "
                                    f"${money.format(cost)}")
        elif res.error == "closed":
            err = AccountClosed(f"account {u.account} is closed")
        else:
            err = UnknownAccount(f"unknown account {u.account}")
        raise err
    return UsageResult(event_id=u.event_id, ok=True, cost=money.format(cost),
                       balance=money.format(int(res.balance)), replay=res.replay)


async def record_usage(
        ctx: BillingContext, tenant: str, account: str, meter: str, quantity: int | str,
        event_id: str, *, user: str = "") -> UsageResult:
    """Debit one usage event; raises InvalidRequest / InsufficientFunds / AccountClosed."""
    u = Usage(account=account, meter=meter, quantity=quantity, event_id=event_id, user=user)
    unit, cost = _check(ctx, tenant, u)
    return await _debit(ctx, tenant, u, unit, cost)


async def record_batch(ctx: BillingContext, tenant: str, items: list[Usage]) -> list[UsageResult]:
    """Validate every item first (one bad item refuses the batch, nothing moved), then
    debit each; per-item results say which debits the floor refused."""
    if not items or len(items) > MAX_BATCH:
        raise InvalidRequest(f"a batch holds 1 to {MAX_BATCH} usage events",
                             code="invalid_batch")
    # idempotency is per (account, event_id) (op id usage:<account>:<event>), so the same
    # event id on two accounts is two events; on one account twice it is a mistake
    if len({(u.account, u.event_id) for u in items}) != len(items):
        raise InvalidRequest("event_id: duplicated for one account inside the batch",
                             code="invalid_batch")
    priced = []
    for i, u in enumerate(items):
        try:
            priced.append((u, *_check(ctx, tenant, u)))
        except BillingError as exc:
            raise type(exc)(f"items[{i}]: {exc}", code=exc.code) from None
    out = []
    for u, unit, cost in priced:
        try:
            out.append(await _debit(ctx, tenant, u, unit, cost))
        except (InsufficientFunds, AccountClosed, UnknownAccount) as exc:
            out.append(UsageResult(event_id=u.event_id, ok=False, error=exc.code,
                                   message=str(exc)))
    return out

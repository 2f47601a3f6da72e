"""Manual funding by card and refund of the unused balance.

Rules (seeds 000 and 001): funding is at least $100.00; a tenant may pass its card fee on
to the payer, 0-15% (``Fees.card_fee_percent``): funding $100.00 at 3% charges $103.00 and
credits $100.00, and the ledger entry carries ``gross`` and ``card_fee``. The primary card
is tried first, then each activated backup. The credit is ``Store.adjust(kind="funding",
op_id=<PaymentIntent id>)``. The caller's idempotency key names the attempt: a retried
request resumes it and never charges twice.

A refund of the unused balance walks the account's latest card charges, refunds them
through Stripe up to the balance (the pass-through fee is not refunded: Stripe keeps its
own fee on refunds too), writes one ``refund`` ledger entry per Stripe refund and leaves
the account closed at zero. Its last ledger step emits one ``refund_processed`` event
(``amount``: what the call refunded by card, refunds of a crashed earlier call that it
booked included; ``balance`` after it).
"""

from __future__ import annotations

import re
from typing import Any

from billing.attempts import AccountLock, CardTry, ChargeAttempt, require_account
from billing.context import BillingContext
from billing.policy import CENT, MAX_FEE_BP, MIN_FUNDING, check_card_amount
from engine.core import keys, money
from engine.core.billing_errors import (
    AccountClosed,
    BillingError,
    InvalidRequest,
    PaymentsFailed,
)
from engine.store.store import Store, now_ms

_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # fullmatch: "$" took "k\n"


def check_idempotency_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidRequest("idempotency key: 1-128 characters of A-Z a-z 0-9 _ . : -",
                             code="invalid_idempotency_key")


def fee_basis_points(ctx: BillingContext, tenant: str) -> int:
    raw = ctx.tenant(tenant).fees.card_fee_percent
    bp = money.parse_percent(raw, field="fees.card_fee_percent")
    if bp > MAX_FEE_BP:
        raise BillingError(f"tenant {tenant}: card_fee_percent {raw} is over 15%",
                           code="invalid_config")
    return bp


def card_fee(amount: int, basis_points: int) -> int:
    """The pass-through fee on ``amount`` micros, rounded half up to whole cents."""
    cents = (amount // CENT * basis_points + 5_000) // 10_000
    return cents * CENT


async def open_account(store: Store, tenant: str, account: str) -> None:
    await require_account(store, tenant, account)
    state = await store.account(tenant, account)
    if state is not None and state.closed:
        raise AccountClosed(f"account {account} is closed")


async def fund(
    ctx: BillingContext, tenant: str, account: str, amount: int, idempotency_key: str,
    *, user: str = "",
) -> ChargeAttempt:
    """Charge the account's cards for ``amount`` micros (+ fee) and credit ``amount``.

    Returns the credited attempt; raises InvalidRequest (nothing moved), NoPaymentMethod,
    Busy, PaymentsFailed (every card failed) or PaymentTransient (retry with the same key).
    """
    check_idempotency_key(idempotency_key)
    check_card_amount(amount, minimum=MIN_FUNDING)
    ctx.settings(tenant, account)
    fee = card_fee(amount, fee_basis_points(ctx, tenant))
    attempt_id = f"fund:{account}:{idempotency_key}"
    prior = await ctx.charger.load(tenant, attempt_id)
    if prior is not None and (prior.amount != amount or prior.account != account):
        raise InvalidRequest("idempotency key already used for a different funding",
                             code="idempotency_conflict")
    async with ctx.charger.lock(tenant, account) as lock:
        if prior is None:
            await open_account(ctx.store, tenant, account)
            customer, cards = await ctx.methods.require(tenant, account)
            prior, _ = await ctx.charger.create(ChargeAttempt(
                id=attempt_id, tenant=tenant, account=account, purpose="funding",
                amount=amount, fee=fee, customer=customer,
                cards=[CardTry(pm=c.id) for c in cards],
                extra={"process": "manual_funding", "user": user},
            ))
        done = await ctx.charger.run(prior, lock=lock)
    if done.state != "credited":
        codes = ", ".join(f"{c.pm}: {c.code or c.state}" for c in done.cards)
        raise PaymentsFailed(f"funding failed: {done.error or done.state} ({codes})",
                             attempt=done.id,
                             needs_customer=done.state == "needs_customer")
    return done


async def refund_balance(
    ctx: BillingContext, tenant: str, account: str, *, user: str = ""
) -> list[str]:
    """Refund the unused balance to the cards it came from and close the account.

    Returns the ledger entry ids written. Refused (nothing moved) when the balance is
    negative or larger than what the account's charges can still refund. The check and
    the close are one step in Redis (balance_close.lua): a credit landing before it is
    counted (and refused when the charges cannot cover it), one landing after it is a
    credit to the closed account, not part of this refund. Manual credits take no lock.
    """
    ctx.settings(tenant, account)
    async with ctx.charger.lock(tenant, account) as lock:
        state = await ctx.store.account(tenant, account)  # refusals before any Stripe call
        if state is None or state.balance < 0:
            raise _close_refused("unknown_account" if state is None else "negative_balance",
                                 account)
        customer = await ctx.methods.customer(tenant, account)
        recovered = 0
        if customer:
            recovered = await _recover_refunds(ctx, tenant, account, customer, user)
        plan = await _refundable(ctx, customer) if customer else []
        await _step(ctx, "before_close", account)
        # closed first: no new debit can slip in while money flows back
        balance = await _close(ctx, tenant, account, sum(c for _, c in plan) * CENT)
        takes = _takes(plan, balance)
        rest = balance % CENT  # a sub-cent usage remainder: written off, the account ends at 0
        refunded = recovered + sum(t for _, t in takes) * CENT
        # the event rides on the call's last ledger step (written with it, or not at all)
        notice = {"type": "refund_processed", "amount": str(refunded)} if refunded else None
        entries = await _refund_charges(ctx, lock, tenant, account, takes, balance, user,
                                        notice=None if rest else notice)
        if rest:
            entries.append(await _write_off(ctx, tenant, account, rest, user, notice=notice))
        elif notice is not None and not takes:
            # only refunds a crashed call made, booked above: no step left to carry it
            await _emit(ctx, tenant, account, notice)
        return entries


async def _step(ctx: BillingContext, name: str, account: str) -> None:
    if ctx.refund_hook is not None:
        await ctx.refund_hook(name, account)


_CLOSE_REFUSED = {
    "unknown_account": "unknown account {account}",
    "negative_balance": "the balance is negative: nothing to refund",
    "refund_exceeds_charges": "the balance ${balance} is more than the card charges can "
                              "refund; contact support",
}


async def _close(ctx: BillingContext, tenant: str, account: str, covered: int) -> int:
    """Close the account if ``covered`` micros of card charges cover its balance, in one
    Lua step; returns the balance at the close (what the refund returns)."""
    raw = await ctx.store.lua.balance_close(ctx.store.redis, [keys.tenant_prefix(tenant)],
                                            [account, covered, CENT])
    status, balance = (x.decode() if isinstance(x, bytes) else str(x) for x in raw)
    if status != "ok":
        raise _close_refused(status, account, int(balance))
    return int(balance)


def _close_refused(code: str, account: str, balance: int = 0) -> InvalidRequest:
    """A refund-balance refused (nothing moved), before Stripe or by balance_close.lua."""
    text = _CLOSE_REFUSED[code].format(account=account, balance=money.format(balance))
    return InvalidRequest(text, code=code)


def _takes(plan: list[tuple[str, int]], balance: int) -> list[tuple[str, int]]:
    """(PaymentIntent, cents) to refund: the whole cents of ``balance`` over ``plan``
    (newest charge first), each at most the charge's refundable cents."""
    left_cents = balance // CENT
    takes: list[tuple[str, int]] = []
    for pi, cents in plan:
        if left_cents <= 0:
            break
        take = min(cents, left_cents)
        takes.append((pi, take))
        left_cents -= take
    return takes


async def _refund_charges(ctx: BillingContext, lock: AccountLock, tenant: str, account: str,
                          takes: list[tuple[str, int]], balance: int, user: str, *,
                          notice: dict[str, str] | None = None) -> list[str]:
    """The Stripe refunds of ``takes``, each booked with its ledger entry; the last
    booking emits ``notice``."""
    entries: list[str] = []
    for n, (pi, take) in enumerate(takes):
        await _step(ctx, "before_refund", account)
        await lock.check()  # a holder that lost the lock refunds nothing more
        refund_id = await ctx.gateway.refund(
            payment_intent=pi, amount_cents=take,
            idempotency_key=f"{tenant}:refund:{account}:{pi}:{balance}:{n}",
            metadata={"tenant": tenant, "account": account, "process": _PROCESS},
        )
        last = n == len(takes) - 1
        entries.append(await _book_refund(ctx, tenant, account, pi, refund_id, take, user,
                                          notice=notice if last else None))
    return entries


async def _write_off(ctx: BillingContext, tenant: str, account: str, rest: int,
                     user: str, *, notice: dict[str, str] | None = None) -> str:
    """The sub-cent rest of the refunded balance (cards refund whole cents). Exactly the
    rest at the close: a credit landing later stays on the closed account."""
    res = await ctx.store.adjust(
        tenant, account, -rest, "adjustment", enforce_floor=False,
        op_id=f"refund-rest:{account}:{rest}",
        extra={"process": "balance_refund", "reason": "sub-cent remainder", "user": user},
        event=notice)
    return res.entry


async def _emit(ctx: BillingContext, tenant: str, account: str, event: dict[str, str]) -> None:
    """An event with no balance change to carry it, as recharge outcomes are published."""
    state = await ctx.store.account(tenant, account)
    entry: dict[Any, Any] = {**event, "account": account,
                             "balance": state.balance if state else 0, "ts": now_ms()}
    await ctx.store.redis.xadd(keys.events(tenant), entry, maxlen=1_000_000, approximate=True)
    if ctx.store.events_observer is not None:
        ctx.store.events_observer([event["type"], 1])


_PROCESS = "balance_refund"
# A balance refund's booking is remembered (op id) as long as Stripe lists the refund, since
# a later refund-balance call re-reads every refund Stripe made to book the ones a crashed
# run missed: with the default 40 days, a call after that booked them all a second time.
# (A few per closed account: cheap to keep.)
REFUND_OP_TTL_S = 10 * 365 * 86_400


async def _book_refund(ctx: BillingContext, tenant: str, account: str, pi: str,
                       refund_id: str, cents: int, user: str, *,
                       notice: dict[str, str] | None = None) -> str:
    """The ledger entry of one Stripe refund, idempotent on the refund id."""
    res = await ctx.store.adjust(
        tenant, account, -cents * CENT, "refund", op_id=f"refund:{refund_id}",
        ttl_s=REFUND_OP_TTL_S, enforce_floor=False,
        extra={"payment_intent": pi, "stripe_refund": refund_id, "process": _PROCESS,
               "user": user},
        event=notice,
    )
    return res.entry


async def _recover_refunds(ctx: BillingContext, tenant: str, account: str, customer: str,
                           user: str) -> int:
    """Book the balance refunds Stripe made but the ledger never saw (a run that died
    between the refund and its entry). Without this, a second run would refund the same
    balance again from the remaining charges. Returns the micros booked now."""
    booked = 0
    for ch in await ctx.gateway.list_charges(customer):
        if ch.amount_refunded <= 0 or not ch.payment_intent:
            continue
        for refund_id, cents, meta in await ctx.gateway.list_refunds(ch.payment_intent):
            if meta.get("process") != _PROCESS or meta.get("account") != account:
                continue
            res = await ctx.store.adjust(
                tenant, account, -cents * CENT, "refund", op_id=f"refund:{refund_id}",
                ttl_s=REFUND_OP_TTL_S, enforce_floor=False,
                extra={"payment_intent": ch.payment_intent, "stripe_refund": refund_id,
                       "process": _PROCESS, "user": user, "recovered": "1"},
            )
            booked += 0 if res.replay else cents * CENT
    return booked


async def _refundable(ctx: BillingContext, customer: str) -> list[tuple[str, int]]:
    """(PaymentIntent, refundable cents) of the customer's paid charges, newest first."""
    out = []
    for ch in await ctx.gateway.list_charges(customer):
        if not ch.paid or not ch.payment_intent:
            continue
        intent = await ctx.gateway.retrieve_intent(ch.payment_intent)
        credit = int(intent.metadata.get("credit_cents", ch.amount))
        fee = ch.amount - credit
        cents = ch.amount - fee - max(ch.amount_refunded, 0)
        if cents > 0:
            out.append((ch.payment_intent, cents))
    return out

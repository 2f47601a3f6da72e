"""The tenant API for accounts and buyers (bearer token per tenant, or a buyer API key for
its mapped accounts: engine.api.auth).

A tenant only ever sees its own accounts: the token selects the tenant, and every key
read or written is under that tenant's prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from billing.archive import Archive, history, parse_cursor
from engine.api import toolkit
from engine.api.auth import ACCOUNT, Guard, TenantHandler, scope_accounts
from engine.api.billing import decode_body
from engine.api.endpoints import BY_KEY
from engine.api.schemas import (
    AccountView,
    BuyerAccount,
    BuyerState,
    CreditBody,
    CreditResult,
    LedgerEntry,
    LedgerPage,
    ReturnBody,
    ReturnResult,
    Thresholds,
)
from engine.api.toolkit import Request, Response
from engine.core import keys, money
from engine.core.billing_errors import BillingError, InvalidRequest, MoneyError
from engine.core.constants import WALLET
from engine.core.untrusted import ascii_int
from engine.obs import telemetry
from engine.routing.runtime import Runtime
from engine.store.store import AccountState, Store, now_ms

ScriptObserver = Callable[[str, float, Any], None]  # (script, seconds, [event, count, ...])
MAX_PAGE = 1_000  # ledger page size, as GET /transactions: above it is 400 invalid_limit


RETURN_WINDOW_MS = 5 * 86_400_000  # returns within 5 days of the sale (shared/seeds)
RETURN_REASONS = frozenset({  # the approved reasons our users know
    "disconnected_phone", "wrong_number", "outside_us_canada", "third_party_submission",
})


class PauseResult(msgspec.Struct):
    changed: bool
    events: list[str | int] | dict[str, int] = []


_pause_result = msgspec.json.Decoder(PauseResult)
_credit = msgspec.json.Decoder(CreditBody)
_return = msgspec.json.Decoder(ReturnBody)


def account_status(a: AccountState) -> Literal["active", "paused", "closed"]:
    return "closed" if a.closed else ("paused" if a.paused else "active")


def account_view(a: AccountState) -> AccountView:
    return AccountView(
        id=a.id,
        balance=money.format(a.balance),
        floor=money.format(a.floor),
        status=account_status(a),
        paused_reason=a.paused or None,
        billing=a.mode,
        thresholds=Thresholds(
            alert=money.format(a.alert),
            auto_recharge=money.format(a.recharge_threshold) if a.auto_recharge else None,
            min_balance=None if a.min_balance is None else money.format(a.min_balance),
        ),
        held=money.format(a.held),
        available=money.format(a.available),
    )


class AccountsApi:
    def __init__(self, runtime: Callable[[], Runtime], store: Store,
                 archive: Callable[[], Archive | None] = lambda: None,
                 observer: ScriptObserver = telemetry.script_observer,
                 guard: Guard | None = None) -> None:
        self.runtime, self.store, self.observer = runtime, store, observer
        self.archive = archive  # the SQL ledger archive, once the service has opened it
        # the tenant's token, or a buyer key for its mapped accounts (engine.api.auth)
        self.guard = guard or Guard(runtime, lambda: None)

    def mount(self, router: toolkit.Router) -> None:
        def add(method: str, path: str, handler: TenantHandler) -> None:
            router.add(method, path, self.guard.route(BY_KEY[(method, path)], handler))

        add("GET", "/v1/accounts/{id}", self.get_account)
        add("GET", "/v1/accounts/{id}/ledger", self.ledger)
        add("POST", "/v1/accounts/{id}/credits", self.credit)
        add("POST", "/v1/buyers/{id}/pause", self.pause)
        add("POST", "/v1/buyers/{id}/resume", self.resume)
        add("POST", "/v1/leads/{id}/returns", self.return_lead)

    async def _account(self, tenant: str, account: str) -> AccountState | None:
        if not self.runtime().account_exists(tenant, account):
            return None
        return await self.store.account(tenant, account)

    async def get_account(self, req: Request, tenant: str) -> Response:
        a = await self._account(tenant, req.params["id"])
        if a is None:
            return toolkit.error_response(404, "unknown_account", "no such account")
        return toolkit.json_response(account_view(a))

    async def ledger(self, req: Request, tenant: str) -> Response:
        account = req.params["id"]
        if await self._account(tenant, account) is None:
            return toolkit.error_response(404, "unknown_account", "no such account")
        q = req.query
        # ASCII digits only: int() took " 5", "+5", "1_0" and the digits of every script
        limit = ascii_int(q.get("limit", "100"), max_digits=18)
        if limit is None or not 1 <= limit <= MAX_PAGE:
            return toolkit.error_response(400, "invalid_limit",
                                       f"limit must be an integer from 1 to {MAX_PAGE}")
        before = q.get("before", "+")
        if before != "+" and not _is_stream_id(before):
            return toolkit.error_response(400, "invalid_cursor", "before must be an entry id")
        if before != "+" and "-" not in before:
            # a bare "ms": entries before that millisecond, in both halves of the page (Redis
            # reads "(ms" as the end of that millisecond, the archive as its start)
            before += "-0"
        if before.strip("0-") == "":  # "0", "0-0": nothing comes before it
            return toolkit.json_response(LedgerPage([], None))
        page = await history(self.store, self.archive(), tenant, account, limit=limit,
                             before=before)
        entries = [_entry_view(i, f) for i, f in page.entries]
        return toolkit.json_response(LedgerPage(entries, page.next_before))

    async def credit(self, req: Request, tenant: str) -> Response:
        """A manual credit: the tenant received a payment outside leadflow ("manual" billing)."""
        account = req.params["id"]
        try:  # the billing endpoints' decoding: JSON only (400 unsupported_media_type)
            body: CreditBody = decode_body(req, _credit)
        except BillingError as exc:
            return toolkit.error_response(exc.status, exc.code, str(exc))
        try:
            amount = money.parse(body.amount)
        except MoneyError as exc:
            return toolkit.error_response(400, "invalid_body", str(exc))
        if amount <= 0:
            return toolkit.error_response(400, "invalid_amount", "amount must be positive")
        if account == WALLET:
            # the platform-fee wallet is what the tenant owes the platform: its own token
            # crediting it would be free money against the fees. It is funded by card
            # (POST /v1/accounts/wallet/funds) or by the platform's operator
            return toolkit.error_response(
                403, "wallet_not_creditable",
                "the platform wallet takes no manual credit from the tenant: fund it by card "
                "(POST /v1/accounts/wallet/funds)")
        key = req.header(b"idempotency-key")
        if not key or len(key) > 255:  # a retry must never credit twice
            return toolkit.error_response(400, "missing_idempotency_key",
                                       "an Idempotency-Key header (1-255 characters) is required")
        if await self._account(tenant, account) is None:
            return toolkit.error_response(404, "unknown_account", "no such account")
        res = await self.store.adjust(
            tenant,
            account,
            amount,
            "funding",
            op_id=f"credit:{account}:{key}",
            extra={"process": "manual", "note": body.note[:200], "reference": body.reference[:100]},
            refuse_closed=True,  # checked in the script that credits: a racing close wins
        )
        if not res.ok:
            return _credit_refused(account, res.error)
        if res.replay and res.delta and int(res.delta) != amount:  # as POST /funds
            return toolkit.error_response(
                400, "idempotency_conflict",
                f"Idempotency-Key already used for a credit of {money.format(int(res.delta))}")
        return toolkit.json_response(
            CreditResult(money.format(int(res.balance)), res.entry, res.replay),
            200 if res.replay else 201,
        )

    async def _set_buyer_pause(self, req: Request, tenant: str, paused: bool) -> Response:
        """The manual pause flag of one buyer, with its event (buyer_paused, reason
        ``manual``, once per pause; buyer_resumed once per resume) and metric."""
        buyer = req.params["id"]
        rt = self.runtime()
        client = rt.buyer_client.get((tenant, buyer))
        scope = scope_accounts(req)  # a buyer key: checked by the guard, again on this config
        if client is None or (scope is not None and client not in scope):
            return toolkit.error_response(404, "unknown_buyer", "no such buyer")
        if not paused and _paused_by_config(rt, tenant, buyer):
            # routing skips it before any flag is read: "active" here would be a lie
            return toolkit.error_response(
                409, "paused_by_config",
                f'buyer {buyer} is paused by the config (status = "paused"): set status = '
                '"active" and reload the config; nothing changed')
        started = time.perf_counter()
        raw = await self.store.lua.buyer_pause(self.store.redis, [keys.tenant_prefix(tenant)],
                                              [buyer, client, "1" if paused else "0", now_ms()])
        res = _pause_result.decode(raw)
        self.observer("buyer_pause", time.perf_counter() - started, res.events)
        # the buyer's own flag, and the account that pays for its leads: a buyer resumed
        # while its account is paused (at its floor, under its minimum) or closed still
        # gets no lead, and "active" alone would say it does
        acct = await self.store.account(tenant, client)
        account = BuyerAccount(client, "missing" if acct is None else account_status(acct))
        if acct is not None and account.status == "paused":
            account.paused_reason = acct.paused
        return toolkit.json_response(BuyerState(buyer, "paused" if paused else "active", account))

    async def pause(self, req: Request, tenant: str) -> Response:
        return await self._set_buyer_pause(req, tenant, True)

    async def resume(self, req: Request, tenant: str) -> Response:
        return await self._set_buyer_pause(req, tenant, False)

    async def return_lead(self, req: Request, tenant: str) -> Response:
        return await _return_lead(self.store, self.runtime(), req, tenant)


def _paused_by_config(rt: Runtime, tenant: str, buyer: str) -> bool:
    return any(b.tenant == tenant and b.id == buyer and b.status == "paused"
               for b in rt.cfg.buyers)


def _credit_refused(account: str, error: str) -> Response:
    """A credit the script refused (nothing moved), in the codes of the billing API."""
    if error == "closed":  # as POST /funds
        return toolkit.error_response(409, "account_closed",
                                   f"account {account} is closed (its balance was refunded)")
    if error == "unknown_account":
        return toolkit.error_response(404, "unknown_account", "no such account")
    if error == "balance_limit":
        return toolkit.error_response(409, error, "credit refused: the balance would pass "
                                   "+-$1,000,000,000")
    return toolkit.error_response(409, error, "credit refused")


async def _return_lead(store: Store, rt: Runtime, req: Request, tenant: str) -> Response:
    """A buyer returns a bad lead: refunded (kind ``return``) within 5 days, for an approved
    reason only; idempotent (a second return of the same sale changes nothing). With a
    buyer key, only a sale to a buyer of its mapped accounts: any other is no sale (404)."""
    lead_id = req.params["id"]
    try:  # the billing endpoints' decoding: JSON only (400 unsupported_media_type)
        body: ReturnBody = decode_body(req, _return)
    except BillingError as exc:
        return toolkit.error_response(exc.status, exc.code, str(exc))
    if body.reason not in RETURN_REASONS:
        return toolkit.error_response(422, "reason_not_accepted",
                                   f"returns are accepted for: {', '.join(sorted(RETURN_REASONS))}")
    scope = scope_accounts(req)
    user = ""
    if scope is not None:  # a buyer key: its own buyers' sales only, checked before any read
        client = rt.buyer_client.get((tenant, body.buyer))
        if client is None or client not in scope:
            return toolkit.error_response(404, "unknown_sale", "no such sale")
        # and the account the sale charged (the buyer may have changed clients since): the
        # refund credits that account, which must be the key's too
        if await _sale_account(store, tenant, lead_id, body.buyer) not in scope:
            return toolkit.error_response(404, "unknown_sale", "no such sale")
        req.scope[ACCOUNT] = client
        user = str(req.scope.get("leadflow.user", ""))
    sold_ms = _lead_time_ms(lead_id)
    if sold_ms is None or not await store.redis.hexists(keys.lead(tenant, lead_id), body.buyer):
        return toolkit.error_response(404, "unknown_sale", "no such sale")
    if now_ms() - sold_ms > RETURN_WINDOW_MS:
        return toolkit.error_response(409, "return_window_closed",
                                   "returns close 5 days after the sale")
    res = await store.refund_sale(tenant, lead_id, body.buyer, f"return: {body.reason}",
                                  kind="return", user=user)
    if not res.ok:
        return toolkit.error_response(404, res.error, "no such sale")
    return toolkit.json_response(ReturnResult(lead_id, body.buyer, res.state,
                                           money.format(int(res.price)), res.replay))


class _Sale(msgspec.Struct):
    a: str = ""  # the account the sale charged


_sale = msgspec.json.Decoder(_Sale)


async def _sale_account(store: Store, tenant: str, lead_id: str, buyer: str) -> str | None:
    """The account a sale of the lead to the buyer charged (decide.lua's sale record), or
    None when there is no such sale (or its record is unreadable)."""
    raw = await store.redis.hget(keys.lead(tenant, lead_id), buyer)
    if raw is None:
        return None
    try:
        return _sale.decode(raw).a or None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _lead_time_ms(lead_id: str) -> int | None:
    """Lead ids start with 12 hex digits of the epoch ms they were decided at."""
    return ascii_int(lead_id[:12], max_digits=12, base=16) if len(lead_id) >= 12 else None


_LEAD_KINDS = frozenset({"lead", "fee", "refund", "fee_refund", "reprice", "return"})


def _is_stream_id(text: str) -> bool:
    """A stream id (``ms`` or ``ms-seq``) that Redis and the SQL archive both hold: the
    archive's cursor rule (each part below 2^63), as the page may go on into SQL."""
    try:
        parse_cursor(text)
    except InvalidRequest:
        return False
    return True


def _lead_of(f: dict[str, str]) -> str | None:
    """The lead of an entry of a lead kind; a ``fee`` entry holds the platform fees of a
    decide.lua call's leads of one campaign, its ref their ids comma-separated: the lead
    only when it names one."""
    ref = f.get("ref")
    if f.get("kind") not in _LEAD_KINDS or ref is None or "," in ref:
        return None
    return ref


def _entry_view(entry_id: str, f: dict[str, str]) -> LedgerEntry:
    extra = {
        k: v for k, v in f.items() if k not in ("account", "kind", "delta", "balance", "ref", "ts")
    }
    return LedgerEntry(
        id=entry_id,
        account=f.get("account"),
        kind=f.get("kind"),
        delta=money.format(int(f["delta"])),
        balance_after=money.format(int(f["balance"])),
        lead_id=_lead_of(f),
        ref=f.get("ref"),
        time_ms=int(f.get("ts", "0")),
        details=extra or msgspec.UNSET,
    )

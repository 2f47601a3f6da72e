"""Billing HTTP handlers (plain ``async def handler(req) -> Response`` functions).

:func:`routes` returns ``(method, path, handler)`` triples; the integrator mounts them
behind tenant bearer-token auth, which leaves the tenant id in
``req.scope["leadflow.tenant"]`` (and optionally the acting user in
``req.scope["leadflow.user"]``). Bodies are JSON decoded by msgspec Structs built once;
money crosses the API as decimal strings. Every error is
``{"error": {"code", "message"}}`` with a stable code; a refused request moves no money.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from billing import archive, funding, policy, recharge, usage
from billing.context import BillingContext
from billing.schemas import (
    AlertBody,
    AlertSettings,
    AttachBody,
    AutoRechargeSettings,
    BalanceRefund,
    BatchBody,
    FundBody,
    FundResult,
    Method,
    MethodList,
    Overview,
    TransactionPage,
    Usage,
    UsageBatchResult,
)
from engine.api.toolkit import Request, Response, error_response, json_response
from engine.core import money
from engine.core.billing_errors import (
    BillingError,
    InvalidRequest,
    PaymentsFailed,
    ServiceUnavailable,
    Unauthorized,
)
from engine.core.config import AutoRecharge
from engine.core.errors import StoreUnavailable
from engine.core.untrusted import JSON_ERRORS, ascii_int, json_problem

Handler = Callable[[Request], Awaitable[Response]]
OVERVIEW_ENTRIES = 10  # payments, and ledger entries, an overview shows (newest first)


_fund = msgspec.json.Decoder(FundBody)
_attach = msgspec.json.Decoder(AttachBody)
_auto = msgspec.json.Decoder(AutoRecharge)
_alert = msgspec.json.Decoder(AlertBody)
_usage = msgspec.json.Decoder(Usage)
_batch = msgspec.json.Decoder(BatchBody)


def _tenant(req: Request) -> str:
    tenant = req.scope.get("leadflow.tenant")
    if not isinstance(tenant, str) or not tenant:
        raise Unauthorized("no authenticated tenant")
    return tenant


def _user(req: Request) -> str:
    user = req.scope.get("leadflow.user")
    return user if isinstance(user, str) else "api"


def decode_body(req: Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    if req.content_type not in ("application/json", ""):
        raise InvalidRequest("the body must be application/json", code="unsupported_media_type")
    if not req.body:
        raise InvalidRequest("a JSON body is required", code="invalid_body")
    try:
        return decoder.decode(req.body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid body: {exc}", code="invalid_body") from None
    except JSON_ERRORS as exc:  # a Struct that skips unknown fields recurses into them
        raise InvalidRequest(json_problem(exc, "the body is not valid JSON"),
                             code="invalid_body") from None


def _handle(fn: Handler) -> Handler:
    """Turn billing errors into the API's error shape."""

    async def wrapped(req: Request) -> Response:
        try:
            return await fn(req)
        except BillingError as exc:
            if isinstance(exc, PaymentsFailed):
                return error_response(exc.status, exc.code, str(exc), attempt=exc.attempt)
            return error_response(exc.status, exc.code, str(exc))
        except StoreUnavailable as exc:
            return error_response(503, "unavailable", str(exc))

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _time(value: str, field: str) -> int:
    """Epoch milliseconds from ``1700000000000`` or ISO 8601 (``2026-01-31``, UTC if naive)."""
    if not value.isascii():  # "\uff12\uff10\uff12\uff16-01-31": other scripts' digits are no time
        raise InvalidRequest(f"{field}: epoch milliseconds or an ISO 8601 date/time, in "
                             "ASCII digits", code="invalid_query")
    if value.isdigit():  # ASCII, so 0-9 only (str.isdigit() alone also takes "²")
        ms = ascii_int(value, max_digits=15)
        if ms is None:  # past the year 33658: not a time, and SQL would overflow
            raise InvalidRequest(f"{field}: out of range", code="invalid_query")
        return ms
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{field}: epoch milliseconds or an ISO 8601 date/time",
                             code="invalid_query") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _settings(ar: AutoRecharge) -> AutoRechargeSettings:
    """Auto-recharge settings with every field written (AutoRecharge, a config shape,
    leaves its defaults out)."""
    return AutoRechargeSettings(**msgspec.structs.asdict(ar))


class _BillingApi:
    """Every billing endpoint, bound to one :class:`BillingContext`."""

    def __init__(self, ctx: BillingContext) -> None:
        self.ctx = ctx


    def _account_of(self, req: Request) -> tuple[str, str]:
        tenant = _tenant(req)
        account = req.params["id"]
        self.ctx.settings(tenant, account)  # 404 for another tenant's or an unknown account
        return tenant, account

    async def fund(self, req: Request) -> Response:
        """POST /v1/accounts/{id}/funds {"amount": "100.00"} + Idempotency-Key."""
        tenant, account = self._account_of(req)
        body: FundBody = decode_body(req, _fund)
        key = req.header(b"idempotency-key") or body.idempotency_key
        if not key:
            raise InvalidRequest("an Idempotency-Key header (or idempotency_key) is required",
                                 code="invalid_idempotency_key")
        amount = money.parse(body.amount, field="amount")
        a = await funding.fund(self.ctx, tenant, account, amount, key, user=_user(req))
        return json_response(FundResult(
            attempt=a.id, state=a.state, amount=money.format(a.amount),
            card_fee=money.format(a.fee), charged=money.format(a.gross),
            payment_intent=a.pi, balance=money.format(int(a.balance or 0)),
        ), 201)

    async def list_methods(self, req: Request) -> Response:
        tenant, account = self._account_of(req)
        return json_response(MethodList(await self.ctx.methods.all(tenant, account)))

    async def attach(self, req: Request) -> Response:
        """POST /v1/accounts/{id}/payment-methods {"payment_method": "pm_..."}."""
        tenant, account = self._account_of(req)
        body: AttachBody = decode_body(req, _attach)
        m: Method = await self.ctx.methods.attach(tenant, account, body.payment_method)
        await recharge.recharge_if_below(self.ctx, tenant, account, why="card_added")
        return json_response(m, 201)

    def method_action(self, action: str) -> Handler:
        async def handler(req: Request) -> Response:
            tenant, account = self._account_of(req)
            pm = req.params["pm"]
            m = self.ctx.methods
            fn = {"activate": m.activate, "deactivate": m.deactivate,
                  "primary": m.set_primary, "detach": m.detach}[action]
            methods = await fn(tenant, account, pm)
            if action in ("activate", "primary"):  # a card that may pay now
                await recharge.recharge_if_below(self.ctx, tenant, account, why="card_added")
            return json_response(MethodList(methods))

        handler.__name__ = f"payment_method_{action}"
        return handler

    async def refund_balance(self, req: Request) -> Response:
        """POST /v1/accounts/{id}/refund-balance: refund unused balance, close account."""
        tenant, account = self._account_of(req)
        before = await self.ctx.store.account(tenant, account)
        entries = await funding.refund_balance(self.ctx, tenant, account, user=_user(req))
        return json_response(BalanceRefund(
            refunded=money.format(before.balance if before else 0), entries=entries,
            closed=True))

    async def auto_recharge(self, req: Request) -> Response:
        """PUT /v1/accounts/{id}/auto-recharge (AutoRecharge fields)."""
        tenant, account = self._account_of(req)
        ar: AutoRecharge = decode_body(req, _auto)
        saved = await recharge.configure(self.ctx, tenant, account, ar)
        return json_response(_settings(saved))

    async def alert(self, req: Request) -> Response:
        """PUT /v1/accounts/{id}/alert {"threshold": "25.00"} (null: the config's again)."""
        tenant, account = self._account_of(req)
        body: AlertBody = decode_body(req, _alert)
        own = None if body.threshold is None else policy.check_alert(body.threshold)
        default = money.parse(self.ctx.settings(tenant, account).alert)
        if not await self.ctx.store.set_alert(tenant, account, own, default, ref="api"):
            raise InvalidRequest(f"account {account} is not provisioned",
                                 code="unknown_account")
        return json_response(AlertSettings(threshold=money.format(default if own is None
                                                                  else own),
                                           source="config" if own is None else "account"))

    async def record_usage(self, req: Request) -> Response:
        """POST /v1/usage {account, meter, quantity, event_id}."""
        tenant = _tenant(req)
        u: Usage = decode_body(req, _usage)
        if not u.user:
            u.user = _user(req)
        res = await usage.record_usage(self.ctx, tenant, u.account, u.meter, u.quantity,
                                       u.event_id, user=u.user)
        return json_response(res, 200 if res.replay else 201)

    async def record_batch(self, req: Request) -> Response:
        """POST /v1/usage/batch {"items": [...]}: all validated first, then each debited."""
        tenant = _tenant(req)
        body: BatchBody = decode_body(req, _batch)
        for u in body.items:
            u.user = u.user or _user(req)
        out = await usage.record_batch(self.ctx, tenant, body.items)
        return json_response(UsageBatchResult(out))

    async def transactions(self, req: Request) -> Response:
        """GET /v1/accounts/{id}/transactions?from&to&type&q&limit&cursor&format=csv."""
        tenant, account = self._account_of(req)
        if self.ctx.archive is None:
            raise ServiceUnavailable("the ledger archive is not configured")
        qs = req.query
        unknown = set(qs) - {"from", "to", "type", "q", "limit", "cursor", "format"}
        if unknown:
            raise InvalidRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}",
                                 code="invalid_query")
        filters: dict[str, Any] = {
            "from_ms": _time(qs["from"], "from") if qs.get("from") else None,
            "to_ms": _time(qs["to"], "to") if qs.get("to") else None,
            "type": qs.get("type") or None, "q": qs.get("q") or None,
        }
        # ASCII digits, and few: int() of 4,301 digits and more raised ValueError (a 500).
        # Read whatever the format: a CSV export used to take any limit and cursor unread
        limit = ascii_int(qs.get("limit", "100"), max_digits=18)
        if limit is None or not 1 <= limit <= archive.MAX_PAGE:
            raise InvalidRequest(f"limit: 1 to {archive.MAX_PAGE}", code="invalid_query")
        cursor = qs.get("cursor") or None
        if cursor is not None:
            archive.parse_cursor(cursor)  # invalid_query
        fmt = qs.get("format", "json")
        if fmt == "csv":  # every matching transaction: limit and cursor page the JSON form
            text = await self.ctx.archive.export_csv(tenant, account, **filters)
            return Response(text.encode(), 200, b"text/csv; charset=utf-8", [
                (b"content-disposition",
                 f'attachment; filename="{account}-transactions.csv"'.encode())])
        if fmt != "json":
            raise InvalidRequest("format: json or csv", code="invalid_query")
        page = await self.ctx.archive.transactions(tenant, account, limit=limit,
                                                   cursor=cursor, **filters)
        return json_response(TransactionPage(page.items, page.next_cursor))

    async def overview(self, req: Request) -> Response:
        """GET /v1/accounts/{id}/overview: balance, cards, auto recharge, the newest payments
        and ledger entries (the Redis ledger and the SQL archive together, as
        ``archive.recent`` reads them; entries in the shape of GET /transactions)."""
        tenant, account = self._account_of(req)
        state = await self.ctx.store.account(tenant, account)
        if state is None:
            raise InvalidRequest(f"account {account} is not provisioned",
                                 code="unknown_account")
        store, arc = self.ctx.store, self.ctx.archive
        payments = await archive.recent(store, arc, tenant, account, limit=OVERVIEW_ENTRIES,
                                        kinds=archive.PAYMENTS)
        last = await archive.recent(store, arc, tenant, account, limit=OVERVIEW_ENTRIES)
        return json_response(Overview(
            account=account,
            balance=money.format(state.balance),
            floor=money.format(state.floor),
            alert=money.format(state.alert),
            alert_source="account" if state.own_alert else "config",
            paused=state.paused, closed=state.closed,
            auto_recharge=_settings(await recharge.settings(self.ctx, tenant, account)),
            payment_methods=await self.ctx.methods.all(tenant, account),
            payment_history=payments,
            last_transactions=last,
        ))

    def routes(self) -> list[tuple[str, str, Handler]]:
        base = "/v1/accounts/{id}"
        table: list[tuple[str, str, Handler]] = [
            ("POST", f"{base}/funds", self.fund),
            ("GET", f"{base}/payment-methods", self.list_methods),
            ("POST", f"{base}/payment-methods", self.attach),
            ("POST", f"{base}/payment-methods/{{pm}}/activate", self.method_action("activate")),
            ("POST", f"{base}/payment-methods/{{pm}}/deactivate", self.method_action("deactivate")),
            ("POST", f"{base}/payment-methods/{{pm}}/primary", self.method_action("primary")),
            ("DELETE", f"{base}/payment-methods/{{pm}}", self.method_action("detach")),
            ("POST", f"{base}/refund-balance", self.refund_balance),
            ("PUT", f"{base}/auto-recharge", self.auto_recharge),
            ("PUT", f"{base}/alert", self.alert),
            ("POST", "/v1/usage", self.record_usage),
            ("POST", "/v1/usage/batch", self.record_batch),
            ("GET", f"{base}/transactions", self.transactions),
            ("GET", f"{base}/overview", self.overview),
        ]
        return [(method, path, _handle(fn)) for method, path, fn in table]


def routes(ctx: BillingContext) -> list[tuple[str, str, Handler]]:
    """Every billing endpoint, bound to ``ctx``: (method, path template, handler)."""
    return _BillingApi(ctx).routes()

"""The portal's pages (Starlette + Jinja2, autoescaped), mounted under ``/portal``.

Every read and every change of an account goes through the API's own guard and handler,
called in this process for the session's user (:meth:`engine.api.app.App.call_as`): what
a buyer reaches, the rules an action obeys, its ledger ``user`` (``<user id>/portal``) and
its audit row are the API's, not a copy of them. The portal adds only what a browser needs:
logins and sessions, forms and CSRF, HTML. Its own state-changing actions (logins, API keys)
go through the identity store, which writes their audit rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import jinja2
import msgspec
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from billing import funding, policy
from billing.context import BillingContext
from billing.leads import Day, LeadArchive
from engine.api.accounts import RETURN_REASONS, account_status
from engine.api.app import App
from engine.api.auth import reaches_account
from engine.core import money
from engine.core.billing_errors import BillingError, MoneyError
from engine.core.config import Config, Settings, resolve_secret
from engine.core.constants import WALLET
from engine.core.errors import StoreUnavailable
from engine.core.untrusted import ascii_int
from engine.identity.errors import IdentityError
from engine.identity.store import Actor, IdentityStore, LoginThrottle, Principal, User, wall_ms
from engine.portal import security
from engine.portal.security import (
    COOKIE_PATH,
    CSP_STATE,
    LOGIN_COOKIE,
    NO_REFERRER,
    SESSION_COOKIE,
    AddressThrottle,
    SecureHeaders,
)
from engine.store.store import UNAVAILABLE

log = logging.getLogger("leadflow.portal")

PAGE = 25  # transactions a page shows
_enc = msgspec.json.Encoder()
PAUSE_REASONS = {
    "floor": "the balance reached the account's floor",
    "min_balance": "the balance is under the account's minimum balance",
    "manual": "paused by hand",
    "closed": "the account is closed (its balance was refunded)",
    "auto_recharge": "auto-recharge is required and not set up",
}
RETURN_LABELS = {
    "disconnected_phone": "Disconnected phone",
    "wrong_number": "Wrong number",
    "outside_us_canada": "Outside the US and Canada",
    "third_party_submission": "Submitted by a third party",
}
TYPES = ("lead", "fee", "usage", "funding", "recharge", "refund", "return", "adjustment")


class Failed(Exception):
    """An action the API (or the identity store) refused: shown on the page, with the
    status it answered."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Ctx:
    """A logged-in request: who, its session's token (for the CSRF token), its user."""

    principal: Principal
    token: str
    user: User
    account: str = ""
    mode: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        return self.principal.tenant


def usd(value: object) -> str:
    """``"-12.50"`` -> ``-$12.50`` (the API's decimal strings, as a person reads them)."""
    text = str(value)
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, cents = digits.partition(".")
    if whole.isdigit():
        whole = f"{int(whole):,}"
    return f"{sign}${whole}.{cents or '00'}"


class Portal:
    def __init__(self, api: App, billing: BillingContext, config: Callable[[], Config]) -> None:
        self.api, self.billing, self.config = api, billing, config
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("engine.portal", "templates"),
            autoescape=True,
        )
        env.filters["usd"] = usd
        self.templates = Jinja2Templates(env=env)
        self.throttle = AddressThrottle(self.now_ms)

    # ---- plumbing ------------------------------------------------------------------------

    def now_ms(self) -> int:
        ids = self.api.identity
        return ids.clock() if ids is not None else wall_ms()

    @property
    def settings(self) -> Settings:
        return self.config().settings

    def _ids(self) -> IdentityStore:
        ids = self.api.identity
        if ids is None:
            raise HTTPException(503, "logins are not available now: try again later")
        return ids

    def asgi(self) -> Starlette:
        a = "/portal/a/{account}"
        routes = [
            Route("/portal", self.home),
            Route("/portal/", self.home),
            Route("/portal/login", self.login_page, methods=["GET"]),
            Route("/portal/login", self.login, methods=["POST"]),
            Route("/portal/logout", self.logout, methods=["POST"]),
            Route("/portal/invite/{token}", self.invite_page, methods=["GET"]),
            Route("/portal/invite/{token}", self.accept_invite, methods=["POST"]),
            Route("/portal/operator", self.operator),
            Route("/portal/keys", self.keys_page, methods=["GET"]),
            Route("/portal/keys", self.create_key, methods=["POST"]),
            Route("/portal/keys/{key_id}/revoke", self.revoke_key, methods=["POST"]),
            Route(a, self.dashboard),
            Route(a + "/transactions", self.transactions),
            Route(a + "/transactions.csv", self.transactions_csv),
            Route(a + "/leads", self.leads),
            Route(a + "/leads.csv", self.leads_csv),
            Route(a + "/leads/{buyer}/{lead}", self.lead_detail),
            Route(a + "/analytics", self.analytics),
            Route(a + "/campaigns", self.campaigns),
            Route(a + "/campaigns/{buyer}/{action}", self.pause_resume, methods=["POST"]),
            Route(a + "/funds", self.funds),
            Route(a + "/funds/preview", self.fund_preview, methods=["POST"]),
            Route(a + "/funds/pay", self.fund_pay, methods=["POST"]),
            Route(a + "/funds/auto-recharge", self.auto_recharge, methods=["POST"]),
            Route(a + "/funds/alert", self.alert, methods=["POST"]),
            Route(a + "/funds/refund", self.refund, methods=["POST"]),
            Route(a + "/funds/cards", self.card_added, methods=["POST"]),
            Route(a + "/funds/cards/{pm}/{action}", self.card_action, methods=["POST"]),
            Route(a + "/card", self.card_page),
            Route(a + "/returns", self.returns, methods=["GET"]),
            Route(a + "/returns", self.return_lead, methods=["POST"]),
            Mount("/portal/static", StaticFiles(packages=[("engine.portal", "static")]),
                  name="static"),
        ]
        handlers: dict[Any, Any] = {_Redirect: _redirect, HTTPException: self.http_error,
                                    StoreUnavailable: self.unavailable}
        handlers.update(dict.fromkeys(UNAVAILABLE, self.unavailable))
        app = Starlette(routes=routes, middleware=[Middleware(SecureHeaders)],
                        exception_handlers=handlers)
        app.state.portal = self
        return app

    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        if status == 404:
            detail = "There is no such page, or it is not yours to see."
        elif status == 405:
            detail = "This page does not take that method."
        return self.templates.TemplateResponse(
            request, "error.html", {"status": status, "problem": detail, "ctx": None},
            status_code=status, headers=getattr(exc, "headers", None))

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        return await self.http_error(request, HTTPException(
            503, "The service is unavailable for a moment: try again shortly."))

    def _secure(self, request: Request) -> bool:
        public = self.settings.public_url or ""
        return public.startswith("https://") or request.url.scheme == "https"

    def _address(self, request: Request) -> str:
        return request.client.host if request.client else "-"

    def _check_origin(self, request: Request) -> None:
        if not security.same_origin(request.headers.get("origin"), request.url.scheme,
                                    request.headers.get("host")):
            raise HTTPException(403, "This form was sent from another site: nothing was done.")

    async def _form(self, request: Request) -> FormData:
        self._check_origin(request)
        try:
            return await request.form(max_files=0, max_fields=50)
        except (HTTPException, UnicodeDecodeError, ValueError):
            raise HTTPException(400, "The form could not be read.") from None

    # ---- sessions ------------------------------------------------------------------------

    async def _session(self, request: Request) -> Ctx | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        ids = self._ids()
        p = await ids.session(token, idle_ms=self.settings.session_idle_minutes * 60_000)
        if p is None or p.tenant not in {t.id for t in self.config().tenants}:
            return None
        try:
            user = await ids.user(p.tenant, p.user_id)
        except IdentityError:
            return None
        return Ctx(p, token, user)

    def _to_login(self, request: Request) -> Response:
        resp = RedirectResponse("/portal/login", 303)
        if request.cookies.get(SESSION_COOKIE):  # expired or ended: forget it
            resp.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return resp

    async def _user(self, request: Request, *, form: FormData | None = None) -> Ctx:
        """The session's user (else a redirect to the login page, raised); a form's CSRF
        token checked when ``form`` is given (else a 403: nothing is done)."""
        ctx = await self._session(request)
        if ctx is None:
            raise _Redirect(self._to_login(request))
        if form is not None and not security.csrf_ok(ctx.token, form.get("csrf")):
            raise HTTPException(403, "This form has expired or was not sent from the portal: "
                                     "nothing was done. Reload the page and try again.")
        return ctx

    async def _account(self, request: Request, *, form: FormData | None = None) -> Ctx:
        """An account page: the session's user, and the path's account one of its own
        (else the 404 of a page that does not exist, as the API answers)."""
        ctx = await self._user(request, form=form)
        account = request.path_params["account"]
        rt = self.api.runtime
        if not reaches_account(rt, ctx.principal, account):
            raise HTTPException(404)
        ctx.account = account
        ctx.mode = rt.clients[(ctx.tenant, account)].billing
        return ctx

    def _render(self, request: Request, ctx: Ctx | None, template: str, status: int = 200,
                **data: Any) -> Response:
        data["ctx"] = ctx
        if ctx is not None:
            data.setdefault("csrf", security.csrf_token(ctx.token))
            rt = self.api.runtime
            data["accounts"] = sorted(a for a in ctx.principal.accounts
                                      if reaches_account(rt, ctx.principal, a))
            tenant = rt.tenants.get(ctx.tenant)
            data["brand"] = (tenant.name or tenant.id) if tenant else ""
        data.setdefault("brand", "")
        data.setdefault("message", "")
        data.setdefault("error", "")
        return self.templates.TemplateResponse(request, template, data, status_code=status)

    # ---- the API, for the session's user ---------------------------------------------------

    async def _call(self, ctx: Ctx, method: str, path: str, *, query: dict[str, str] | None = None,
                    body: object = None) -> Any:
        """An API endpoint for the session's user: its decoded answer, or Failed with the
        API's message and status."""
        resp = await self.api.call_as(
            ctx.principal, method, path, query=urlencode(query or {}),
            body=b"" if body is None else _enc.encode(body))
        data = msgspec.json.decode(resp.body) if resp.body and \
            resp.content_type.startswith(b"application/json") else None
        if resp.status >= 400:
            message = "the request was refused"
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                message = str(data["error"].get("message", message))
            raise Failed(resp.status, message)
        return data

    @staticmethod
    def _path(account: str, rest: str = "") -> str:
        return f"/v1/accounts/{quote(account, safe='')}{rest}"

    # ---- login, logout, invites -----------------------------------------------------------

    async def home(self, request: Request) -> Response:
        ctx = await self._session(request)
        if ctx is None:
            return self._to_login(request)
        if ctx.principal.operator:
            return RedirectResponse("/portal/operator", 303)
        accounts = sorted(a for a in ctx.principal.accounts
                          if reaches_account(self.api.runtime, ctx.principal, a))
        if len(accounts) == 1:
            return RedirectResponse(f"/portal/a/{quote(accounts[0], safe='')}", 303)
        return self._render(request, ctx, "accounts.html")

    def _login_form(self, request: Request, status: int = 200, error: str = "",
                    message: str = "") -> Response:
        token = security.new_login_token()
        tenants = [t.id for t in self.config().tenants]
        chosen = request.query_params.get("t", "") or (tenants[0] if len(tenants) == 1 else "")
        resp = self._render(request, None, "login.html", status, login_token=token,
                            tenant=chosen, one_tenant=len(tenants) == 1, error=error,
                            message=message)
        resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=self._secure(request))
        return resp

    async def login_page(self, request: Request) -> Response:
        if await self._session(request) is not None:
            return RedirectResponse("/portal", 303)
        done = request.query_params.get("done")
        message = "Your password is set: log in." if done == "password" else (
            "You are logged out." if done == "logout" else "")
        return self._login_form(request, message=message)

    async def login(self, request: Request) -> Response:
        form = await self._form(request)
        if not security.same_token(request.cookies.get(LOGIN_COOKIE), form.get("login_token")):
            return self._login_form(request, 403, "The login form expired: try again.")
        address = self._address(request)
        wait = self.throttle.retry_after_s(address)
        if wait:
            resp = self._login_form(request, 429, "Too many failed logins from your address: "
                                    f"try again in {(wait + 59) // 60} minute(s).")
            resp.headers["retry-after"] = str(wait)
            return resp
        tenant, email = str(form.get("tenant", "")), str(form.get("email", ""))
        password = str(form.get("password", ""))
        s = self.settings
        ids = self._ids()
        user = None
        if tenant in self.api.runtime.tenants and len(password) <= 1024:
            user = await ids.check_login(tenant, email, password, throttle=LoginThrottle(
                s.login_max_failures, s.login_lock_minutes * 60_000))
        if user is None:
            self.throttle.failed(address)
            return self._login_form(request, 401, "Wrong e-mail or password (or too many "
                                    "failed attempts: the login is locked for a while).")
        old = request.cookies.get(SESSION_COOKIE)
        if old:  # a new login never reuses a session: the old one ends
            await ids.end_session(old)
        token = await ids.start_session(tenant, user.id, ttl_ms=s.session_hours * 3_600_000)
        resp = RedirectResponse("/portal", 303)
        resp.set_cookie(SESSION_COOKIE, token, max_age=s.session_hours * 3600, path=COOKIE_PATH,
                        httponly=True, samesite="lax", secure=self._secure(request))
        resp.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        return resp

    async def logout(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._user(request, form=form)
        await self._ids().end_session(ctx.token)
        resp = RedirectResponse("/portal/login?done=logout", 303)
        resp.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return resp

    def _invite_form(self, request: Request, status: int = 200, error: str = "") -> Response:
        request.scope.setdefault("state", {})[NO_REFERRER] = True
        token = security.new_login_token()
        resp = self._render(request, None, "invite.html", status, login_token=token,
                            error=error)
        resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=self._secure(request))
        return resp

    async def invite_page(self, request: Request) -> Response:
        return self._invite_form(request)

    async def accept_invite(self, request: Request) -> Response:
        form = await self._form(request)
        if not security.same_token(request.cookies.get(LOGIN_COOKIE), form.get("login_token")):
            return self._invite_form(request, 403, "The form expired: try again.")
        password = str(form.get("password", ""))
        if password != str(form.get("confirm", "")):
            return self._invite_form(request, 400, "The two passwords differ.")
        try:
            user = await self._ids().accept_invite(request.path_params["token"], password)
        except IdentityError as exc:
            if exc.status == 410:
                return await self.http_error(request, HTTPException(
                    410, "This invite link is unknown, used or expired: ask for a new one."))
            return self._invite_form(request, exc.status, str(exc))
        query = urlencode({"t": user.tenant, "done": "password"})
        return RedirectResponse(f"/portal/login?{query}", 303)

    # ---- API keys (the user's own) -----------------------------------------------------------

    async def _buyer(self, request: Request, *, form: FormData | None = None) -> Ctx:
        """A buyer's own page (its API keys): an operator has none (404)."""
        ctx = await self._user(request, form=form)
        if ctx.principal.operator:
            raise HTTPException(404)
        return ctx

    async def keys_page(self, request: Request, *, ctx: Ctx | None = None, status: int = 200,
                        **data: Any) -> Response:
        ctx = ctx or await self._buyer(request)
        keys = await self._ids().keys(ctx.tenant, ctx.user.id)
        return self._render(request, ctx, "keys.html", status, keys=keys, **data)

    async def create_key(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._buyer(request, form=form)
        try:
            key, secret = await self._ids().create_key(
                ctx.tenant, ctx.user.id, str(form.get("name", "")), actor=Actor(ctx.user.id))
        except IdentityError as exc:
            return await self.keys_page(request, ctx=ctx, status=exc.status, error=str(exc))
        return await self.keys_page(request, ctx=ctx, new_key=secret,
                                    message=f"Key {key.prefix}… made: copy it now, it is "
                                            "shown this once.")

    async def revoke_key(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._buyer(request, form=form)
        ids = self._ids()
        key_id = request.path_params["key_id"]
        try:
            key = await ids.key(ctx.tenant, key_id)
            if key.user_id != ctx.user.id:  # another user's key: as one that does not exist
                raise HTTPException(404)
            await ids.revoke_key(ctx.tenant, key_id, actor=Actor(ctx.user.id))
        except IdentityError:
            raise HTTPException(404) from None
        return await self.keys_page(request, ctx=ctx, message=f"Key {key.prefix}… revoked.")

    # ---- the operator page (the tenant's) ---------------------------------------------------

    async def operator(self, request: Request) -> Response:
        """The tenant's clients (and its wallet) with balance, available, status, billing
        mode and alert; its portal users with role, status and mappings. Read-only, for a
        user with the operator role (anyone else: 404, as a page that does not exist)."""
        ctx = await self._user(request)
        if not ctx.principal.operator:
            raise HTTPException(404)
        rt = self.api.runtime
        store = self.billing.store
        rows: list[dict[str, str]] = []
        for account in [WALLET, *sorted(c.id for c in rt.cfg.clients
                                        if c.tenant == ctx.tenant)]:
            state = await store.account(ctx.tenant, account)
            client = rt.clients.get((ctx.tenant, account))
            mode = client.billing if client is not None else "manual"
            if state is None:
                rows.append({"id": account, "mode": mode, "status": "not provisioned"})
                continue
            status = account_status(state)
            rows.append({
                "id": account, "mode": mode, "balance": money.format(state.balance),
                "available": money.format(state.available), "alert": money.format(state.alert),
                "own_alert": "own" if state.own_alert else "",
                "status": f"paused ({state.paused})" if status == "paused" else status})
        users = await self._ids().users(ctx.tenant)
        return self._render(request, ctx, "operator.html", clients=rows, users=users,
                            when=self._when(ctx))

    # ---- dashboard -------------------------------------------------------------------------

    async def dashboard(self, request: Request) -> Response:
        ctx = await self._account(request)
        view = await self._call(ctx, "GET", self._path(ctx.account))
        overview = await self._call(ctx, "GET", self._path(ctx.account, "/overview"))
        balance = money.parse(view["balance"])
        alert = money.parse(view["thresholds"]["alert"])
        reason = view.get("paused_reason") or ""
        return self._render(
            request, ctx, "dashboard.html", view=view, overview=overview,
            low=ctx.mode != "none" and balance < alert,
            why=PAUSE_REASONS.get(reason, reason), when=self._when(ctx))

    def _zone(self, ctx: Ctx) -> ZoneInfo:
        tenant = self.api.runtime.tenants.get(ctx.tenant)
        try:
            return ZoneInfo(tenant.timezone if tenant else "UTC")
        except (ValueError, KeyError):
            return ZoneInfo("UTC")

    def _when(self, ctx: Ctx) -> Callable[[int], str]:
        zone = self._zone(ctx)

        def fmt(ms: int) -> str:
            return dt.datetime.fromtimestamp(ms / 1000, zone).strftime("%Y-%m-%d %H:%M")

        return fmt

    # ---- transactions -----------------------------------------------------------------------

    def _filters(self, ctx: Ctx, request: Request) -> tuple[dict[str, str], dict[str, str]]:
        """(the form's values, the API's query): dates are days in the tenant's time zone,
        ``to`` inclusive."""
        q = request.query_params
        shown = {k: q.get(k, "") for k in ("from", "to", "type", "q")}
        query: dict[str, str] = {}
        zone = self._zone(ctx)
        for name, days in (("from", 0), ("to", 1)):
            value = shown[name]
            if value:
                try:
                    day = dt.date.fromisoformat(value)
                except ValueError:
                    raise Failed(400, f"{name}: a date (YYYY-MM-DD)") from None
                start = dt.datetime.combine(day + dt.timedelta(days=days), dt.time(), zone)
                query[name] = str(int(start.timestamp() * 1000))
        if shown["type"]:
            query["type"] = shown["type"]
        if shown["q"]:
            query["q"] = shown["q"]
        return shown, query

    async def transactions(self, request: Request) -> Response:
        ctx = await self._account(request)
        when = self._when(ctx)
        try:
            shown, query = self._filters(ctx, request)
            cursor = request.query_params.get("cursor", "")
            page = await self._call(ctx, "GET", self._path(ctx.account, "/transactions"),
                                    query={**query, "limit": str(PAGE),
                                           **({"cursor": cursor} if cursor else {})})
        except Failed as exc:
            return self._render(request, ctx, "transactions.html", exc.status, items=[],
                                next_url="", csv_url="", shown=_blank_filters(request),
                                types=TYPES, when=when, error=exc.message)
        base = {k: v for k, v in shown.items() if v}
        next_url = "?" + urlencode({**base, "cursor": page["next_cursor"]}) \
            if page["next_cursor"] else ""
        return self._render(request, ctx, "transactions.html", items=page["data"],
                            next_url=next_url, first_url="?" + urlencode(base) if cursor else "",
                            csv_url="transactions.csv?" + urlencode(base), shown=shown,
                            types=TYPES, when=when)

    async def transactions_csv(self, request: Request) -> Response:
        """Every matching transaction, streamed (billing.archive's export, a page at a time),
        after the API's own listing accepted the same filters for this user."""
        ctx = await self._account(request)
        try:
            _, query = self._filters(ctx, request)
            await self._call(ctx, "GET", self._path(ctx.account, "/transactions"),
                             query={**query, "limit": "1"})
        except Failed as exc:
            raise HTTPException(exc.status, exc.message) from None
        arc = self.billing.archive
        if arc is None:
            raise HTTPException(503, "The transaction history is not available now.")
        filters: dict[str, Any] = {
            "from_ms": int(query["from"]) if "from" in query else None,
            "to_ms": int(query["to"]) if "to" in query else None,
            "type": query.get("type"), "q": query.get("q")}
        return _csv(arc.iter_csv(ctx.tenant, ctx.account, **filters),
                    f"{ctx.account}-transactions.csv")

    # ---- leads and analytics ----------------------------------------------------------------

    def _leads(self) -> LeadArchive:
        arc = self.billing.leads
        if arc is None:
            raise HTTPException(503, "The lead archive is not available now.")
        return arc

    def _range(self, ctx: Ctx, request: Request) -> tuple[dict[str, str], int | None,
                                                             int | None]:
        """(the form's dates, from and to in epoch ms): days of the tenant's time zone,
        ``to`` inclusive."""
        q = request.query_params
        shown = {k: q.get(k, "") for k in ("from", "to")}
        zone = self._zone(ctx)
        bounds: list[int | None] = []
        for name, days in (("from", 0), ("to", 1)):
            if not shown[name]:
                bounds.append(None)
                continue
            try:
                day = dt.date.fromisoformat(shown[name])
            except ValueError:
                raise Failed(400, f"{name}: a date (YYYY-MM-DD)") from None
            start = dt.datetime.combine(day + dt.timedelta(days=days), dt.time(), zone)
            bounds.append(int(start.timestamp() * 1000))
        return shown, bounds[0], bounds[1]

    async def leads(self, request: Request) -> Response:
        """The leads the account bought: newest first, a page at a time."""
        ctx = await self._account(request)
        arc = self._leads()
        when = self._when(ctx)
        try:
            shown, from_ms, to_ms = self._range(ctx, request)
            cursor = request.query_params.get("cursor", "") or None
            page = await arc.leads(ctx.tenant, [ctx.account], from_ms=from_ms, to_ms=to_ms,
                                   limit=PAGE, cursor=cursor)
        except (Failed, BillingError) as exc:
            status = exc.status if isinstance(exc, Failed) else 400
            return self._render(request, ctx, "leads.html", status, items=[], next_url="",
                                csv_url="", shown={"from": "", "to": ""}, when=when,
                                error=exc.message if isinstance(exc, Failed) else str(exc))
        base = {k: v for k, v in shown.items() if v}
        next_url = "?" + urlencode({**base, "cursor": page.next_cursor}) \
            if page.next_cursor else ""
        return self._render(request, ctx, "leads.html", items=page.items, next_url=next_url,
                            first_url="?" + urlencode(base) if cursor else "",
                            csv_url="leads.csv?" + urlencode(base), shown=shown, when=when,
                            money=money.format, quote=lambda v: quote(v, safe=""))

    async def leads_csv(self, request: Request) -> Response:
        """Every lead of the range, streamed (a page of the archive at a time)."""
        ctx = await self._account(request)
        arc = self._leads()
        try:
            _, from_ms, to_ms = self._range(ctx, request)
        except Failed as exc:
            raise HTTPException(exc.status, exc.message) from None
        return _csv(arc.iter_csv(ctx.tenant, [ctx.account], from_ms=from_ms, to_ms=to_ms),
                    f"{ctx.account}-leads.csv")

    async def lead_detail(self, request: Request) -> Response:
        ctx = await self._account(request)
        lead = await self._leads().lead(ctx.tenant, [ctx.account], request.path_params["lead"],
                                        request.path_params["buyer"])
        if lead is None:
            raise HTTPException(404)
        return self._render(request, ctx, "lead.html", lead=lead, when=self._when(ctx),
                            money=money.format, retention=self._retention(ctx))

    def _retention(self, ctx: Ctx) -> int:
        tenant = self.api.runtime.tenants.get(ctx.tenant)
        return tenant.pii_retention_days if tenant else 30

    async def analytics(self, request: Request) -> Response:
        """Leads and spend per day of the tenant's time zone, as SVG drawn here."""
        ctx = await self._account(request)
        arc = self._leads()
        zone = self._zone(ctx)
        today = dt.datetime.fromtimestamp(self.now_ms() / 1000, zone).date()
        q = request.query_params
        try:
            last = dt.date.fromisoformat(q["to"]) if q.get("to") else today
            first = dt.date.fromisoformat(q["from"]) if q.get("from") else \
                last - dt.timedelta(days=29)
        except ValueError:
            first, last = today - dt.timedelta(days=29), today
            error = "from, to: dates (YYYY-MM-DD)"
        else:
            error = ""
        if first > last or (last - first).days > 366:
            first = last - dt.timedelta(days=29)
            error = "The range is one day to a year, from before to: showing 30 days."
        days = await arc.daily(ctx.tenant, [ctx.account], first=first, last=last,
                               tz=zone.key)
        leads = sum(d.leads for d in days)
        returned = sum(d.returned for d in days)
        return self._render(
            request, ctx, "analytics.html", 400 if error else 200, error=error,
            shown={"from": first.isoformat(), "to": last.isoformat()}, zone=zone.key,
            leads=leads, spend=money.format(sum(d.spend for d in days)), returned=returned,
            rate=f"{100 * returned / leads:.1f}" if leads else "0.0",
            leads_chart=bar_chart(days, lambda d: d.leads, str),
            spend_chart=bar_chart(days, lambda d: d.spend, lambda v: usd(money.format(v))))

    # ---- campaigns ------------------------------------------------------------------------

    async def _buyers(self, ctx: Ctx) -> list[dict[str, str]]:
        rt = self.api.runtime
        buyers = [b for b in rt.cfg.buyers if b.tenant == ctx.tenant and b.client == ctx.account]
        flags = await self.billing.store.buyer_flags(ctx.tenant, [b.id for b in buyers])
        out = []
        for b, paused in zip(buyers, flags, strict=True):
            status = "paused by the tenant" if b.status == "paused" else (
                "paused" if paused else "active")
            out.append({"id": b.id, "campaign": b.campaign, "price": b.price,
                        "status": status, "manual": "1" if paused else ""})
        return out

    async def campaigns(self, request: Request, *, ctx: Ctx | None = None, status: int = 200,
                        **data: Any) -> Response:
        ctx = ctx or await self._account(request)
        return self._render(request, ctx, "campaigns.html", status,
                            buyers=await self._buyers(ctx), **data)

    async def pause_resume(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._account(request, form=form)
        action, buyer = request.path_params["action"], request.path_params["buyer"]
        if action not in ("pause", "resume"):
            raise HTTPException(404)
        try:
            await self._call(ctx, "POST", f"/v1/buyers/{quote(buyer, safe='')}/{action}")
        except Failed as exc:
            if exc.status == 404:
                raise HTTPException(404) from None
            return await self.campaigns(request, ctx=ctx, status=exc.status, error=exc.message)
        done = "paused" if action == "pause" else "resumed"
        return await self.campaigns(request, ctx=ctx, message=f"Campaign {buyer} {done}.")

    # ---- funds ----------------------------------------------------------------------------

    def _fee_bp(self, ctx: Ctx) -> int:
        return funding.fee_basis_points(self.billing, ctx.tenant)

    async def _billing_account(self, request: Request, *, form: FormData | None = None) -> Ctx:
        ctx = await self._account(request, form=form)
        if ctx.mode != "realtime":  # none: no payment pages; manual: no card funding
            raise HTTPException(404)
        return ctx

    async def _balance_account(self, request: Request, *, form: FormData | None = None
                               ) -> Ctx:
        """The Funds page and its balance alert: billing modes manual and realtime."""
        ctx = await self._account(request, form=form)
        if ctx.mode == "none":
            raise HTTPException(404)
        return ctx

    async def funds(self, request: Request, *, ctx: Ctx | None = None, status: int = 200,
                    **data: Any) -> Response:
        """Realtime: funding, cards, auto-recharge, refund and the balance alert; manual: the
        balance and its alert only."""
        ctx = ctx or await self._balance_account(request)
        overview = await self._call(ctx, "GET", self._path(ctx.account, "/overview"))
        bp = self._fee_bp(ctx)
        ar = overview["auto_recharge"]
        return self._render(request, ctx, "funds.html", status, overview=overview,
                            fee_percent=f"{bp / 100:g}", minimum=money.format(policy.MIN_FUNDING),
                            ar=ar, ar_mode="schedule" if ar["every_days"] else "threshold",
                            min_alert=money.format(policy.MIN_ALERT),
                            when=self._when(ctx), **data)

    def _amount(self, text: str) -> int:
        try:
            amount = money.parse(text.strip().removeprefix("$").replace(",", ""),
                                 field="amount")
            policy.check_card_amount(amount, minimum=policy.MIN_FUNDING)
        except (MoneyError, BillingError) as exc:
            raise Failed(400, str(exc)) from None
        return amount

    async def fund_preview(self, request: Request) -> Response:
        """The total the card will be charged, fee included, before anything is paid."""
        form = await self._form(request)
        ctx = await self._billing_account(request, form=form)
        try:
            amount = self._amount(str(form.get("amount", "")))
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        fee = funding.card_fee(amount, self._fee_bp(ctx))
        return self._render(request, ctx, "fund_confirm.html", amount=money.format(amount),
                            fee=money.format(fee), total=money.format(amount + fee),
                            fee_percent=f"{self._fee_bp(ctx) / 100:g}",
                            key=f"portal-{secrets.token_hex(16)}")

    async def fund_pay(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._billing_account(request, form=form)
        try:
            done = await self._call(ctx, "POST", self._path(ctx.account, "/funds"), body={
                "amount": str(form.get("amount", "")),
                "idempotency_key": str(form.get("key", ""))})
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        return await self.funds(request, ctx=ctx, message=(
            f"Charged {usd(done['charged'])} to your card ({usd(done['amount'])} added, "
            f"{usd(done['card_fee'])} card fee). Balance: {usd(done['balance'])}."))

    async def auto_recharge(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._billing_account(request, form=form)
        current = (await self._call(ctx, "GET", self._path(ctx.account, "/overview"))
                   )["auto_recharge"]
        every: int | None = None
        if form.get("mode") == "schedule":
            every = ascii_int(str(form.get("every_days", "")), max_digits=4)
            if every is None:
                return await self.funds(request, ctx=ctx, status=400,
                                        error="every_days: a whole number of days")
        body = {**current, "enabled": form.get("enabled") == "on",
                "threshold": str(form.get("threshold", "")).strip().removeprefix("$"),
                "amount": str(form.get("amount", "")).strip().removeprefix("$"),
                "every_days": every}
        try:
            await self._call(ctx, "PUT", self._path(ctx.account, "/auto-recharge"), body=body)
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        return await self.funds(request, ctx=ctx, message="Auto-recharge saved.")

    async def alert(self, request: Request) -> Response:
        """The account's own balance alert (PUT /alert), or the tenant's default again."""
        form = await self._form(request)
        ctx = await self._balance_account(request, form=form)
        reset = form.get("reset") == "1"
        threshold = None if reset else \
            str(form.get("threshold", "")).strip().removeprefix("$").replace(",", "")
        try:
            done = await self._call(ctx, "PUT", self._path(ctx.account, "/alert"),
                                    body={"threshold": threshold})
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        under = "no alert" if money.parse(done["threshold"]) == 0 else \
            f"an e-mail when the balance drops under {usd(done['threshold'])}"
        return await self.funds(request, ctx=ctx, message=(
            f"Balance alert saved: {under}" + (" (the default)." if reset else ".")))

    async def refund(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._billing_account(request, form=form)
        if form.get("confirm") != "on":
            return await self.funds(request, ctx=ctx, status=400,
                                    error="Tick the box to confirm the refund.")
        try:
            done = await self._call(ctx, "POST", self._path(ctx.account, "/refund-balance"))
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        return await self.funds(request, ctx=ctx, message=(
            f"{usd(done['refunded'])} refunded to your card(s); the account is closed."))

    async def card_action(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._billing_account(request, form=form)
        pm, action = request.path_params["pm"], request.path_params["action"]
        method, rest = {"primary": ("POST", "/primary"), "activate": ("POST", "/activate"),
                        "deactivate": ("POST", "/deactivate"),
                        "remove": ("DELETE", "")}.get(action, ("", ""))
        if not method:
            raise HTTPException(404)
        try:
            await self._call(ctx, method, self._path(
                ctx.account, f"/payment-methods/{quote(pm, safe='')}{rest}"))
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        done = {"primary": "is now the primary card", "activate": "is active as a backup",
                "deactivate": "is no longer used", "remove": "was removed"}[action]
        return await self.funds(request, ctx=ctx, message=f"The card {done}.")

    def _stripe(self) -> tuple[str, str]:
        """(Stripe.js URL, publishable key); no key: no card entry."""
        s = self.settings
        return s.stripe_js_url, resolve_secret(s.stripe_publishable_key)

    async def card_page(self, request: Request) -> Response:
        """Card entry with Stripe.js: a SetupIntent made for this account's Stripe Customer;
        the card goes from the browser to Stripe, never through leadflow."""
        ctx = await self._billing_account(request)
        js, key = self._stripe()
        if not key.startswith("pk_"):
            return await self.funds(request, ctx=ctx, status=503,
                                    error="Card entry is not configured for this portal.")
        try:
            secret = await self.billing.methods.setup_intent(ctx.tenant, ctx.account)
        except BillingError as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=str(exc))
        origins = _stripe_origins(js)
        state = request.scope.setdefault("state", {})
        state[CSP_STATE] = security.content_security_policy(origins)
        state[NO_REFERRER] = True
        return self._render(request, ctx, "card.html", stripe_js=js, stripe_key=key,
                            client_secret=secret)

    async def card_added(self, request: Request) -> Response:
        """The SetupIntent Stripe.js confirmed: its card attached as the API attaches one."""
        form = await self._form(request)
        ctx = await self._billing_account(request, form=form)
        try:
            pm = await self.billing.methods.setup_card(ctx.tenant, ctx.account,
                                                       str(form.get("setup_intent", "")))
            card = await self._call(ctx, "POST", self._path(ctx.account, "/payment-methods"),
                                    body={"payment_method": pm})
        except BillingError as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=str(exc))
        except Failed as exc:
            return await self.funds(request, ctx=ctx, status=exc.status, error=exc.message)
        return await self.funds(request, ctx=ctx, message=(
            f"Card {card['brand']} ending {card['last4']} added."))

    # ---- returns -----------------------------------------------------------------------------

    async def returns(self, request: Request, *, ctx: Ctx | None = None, status: int = 200,
                      **data: Any) -> Response:
        ctx = ctx or await self._account(request)
        past = await self._call(ctx, "GET", self._path(ctx.account, "/transactions"),
                                query={"type": "return", "limit": str(PAGE)})
        return self._render(request, ctx, "returns.html", status, past=past["data"],
                            buyers=await self._buyers(ctx), when=self._when(ctx),
                            reasons=[(r, RETURN_LABELS.get(r, r)) for r in
                                     sorted(RETURN_REASONS)], **data)

    async def return_lead(self, request: Request) -> Response:
        form = await self._form(request)
        ctx = await self._account(request, form=form)
        lead = str(form.get("lead", "")).strip()
        if not lead:
            return await self.returns(request, ctx=ctx, status=400, error="Enter a lead id.")
        try:
            done = await self._call(ctx, "POST", f"/v1/leads/{quote(lead, safe='')}/returns",
                                    body={"buyer": str(form.get("buyer", "")),
                                          "reason": str(form.get("reason", ""))})
        except Failed as exc:
            return await self.returns(request, ctx=ctx, status=exc.status, error=exc.message)
        return await self.returns(request, ctx=ctx, message=(
            f"Lead {done['lead_id']} returned: {usd(done['refunded'])} credited."
            if not done["replay"] else f"Lead {done['lead_id']} was returned already."))


CHART_W, CHART_H, CHART_PAD = 720, 200, 60


def bar_chart(days: list[Day], value: Callable[[Day], int],
              label: Callable[[int], str]) -> dict[str, Any]:
    """One bar per day, as the coordinates an SVG template draws (no script, no style)."""
    top = max((value(d) for d in days), default=0) or 1
    inner_w, inner_h = CHART_W - 2 * CHART_PAD, CHART_H - 2 * CHART_PAD
    step = inner_w / max(len(days), 1)
    bars = []
    for i, d in enumerate(days):
        h = inner_h * value(d) / top
        bars.append({"x": f"{CHART_PAD + i * step + step * 0.1:.1f}",
                     "y": f"{CHART_PAD + inner_h - h:.1f}", "w": f"{step * 0.8:.1f}",
                     "h": f"{h:.1f}", "title": f"{d.day.isoformat()}: {label(value(d))}"})
    every = max(1, len(days) // 8)
    ticks = [{"x": f"{CHART_PAD + i * step + step / 2:.1f}", "text": d.day.strftime("%m-%d")}
             for i, d in enumerate(days) if i % every == 0]
    return {"w": CHART_W, "h": CHART_H, "pad": CHART_PAD, "bottom": CHART_H - CHART_PAD,
            "right": CHART_W - CHART_PAD, "bars": bars, "ticks": ticks, "top": label(top)}


class _Redirect(HTTPException):
    """A page that needs a login: the redirect to the login page, raised."""

    def __init__(self, response: Response) -> None:
        super().__init__(303)
        self.response = response


def _blank_filters(request: Request) -> dict[str, str]:
    return {k: request.query_params.get(k, "") for k in ("from", "to", "type", "q")}


def _stripe_origins(js_url: str) -> tuple[str, ...]:
    parts = urlsplit(js_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    if parts.netloc == "js.stripe.com":  # Stripe.js talks to the API and frames from hooks
        return (origin, "https://api.stripe.com", "https://hooks.stripe.com")
    return (origin,)


async def _redirect(request: Request, exc: Exception) -> Response:
    if isinstance(exc, _Redirect):
        return exc.response
    return RedirectResponse("/portal/login", 303)


def build(api: App, billing: BillingContext, config: Callable[[], Config]) -> Starlette:
    """The portal's ASGI app, for :attr:`engine.api.app.App.portal`."""
    return Portal(api, billing, config).asgi()


def _csv(chunks: AsyncIterator[str], name: str) -> StreamingResponse:
    """A CSV download streamed as the archive yields it."""

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk.encode()

    return StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers={
        "content-disposition": f'attachment; filename="{name}"'})

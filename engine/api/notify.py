"""The tenant's e-mail notifications over HTTP (issue #19): its templates, the preferences of
its recipients, and the unsubscribe links of its messages.

Templates and preferences are behind the tenant's bearer token (a tenant reads and changes
only its own: every key is under its prefix). A template is stored only after it rendered
against the kind's sample data in the sandbox's child process
(:mod:`engine.notify.sandbox`); a refused one stores nothing. ``/test`` sends the sample
to the tenant's own ``notify.operators`` through its transport, synchronously, outside the
outbox (the button can be pressed again). The unsubscribe page takes no token but the
link's: GET only shows a form (mail scanners follow links), POST (the form, or a mail
client's RFC 8058 one-click POST) turns the category off.

Errors are ``{"error": {"code", "message"}}`` with the codes of :mod:`engine.api.endpoints`.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Callable
from typing import Final

import msgspec

from engine.api import toolkit
from engine.api.auth import Guard, TenantHandler
from engine.api.billing import decode_body
from engine.api.endpoints import BY_KEY
from engine.api.schemas import (
    Preferences,
    PreferencesBody,
    PreviewBody,
    RenderedMessage,
    SampleSent,
    TemplateBody,
    TemplateList,
    TemplateSource,
    TemplateSummary,
    TemplateView,
)
from engine.api.toolkit import Request, Response
from engine.core.billing_errors import BillingError
from engine.core.config import Tenant
from engine.core.untrusted import valid_address
from engine.notify import NotifyError, TemplateError, overrides, prefs, sandbox
from engine.notify import templates as tpl
from engine.notify.compose import contexts
from engine.notify.transport import Transport
from engine.notify.worker import transport_for
from engine.routing.runtime import Runtime
from engine.store.store import Store

# a PUT or a preview: three templates of 64 KiB, each twice its size JSON-escaped (a text
# of quotes, say), and room for the keys: 512 KiB (a 1 MB body is refused, 413)
TEMPLATE_BODY_LIMIT: Final = 8 * tpl.MAX_TEMPLATE_BYTES
UNSUBSCRIBE_BODY_LIMIT: Final = 4 * 1024  # a form, or RFC 8058's one-click body
_HTML: Final = b"text/html; charset=utf-8"
_PAGE_HEADERS: Final = [
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),  # the token is in the URL
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
     b"frame-ancestors 'none'"),
]
_LABELS: Final = {"caps": "cap notices", "webhooks": "webhook failure alerts",
                  "returns": "lead return notices", "reports": "weekly reports",
                  "balance": "balance alerts", "account": "account pause notices",
                  "recharge": "recharge receipts", "funding": "funding receipts"}

_template = msgspec.json.Decoder(TemplateBody)
_preview = msgspec.json.Decoder(PreviewBody)
_prefs = msgspec.json.Decoder(PreferencesBody)


def transport(tenant: Tenant) -> Transport | None:
    """The tenant's transport, the notify worker's own choice (SMTP or SendGrid); the
    caller closes it."""
    return transport_for(tenant)


def _unknown_kind(kind: str) -> Response:
    return toolkit.error_response(404, "unknown_kind",
                                  f"no message kind {kind!r} (one of {', '.join(tpl.KINDS)})")


def _invalid(exc: TemplateError, status: int = 400, stored: bool = False) -> Response:
    where = "the stored template " if stored else ""
    name = exc.kind if exc.part == "-" else f"{exc.kind}.{exc.part}"  # "-": the whole
    return toolkit.error_response(status, "template_invalid",
                                  f"{where}{name}: {exc.reason}")


def _unavailable(exc: NotifyError) -> Response:
    return toolkit.error_response(503, "unavailable", str(exc))


def _view(kind: str, override: tpl.Templates | None) -> TemplateView:
    d = tpl.default(kind)
    cur = override or d
    cat = prefs.category(kind) or ""
    return TemplateView(kind=kind, category=cat, optional=cat in prefs.OPTIONAL,
                        overridden=override is not None, subject=cur.subject, text=cur.text,
                        html=cur.html, default=TemplateSource(d.subject, d.text, d.html),
                        variables=sorted(tpl.sample(kind)))


def _page(title: str, body: str, status: int = 200) -> Response:
    doc = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
           "<meta name=\"robots\" content=\"noindex\">"
           f"<title>{html.escape(title)}</title></head>\n"
           "<body style=\"font-family: sans-serif; color: #222; max-width: 32em; "
           f"margin: 3em auto;\">\n<h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n")
    return Response(doc.encode(), status, _HTML, list(_PAGE_HEADERS))


class NotifyApi:
    def __init__(self, runtime: Callable[[], Runtime], store: Store, guard: Guard) -> None:
        self.runtime, self.store = runtime, store
        self.guard = guard  # the tenant's token; a buyer key: 403 (tenant-only endpoints)

    def mount(self, router: toolkit.Router) -> None:
        def add(method: str, path: str, handler: TenantHandler,
                body_limit: int = 64 * 1024) -> None:
            router.add(method, path, self.guard.route(BY_KEY[(method, path)], handler),
                       body_limit=body_limit)

        base = "/v1/notify/templates"
        add("GET", base, self.list_templates)
        add("GET", base + "/{kind}", self.get_template)
        add("PUT", base + "/{kind}", self.put_template, body_limit=TEMPLATE_BODY_LIMIT)
        add("DELETE", base + "/{kind}", self.delete_template)
        add("POST", base + "/{kind}/preview", self.preview, body_limit=TEMPLATE_BODY_LIMIT)
        add("POST", base + "/{kind}/test", self.test_send)
        add("GET", "/v1/notify/preferences", self.get_preferences)
        add("PUT", "/v1/notify/preferences", self.put_preferences)
        router.add("GET", prefs.UNSUBSCRIBE_PATH, self.unsubscribe_page)
        router.add("POST", prefs.UNSUBSCRIBE_PATH, self.unsubscribe,
                   body_limit=UNSUBSCRIBE_BODY_LIMIT)

    # ---- templates --------------------------------------------------------------------------

    async def list_templates(self, req: Request, tenant: str) -> Response:
        mine = await overrides.overridden(self.store.redis, tenant)
        out = []
        for kind in tpl.KINDS:
            cat = prefs.category(kind) or ""
            out.append(TemplateSummary(kind, cat, cat in prefs.OPTIONAL, kind in mine))
        return toolkit.json_response(TemplateList(out))

    async def get_template(self, req: Request, tenant: str) -> Response:
        kind = req.params["kind"]
        if kind not in tpl.KINDS:
            return _unknown_kind(kind)
        return toolkit.json_response(
            _view(kind, await overrides.get(self.store.redis, tenant, kind)))

    async def put_template(self, req: Request, tenant: str) -> Response:
        kind = req.params["kind"]
        if kind not in tpl.KINDS:
            return _unknown_kind(kind)
        try:
            body: TemplateBody = decode_body(req, _template)
        except BillingError as exc:
            return toolkit.error_response(exc.status, exc.code, str(exc))
        candidate = tpl.Templates(body.subject, body.text, body.html)
        try:
            await sandbox.validate(kind, candidate)
        except TemplateError as exc:
            return _invalid(exc)
        except NotifyError as exc:
            return _unavailable(exc)
        await overrides.put(self.store.redis, tenant, kind, candidate)
        return toolkit.json_response(_view(kind, candidate))

    async def delete_template(self, req: Request, tenant: str) -> Response:
        kind = req.params["kind"]
        if kind not in tpl.KINDS:
            return _unknown_kind(kind)
        await overrides.delete(self.store.redis, tenant, kind)
        return toolkit.json_response(_view(kind, None))

    async def preview(self, req: Request, tenant: str) -> Response:
        kind = req.params["kind"]
        if kind not in tpl.KINDS:
            return _unknown_kind(kind)
        body = PreviewBody()
        if req.body:
            try:
                body = decode_body(req, _preview)
            except BillingError as exc:
                return toolkit.error_response(exc.status, exc.code, str(exc))
        stored = await overrides.get(self.store.redis, tenant, kind)
        cur = stored or tpl.default(kind)
        candidate = tpl.Templates(
            cur.subject if body.subject is msgspec.UNSET else body.subject,
            cur.text if body.text is msgspec.UNSET else body.text,
            cur.html if body.html is msgspec.UNSET else body.html)
        given = candidate != cur
        try:
            if given or stored is not None:  # the tenant's templates: in the child
                done = await sandbox.validate(kind, candidate)
            else:
                done = tpl.validate(kind, cur.subject, cur.text, cur.html)
        except TemplateError as exc:
            return _invalid(exc) if given else _invalid(exc, 409, stored=True)
        except NotifyError as exc:
            return _unavailable(exc)
        return toolkit.json_response(RenderedMessage(done.subject, done.text, done.html))

    async def test_send(self, req: Request, tenant: str) -> Response:
        kind = req.params["kind"]
        if kind not in tpl.KINDS:
            return _unknown_kind(kind)
        rt = self.runtime()
        t = rt.cfg.tenant(tenant)
        try:
            sender = transport(t)
        except NotifyError as exc:  # e.g. a SendGrid key whose variable is unset now
            return toolkit.error_response(409, "no_transport",
                                          f"the tenant's mail transport cannot start: {exc}")
        if sender is None:
            return toolkit.error_response(
                409, "no_transport", "the tenant has no mail transport "
                "([tenants.notify.smtp] or [tenants.notify.sendgrid])")
        to = list(dict.fromkeys(t.notify.operators))
        if not to:
            return toolkit.error_response(
                409, "no_operator_address",
                "the tenant has no address of its own ([tenants.notify] operators)")
        redis = self.store.redis
        data = await contexts(redis, tenant, kind, tpl.sample(kind), to,
                              public_url=rt.cfg.settings.public_url)
        stored = await overrides.get(redis, tenant, kind)
        try:
            if stored is not None:
                mail = await sandbox.render(kind, stored, data)
            else:
                mail = [tpl.render(kind, c) for c in data]
        except TemplateError as exc:
            return _invalid(exc, 409, stored=True)
        except NotifyError as exc:
            return _unavailable(exc)
        run = secrets.token_hex(8)  # the Message-ID: a new one for each test
        sent = 0
        try:
            for address, message in zip(to, mail, strict=True):
                try:
                    await sender.send(address, message, key=f"test.{run}.{sent}")
                except NotifyError as exc:
                    return toolkit.error_response(
                        502, "send_failed",
                        f"sent to {sent} of {len(to)}; the tenant's mail server: {exc}")
                sent += 1
        finally:
            await sender.close()
        return toolkit.json_response(SampleSent(sent, to))

    # ---- preferences ------------------------------------------------------------------------

    @staticmethod
    def _address(value: str | None) -> str | None:
        address = (value or "").strip().lower()
        return address if valid_address(address) else None

    async def get_preferences(self, req: Request, tenant: str) -> Response:
        address = self._address(req.query.get("address"))
        if address is None:
            return toolkit.error_response(400, "invalid_address",
                                          "address: an e-mail address is required")
        found = await prefs.preferences(self.store.redis, tenant, address)
        return toolkit.json_response(Preferences(address, found))

    async def put_preferences(self, req: Request, tenant: str) -> Response:
        try:
            body: PreferencesBody = decode_body(req, _prefs)
        except BillingError as exc:
            return toolkit.error_response(exc.status, exc.code, str(exc))
        address = self._address(body.address)
        if address is None:
            return toolkit.error_response(400, "invalid_address",
                                          "address: not an e-mail address")
        try:
            found = await prefs.set_preferences(self.store.redis, tenant, address,
                                                body.categories)
        except prefs.UnknownCategory as exc:
            return toolkit.error_response(400, "unknown_category", str(exc))
        return toolkit.json_response(Preferences(address, found))

    # ---- unsubscribe (no bearer token: the link's own) -----------------------------------

    async def _verified(self, token: str) -> prefs.Unsubscribe | None:
        tenants = [t.id for t in self.runtime().cfg.tenants]
        return await prefs.verify(self.store.redis, token, tenants)

    def _names(self, found: prefs.Unsubscribe) -> tuple[str, str]:
        t = next((t for t in self.runtime().cfg.tenants if t.id == found.tenant), None)
        name = found.tenant if t is None else t.name or t.id
        return html.escape(name), html.escape(_LABELS.get(found.category, found.category))

    async def unsubscribe_page(self, req: Request) -> Response:
        """GET: what the link turns off, and a button; nothing changes (mail scanners and
        link previews follow links)."""
        token = req.query.get("t", "")
        found = await self._verified(token)
        if found is None:
            return _invalid_token()
        sender, what = self._names(found)
        return _page("Unsubscribe", (
            f"<p>Stop receiving {what} from {sender} at this address?</p>\n"
            "<form method=\"post\">"
            f"<input type=\"hidden\" name=\"t\" value=\"{html.escape(token)}\">"
            "<button type=\"submit\">Unsubscribe</button></form>"))

    async def unsubscribe(self, req: Request) -> Response:
        """POST: the page's form, or a mail client's one-click POST (RFC 8058,
        ``List-Unsubscribe=One-Click``): the token is the query's ``t`` (or the form's)."""
        token = req.query.get("t")
        if token is None and req.content_type == "application/x-www-form-urlencoded":
            try:
                token = toolkit.parse_form(req.body).get("t")
            except ValueError:
                token = None
        found = await self._verified(token or "")
        if found is None:
            return _invalid_token()
        await prefs.unsubscribe(self.store.redis, found)
        sender, what = self._names(found)
        return _page("Unsubscribed", f"<p>This address no longer receives {what} from "
                                     f"{sender}.</p>")


def _invalid_token() -> Response:
    return toolkit.error_response(400, "invalid_token",
                                  "this unsubscribe link is not valid (changed, or too old)")

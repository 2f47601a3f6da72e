"""The ASGI application: lead ingest on the hot path, the accounts API beside it.

``POST /v1/leads`` is matched before anything else and handled without a router or
middleware; every other endpoint goes through :class:`engine.api.toolkit.Router`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import msgspec

from billing.archive import Archive
from engine.api import endpoints, toolkit
from engine.api.accounts import AccountsApi
from engine.api.auth import ACT_AS, Guard
from engine.api.docs import ApiDocs
from engine.api.notify import NotifyApi
from engine.api.portal import PortalApi
from engine.api.schemas import Health, Readiness, ReadyChecks
from engine.api.toolkit import Receive, Request, Response, Scope, Send
from engine.core.errors import StoreUnavailable
from engine.core.untrusted import JSON_ERRORS, json_problem
from engine.identity.store import IdentityStore, Principal
from engine.ingest.batcher import Batcher
from engine.ingest.codes import Codes, LeadResponse, error
from engine.ingest.ingest import Ingest, LeadObserver
from engine.ingest.pingpost import BidObserver, PingObserver, PingPost
from engine.obs.metrics import registry_for_process, render
from engine.routing.runtime import Runtime
from engine.store.store import UNAVAILABLE, Store

if TYPE_CHECKING:
    from engine.ingest.waterfall import SyncRouter

_lead_enc = msgspec.json.Encoder()
_FORM = "application/x-www-form-urlencoded"
_JSON_TYPES = ("application/json", "", "text/plain")
# what a batch may be labelled: the NDJSON types, the JSON/text ones, and what curl and
# most HTTP clients put on a raw body by default (octet-stream, form); the body is read as
# NDJSON whatever the label, so a form body only yields ERROR lines. Anything else: 415.
_NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json", "",
                 "text/plain", "application/octet-stream", _FORM)
MAX_BATCH_LINES = 10_000
_ALIVE = Health()

HttpObserver = Callable[[str, int, float], None]  # route, status, seconds
AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]  # any ASGI app (Starlette's types too)
PORTAL = "/portal"  # the prefix served by the portal's own ASGI app (engine.portal)


class App:
    def __init__(
        self,
        runtime: Runtime,
        store: Store,
        *,
        max_body: int = 64 * 1024,
        max_batch_body: int = 8 * 1024 * 1024,
        batch_max: int = 64,
        batch_inflight: int = 2,
        replay_window_s: int = 60,
        idempotency_ttl_s: int = 86_400,
        http_observer: HttpObserver | None = None,
        lead_observer: LeadObserver | None = None,
        batch_observer: Any = None,
        sync: SyncRouter | None = None,
        before_scrape: Callable[[], None] | None = None,
        archive: Archive | None = None,
        identity: IdentityStore | None = None,
        invite_ttl_hours: int = 72,
        ping_observer: PingObserver | None = None,
        bid_observer: BidObserver | None = None,
    ) -> None:
        self.runtime, self.store = runtime, store
        self.max_body, self.max_batch_body = max_body, max_batch_body
        self.batch_max, self.batch_observer = batch_max, batch_observer
        self.batch_inflight = batch_inflight
        self.http_observer = http_observer
        # folds what the observers tallied into the metrics (engine.obs.telemetry.fold), on
        # the loop, before /metrics renders them in a thread
        self.before_scrape = before_scrape
        self.batchers: dict[str, Batcher] = {}
        self.registry = registry_for_process()
        self.ready = False
        self.draining = False
        self.failed_workers: list[str] = []  # in-process workers that died
        # the SQL ledger archive, opened by the service before the app is built (None:
        # not available): GET /ledger pages on into it past the entries still in Redis
        self.archive = archive
        # portal users and buyer API keys (SQL), opened by the service (None: not available:
        # buyer keys and the portal endpoints answer 503, the tenant token works as ever)
        self.identity = identity
        # who calls a tenant endpoint: its token, or a buyer key for its mapped accounts
        self.guard = Guard(lambda: self.runtime, lambda: self.identity)
        self.ingest = Ingest(
            lambda: self.runtime,
            self.batcher,
            replay_window_s=replay_window_s,
            idempotency_ttl_s=idempotency_ttl_s,
            observer=lead_observer,
            sync=sync,
        )
        self.pingpost = PingPost(lambda: self.runtime, store, self.batcher, self.ingest, sync,
                                 observer=ping_observer, bids=bid_observer)
        # the browser portal (an ASGI app of its own, engine.portal), set by the service:
        # requests under /portal go to it whole; None: /portal is no endpoint (404)
        self.portal: AsgiApp | None = None
        self.router = toolkit.Router(declared=endpoints.BY_KEY)
        # POST /v1/leads is served before routing (see __call__); listed so GET gets a 405
        self.router.add("POST", "/v1/leads", self._lead_routed, body_limit=max_body,
                        too_large=_lead_too_large)
        self.router.add("POST", "/v1/leads/batch", self._batch, body_limit=max_batch_body,
                        too_large=_lead_too_large)
        self.router.add("POST", "/v1/ping", self._ping, body_limit=max_body,
                        too_large=_lead_too_large)
        self.router.add("POST", "/v1/post", self._post, body_limit=max_body,
                        too_large=_lead_too_large)
        self.router.add("GET", "/healthz", self._healthz)
        self.router.add("GET", "/readyz", self._readyz)
        self.router.add("GET", "/metrics", self._metrics)
        self.docs = ApiDocs()
        self.router.add("GET", "/openapi.json", self.docs.openapi)
        self.router.add("GET", "/docs", self.docs.page)
        self.router.add("GET", "/docs/static/{file}", self.docs.static)
        AccountsApi(lambda: self.runtime, store, lambda: self.archive,
                    guard=self.guard).mount(self.router)
        NotifyApi(lambda: self.runtime, store, self.guard).mount(self.router)
        PortalApi(lambda: self.runtime, lambda: self.identity, self.guard,
                  invite_ttl_hours=invite_ttl_hours).mount(self.router)

    def batcher(self, tenant: str) -> Batcher:
        b = self.batchers.get(tenant)
        if b is None:
            b = self.batchers[tenant] = Batcher(
                self.store, tenant, max_batch=self.batch_max, max_inflight=self.batch_inflight,
                observer=self.batch_observer,
            )
        return b

    def add_route(self, method: str, path: str, handler: toolkit.Handler, **kw: Any) -> None:
        self.router.add(method, path, handler, **kw)

    def add_tenant_route(self, method: str, path: str, handler: toolkit.Handler) -> None:
        """A tenant endpoint of the route table behind the guard (engine.api.auth): the
        tenant's token, or a buyer key where the table allows one."""

        async def with_tenant(req: Request, tenant: str) -> Response:
            return await handler(req)

        self.router.add(method, path, self.guard.route(endpoints.BY_KEY[(method, path)],
                                                       with_tenant))

    def unmounted(self) -> list[tuple[str, str]]:
        """Routes of the table (engine.api.endpoints) the router does not serve yet."""
        served = set(self.router.routes())
        return [e.key for e in endpoints.ENDPOINTS if e.key not in served]

    async def drain(self) -> None:
        """Let every pending decision finish (SIGTERM): nothing is left half-charged."""
        self.draining = True
        await asyncio.gather(*(b.drain() for b in self.batchers.values()))

    # ---- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await toolkit.lifespan(receive, send)
            return
        started = time.perf_counter()
        try:
            if scope["path"] == "/v1/leads" and scope["method"] == "POST":
                route, resp = "/v1/leads", await self._lead(scope, receive)
            elif self.portal is not None and _is_portal(scope["path"]):
                await self._portal(self.portal, scope, receive, send, started)
                return
            else:
                route, resp = await self._routed(scope, receive)
        except toolkit.ClientGone:  # no body, no decision, nobody to answer
            return
        await resp.send(send)
        if self.http_observer is not None:
            self.http_observer(route, resp.status, time.perf_counter() - started)

    async def _portal(self, portal: AsgiApp, scope: Scope, receive: Receive, send: Send,
                      started: float) -> None:
        """The portal's app answers itself (its status is seen on the way out, for the
        request metrics: one route label, ``/portal``)."""
        status = 500

        async def sending(message: toolkit.Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await portal(scope, receive, sending)
        if self.http_observer is not None:
            self.http_observer(PORTAL, status, time.perf_counter() - started)

    async def call_as(self, principal: Principal, method: str, path: str, *,
                      query: str = "", body: bytes = b"") -> Response:
        """An endpoint of the route table called in this process for ``principal`` (the
        portal's session user): the same guard (what a buyer reaches, its audit rows, the
        ledger's ``user``), the same handler, the same answer as a buyer key would get.
        ``path`` is the raw path (parameters percent-encoded); a body is JSON."""
        raw = path.encode("ascii")
        scope: Scope = {
            "type": "http", "method": method, "path": unquote(path), "raw_path": raw,
            "query_string": query.encode("ascii"),
            "headers": [(b"content-type", b"application/json")] if body else [],
            ACT_AS: principal,
        }
        route, params, _ = self.router.match(method, scope["path"], raw)
        if route is None:
            return toolkit.error_response(404, "not_found", "no such endpoint")
        try:
            return await route.handler(Request(scope, body, params))
        except (StoreUnavailable, *UNAVAILABLE):
            return toolkit.error_response(503, "unavailable", "storage unavailable")

    async def _routed(self, scope: Scope, receive: Receive) -> tuple[str, Response]:
        path, raw_path = scope["path"], scope.get("raw_path")
        route, params, path_exists = self.router.match(scope["method"], path, raw_path)
        if route is None:
            if not path_exists:
                return "unmatched", toolkit.error_response(404, "not_found", "no such endpoint")
            resp = toolkit.error_response(405, "method_not_allowed", "no such endpoint")
            # RFC 9110: a 405 names the methods the path has
            resp.extra_headers.append(
                (b"allow", ", ".join(self.router.allowed(path, raw_path)).encode()))
            return "unmatched", resp
        try:
            body = await toolkit.read_body(receive, route.body_limit)
        except toolkit.BodyTooLarge:
            return route.name, route.too_large(route.body_limit)
        try:
            return route.name, await route.handler(Request(scope, body, params))
        except (StoreUnavailable, *UNAVAILABLE):  # also reads made with redis-py directly
            return route.name, toolkit.error_response(503, "unavailable", "storage unavailable")

    # ---- leads --------------------------------------------------------------------------

    async def _lead(self, scope: Scope, receive: Receive) -> Response:
        try:
            body = await toolkit.read_body(receive, self.max_body)
        except toolkit.BodyTooLarge:
            return _lead_too_large(self.max_body)
        ctype, key = b"", None
        for name, value in scope["headers"]:  # two headers matter: skip building a dict
            if name == b"content-type":
                ctype = value
            elif name == b"idempotency-key":
                key = value.decode("latin-1")
        return await self._lead_body(toolkit.media_type(ctype), body, key)

    async def _lead_routed(self, req: Request) -> Response:
        return await self._lead_body(req.content_type, req.body, req.header(b"idempotency-key"))

    async def _lead_body(self, content_type: str, body: bytes, key: str | None) -> Response:
        data, problem = _decode_lead(content_type, body)
        if problem is not None:
            return _lead_response(*problem)
        return _lead_response(*await self._decide(data, body, key))

    async def _decide(self, data: object, raw: bytes, key: str | None) -> tuple[int, LeadResponse]:
        try:
            return await self.ingest.handle(data, raw, key)
        except StoreUnavailable as exc:
            return _unavailable(exc)

    # ---- ping-post (engine.ingest.pingpost) ----------------------------------------------

    async def _ping(self, req: Request) -> Response:
        data, problem = _decode_lead(req.content_type, req.body)
        if problem is not None:
            return _lead_response(*problem)
        try:
            status, resp = await self.pingpost.ping(data, req.body,
                                                    req.header(b"idempotency-key"))
        except StoreUnavailable as exc:
            return _lead_response(*_unavailable(exc))
        return Response(_lead_enc.encode(resp), status)

    async def _post(self, req: Request) -> Response:
        data, problem = _decode_lead(req.content_type, req.body)
        if problem is not None:
            return _lead_response(*problem)
        try:
            return _lead_response(*await self.pingpost.post(
                data, req.body, req.header(b"idempotency-key")))
        except StoreUnavailable as exc:
            return _lead_response(*_unavailable(exc))

    async def _batch(self, req: Request) -> Response:
        """NDJSON in, NDJSON out: one result per non-blank line, in order, each lead on its
        own. Lines end at "\n" only (a "\r" before it is dropped): U+2028 and the other
        separators str.splitlines() knows are legal inside JSON strings. The body is split
        as bytes and each line decoded on its own, so a line that is not UTF-8 is one ERROR
        line (it used to refuse the whole batch). No line, no result: an empty body."""
        if req.content_type not in _NDJSON_TYPES:
            return _lead_response(415, error(
                Codes.UNSUPPORTED_MEDIA, "send application/x-ndjson (one JSON lead per line)"))
        lines = [line.removesuffix(b"\r") for line in req.body.split(b"\n")]
        if len(lines) > MAX_BATCH_LINES + 1 or (len(lines) == MAX_BATCH_LINES + 1 and lines[-1]):
            return _lead_response(413, error(Codes.TOO_LARGE, f"at most {MAX_BATCH_LINES} lines"))
        key = req.header(b"idempotency-key")
        results: list[tuple[int, LeadResponse] | None] = []
        leads: list[tuple[object, bytes, str | None]] = []
        for line in lines:
            if line.strip():  # blank: ASCII whitespace only (space, tab, ...)
                refused = self._batch_line(line, key, leads)
                results.append(refused)
        decided = iter(await self.ingest.handle_many(leads))
        out = [r if r is not None else _unavailable(next(decided)) for r in results]
        if not out:
            return Response(b"", 200, b"application/x-ndjson")
        body = b"\n".join(_lead_enc.encode(r) for _, r in out) + b"\n"
        return Response(body, 200, b"application/x-ndjson")

    def _batch_line(self, raw: bytes, key: str | None,
                    leads: list[tuple[object, bytes, str | None]]
                    ) -> tuple[int, LeadResponse] | None:
        """A line's refusal, or None with the lead added to ``leads``."""
        if len(raw) > self.max_body:  # the single-lead limit applies to each line
            return 413, error(Codes.TOO_LARGE, f"line over {self.max_body} bytes")
        try:
            data = msgspec.json.decode(raw)  # strict UTF-8, in strings too
        except JSON_ERRORS as exc:  # RecursionError too: that line only, not a 500
            return 400, error(Codes.MALFORMED,
                              json_problem(exc, "this line is not a UTF-8 JSON object"))
        if key:  # one batch key names each of its leads by content, never by position
            key = f"{key}\x00{hashlib.blake2b(raw, digest_size=16).hexdigest()}"
        leads.append((data, raw, key))
        return None

    # ---- health -------------------------------------------------------------------------

    async def _healthz(self, req: Request) -> Response:
        return toolkit.json_response(_ALIVE)

    async def _metrics(self, req: Request) -> Response:
        if self.before_scrape is not None:
            self.before_scrape()
        body, ctype = await asyncio.to_thread(render, self.registry, req.header(b"accept"))
        return Response(body, 200, ctype.encode())

    async def _readyz(self, req: Request) -> Response:
        try:
            redis = bool(await self.store.redis.ping())
        except Exception:  # noqa: BLE001 - any failure means not ready
            redis = False
        checks = ReadyChecks(config=True, scripts=self.ready, redis=redis,
                             draining=self.draining, failed_workers=self.failed_workers)
        ok = redis and self.ready and not self.draining and not self.failed_workers
        return toolkit.json_response(
            Readiness("ready" if ok else "not_ready", checks), 200 if ok else 503)


def _is_portal(path: str) -> bool:
    """``/portal`` and what is under it (not ``/portalx``)."""
    return path.startswith(PORTAL) and (len(path) == len(PORTAL) or path[len(PORTAL)] == "/")


def _decode_lead(content_type: str, body: bytes) -> tuple[object, tuple[int, LeadResponse] | None]:
    if content_type == _FORM:
        try:
            return toolkit.parse_form(body), None
        except toolkit.TooManyFields:
            return None, (400, error(Codes.TOO_MANY_FIELDS, "too many form fields"))
        except ValueError:
            return None, (400, error(Codes.MALFORMED, "form body is not valid UTF-8 form data"))
    if content_type not in _JSON_TYPES:
        return None, (
            415,
            error(
                Codes.UNSUPPORTED_MEDIA,
                "send application/json or application/x-www-form-urlencoded",
            ),
        )
    try:
        return msgspec.json.decode(body), None
    except JSON_ERRORS as exc:  # invalid UTF-8 inside a string; nested too deeply
        return None, (400, error(Codes.MALFORMED,
                                 json_problem(exc, "the body is not valid UTF-8 JSON")))


def _unavailable(result: tuple[int, LeadResponse] | Exception) -> tuple[int, LeadResponse]:
    """A decision, or the 503 of one that failed because Redis is unreachable (any other
    failure is raised: a bug must not pass for an outage)."""
    if not isinstance(result, Exception):
        return result
    if isinstance(result, StoreUnavailable):
        return 503, error(Codes.UNAVAILABLE,
                          "storage unavailable; retry with the same payload or "
                          "Idempotency-Key: a lead is never charged twice")
    raise result


def _lead_too_large(limit: int) -> Response:
    return _lead_response(413, error(Codes.TOO_LARGE, f"body over {limit} bytes"))


def _lead_response(status: int, resp: LeadResponse) -> Response:
    return Response(_lead_enc.encode(resp), status)

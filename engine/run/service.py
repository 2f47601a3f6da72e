"""Running leadflow: Redis (embedded or given), the HTTP server, workers, signals.

SIGTERM drains: the server stops accepting, in-flight requests and pending Redis batches
finish, then workers stop. SIGHUP reloads the config file.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvicorn

from billing.archive import Archive
from billing.context import BillingContext
from billing.leads import LeadArchive
from billing.stripe_gateway import gateway_from_env
from engine.api.app import App
from engine.api.billing import routes as billing_routes
from engine.api.server import Limits, Server, protocol_for
from engine.core.config import Config, Settings
from engine.core.constants import WALLET, archive_path
from engine.core.errors import ConfigError, EmbeddedRedisError, LeadflowError
from engine.delivery import client
from engine.delivery.worker import WorkerOptions
from engine.identity.store import IdentityStore
from engine.ingest.waterfall import SyncRouter
from engine.obs import telemetry
from engine.obs.metrics import (
    BalanceCollector,
    blocking_redis_client,
    redis_balance_source,
    start_worker_metrics_server,
)
from engine.portal import web as portal_web
from engine.routing.runtime import Runtime
from engine.run import configfile
from engine.run.pidfile import EngineState, PidFile, config_path, read_running
from engine.run.provision import provision_accounts
from engine.run.workers import REGISTRY, Crew, WorkerContext, WorkerFn
from engine.store.embedded import EmbeddedRedis
from engine.store.store import Store, connect, pool_size

log = logging.getLogger("leadflow")



def _decide_observer(seconds: float, events: Any, debited: list[str]) -> None:
    telemetry.script_observer("decide", seconds, events)
    if debited:
        telemetry.money_observer("lead", -int(debited[0]))
        telemetry.money_observer("fee", -int(debited[1]))


def tune_gc() -> None:
    """Move everything alive after start-up (config, plans, modules) out of the collector's
    reach and collect young objects less often: full collections over start-up objects were
    the main source of p99 latency spikes under load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


def redis_url_from(cfg: Config, override: str | None) -> str | None:
    return override or os.environ.get("LEADFLOW_REDIS_URL") or cfg.settings.redis_url


async def _monitor(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """Redis liveness and stream lag gauges of the config's tenants (engine.obs.telemetry)."""
    await telemetry.monitor(ctx.store.redis, ctx.tenants(), stop)


# read from the config in force at each use, so a reload changes them at once
_RELOADED_SETTINGS = frozenset({"public_url"})


def _changed_settings(old: Settings, new: Settings) -> list[str]:
    """Names of the ``[settings]`` that differ: the server, Redis and batching are set up
    once, at start (not those in ``_RELOADED_SETTINGS``)."""
    return [f for f in Settings.__struct_fields__
            if f not in _RELOADED_SETTINGS and getattr(old, f) != getattr(new, f)]


@dataclass(frozen=True)
class Parts:
    """What a running service is made of, built by :meth:`Service.start` in this order;
    each one's teardown is registered as it is made, so :meth:`Service.stop` closes them
    in reverse: the server (in-flight requests finish), the app's pending Redis batches,
    the reloads under way, the workers, the sync router, the HTTP session, the archive,
    the balance export, the Redis client, the embedded redis-server."""

    embedded: EmbeddedRedis | None  # None: Redis was given by URL
    redis_url: str  # the Redis in use: the given one or the embedded server's
    store: Store
    exports: ExitStack  # what export_balances() registered (closed before Redis)
    archive: Archive | None  # None: it could not be opened (the API answers 503)
    http: aiohttp.ClientSession
    sync: SyncRouter
    billing: BillingContext
    app: App
    crew: Crew  # the in-process workers (and the stream monitor)
    server: Server | None  # None: started with serve=False


class Service:
    def __init__(
        self,
        cfg: Config,
        *,
        redis_url: str | None = None,
        host: str | None = None,
        port: int | None = None,
        state_dir: str | None = None,
        workers: list[WorkerFn] | None = None,
    ) -> None:
        self.cfg = cfg
        self.redis_url = redis_url_from(cfg, redis_url)
        self.host = host or cfg.settings.host
        self.port = cfg.settings.port if port is None else port
        self.state_dir = Path(state_dir or cfg.settings.state_dir)
        self.worker_factories = workers or []
        self._parts: Parts | None = None  # set once start() has built every part
        self._stack = AsyncExitStack()  # the teardown of what start() opened, closed by stop()
        self._reloading = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self.stop_event = asyncio.Event()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"  # stream consumer name

    # ---- the parts, while running -----------------------------------------------------

    def _running(self) -> Parts:
        if self._parts is None:
            raise LeadflowError("the service is not running")
        return self._parts

    @property
    def embedded(self) -> EmbeddedRedis | None:
        """The embedded redis-server, None when Redis was given by URL."""
        return self._running().embedded

    @property
    def store(self) -> Store:
        return self._running().store

    @property
    def app(self) -> App:
        return self._running().app

    @property
    def billing(self) -> BillingContext:
        return self._running().billing

    @property
    def sync(self) -> SyncRouter:
        return self._running().sync

    @property
    def crew(self) -> Crew:
        return self._running().crew

    @property
    def http(self) -> aiohttp.ClientSession | None:
        """The process's one client session while running; None before start and once
        stopped (it is closed then)."""
        return self._parts.http if self._parts is not None else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- start and stop ---------------------------------------------------------------

    async def start(self, *, serve: bool = True) -> None:
        """Build the parts (:class:`Parts`), each one's teardown registered as it is made:
        a start that fails half-way leaves what it opened to :meth:`stop`, which closes
        exactly that, in reverse."""
        if self._parts is not None:
            raise LeadflowError("the service is already running")
        stack = self._stack
        sock: socket.socket | None = None
        if serve:  # first: a port in use fails here, before Redis or any worker starts
            sock = _listen(self.host, self.port)
            stack.callback(sock.close)  # uvicorn closes it once it served; else it is ours
            self.port = sock.getsockname()[1]
        # before any worker runs: the ledger worker's SQLite archive lives here
        self.state_dir.mkdir(parents=True, exist_ok=True)
        embedded, url = await self._redis(stack)
        s = self.cfg.settings
        store = Store(connect(url, max_connections=pool_size(s.max_connections)),
                      observer=telemetry.money_observer,
                      events_observer=telemetry.events_observer)
        stack.push_async_callback(store.redis.aclose)
        await store.load_scripts()
        await provision_accounts(self.cfg, store)
        exports = ExitStack()
        stack.callback(exports.close)
        archive = await self._open_archive()
        if archive is not None:
            stack.push_async_callback(archive.close)
        identity = await self._open_identity()
        if identity is not None:
            stack.push_async_callback(identity.close)
        leads = await self._open_leads(stack)
        # the process's one HTTP client session (connection pool and limits), shared by
        # sync-mode deliveries and an in-process delivery worker; closed after the workers
        lanes = WorkerOptions()  # the worker's connections; sync tries get a reserve
        http = client.new_session(limit=lanes.connector_limit + client.SYNC_RESERVE,
                                  limit_per_host=lanes.limit_per_host + client.SYNC_RESERVE)
        stack.push_async_callback(http.close)
        sync = SyncRouter(store, session=http, observer=telemetry.delivery_observer)
        stack.push_async_callback(sync.close)  # after the last request and worker
        billing = BillingContext(self.cfg, store, gateway_from_env(), archive=archive,
                                 leads=leads, observer=telemetry.recharge_observer)
        app = App(
            Runtime(self.cfg),
            store,
            max_body=s.max_body_bytes,
            max_batch_body=s.max_batch_body_bytes,
            batch_max=s.batch_max,
            batch_inflight=s.batch_inflight,
            replay_window_s=s.replay_window_s,
            idempotency_ttl_s=s.idempotency_ttl_s,
            http_observer=telemetry.http_observer,
            lead_observer=telemetry.lead_observer,
            before_scrape=telemetry.fold,
            batch_observer=_decide_observer,
            sync=sync,
            archive=archive,
            identity=identity,
            invite_ttl_hours=s.invite_ttl_hours,
            ping_observer=telemetry.ping_observer,
            bid_observer=telemetry.bid_observer,
        )
        stack.push_async_callback(app.pingpost.close)
        _mount_billing(app, billing)
        # the browser portal under /portal (engine.portal), acting through the app's API
        app.portal = portal_web.build(app, billing, lambda: self.cfg)
        missing = app.unmounted()
        if missing:  # the OpenAPI document would describe an endpoint nobody serves
            raise LeadflowError(f"declared but not mounted: {missing}")
        context = WorkerContext(config=lambda: self.cfg, store=store, consumer=self.consumer,
                                state_dir=self.state_dir, http=http, billing=billing)
        # a worker that dies says so on /readyz until the process is restarted
        crew = Crew(context, [_monitor, *self.worker_factories], app.failed_workers.append)
        crew.start()
        stack.push_async_callback(crew.stop)
        stack.push_async_callback(self._end_reloads)  # before the workers stop
        app.ready = True
        stack.push_async_callback(app.drain)  # once no request comes: pending batches
        server = None if sock is None else await self._serve(app, sock, stack)
        self._parts = Parts(embedded=embedded, redis_url=url, store=store, exports=exports,
                            archive=archive, http=http, sync=sync, billing=billing, app=app,
                            crew=crew, server=server)
        if serve:
            tune_gc()

    async def _redis(self, stack: AsyncExitStack) -> tuple[EmbeddedRedis | None, str]:
        """The Redis to use: the given URL, else an embedded redis-server started here."""
        if self.redis_url is not None:
            return None, self.redis_url
        embedded = EmbeddedRedis(self.state_dir / "redis",
                                 appendfsync=self.cfg.settings.appendfsync)
        stack.push_async_callback(asyncio.to_thread, embedded.stop)  # stopped even half-started
        try:
            await asyncio.to_thread(embedded.start)
        except EmbeddedRedisError as exc:
            raise EmbeddedRedisError(_embedded_taken(exc, self.state_dir)) from None
        log.info("embedded redis-server started", extra={"port": embedded.port})
        return embedded, embedded.url

    async def _open_archive(self) -> Archive | None:
        """The SQL ledger archive the ledger worker fills (``sql_url``, else the SQLite file
        in the state directory), for the transactions API: its own connection, read-only
        use. None, with a warning, when it cannot be opened (the API then answers 503)."""
        try:
            return await Archive.open(self.cfg.settings.sql_url,
                                      path=str(archive_path(self.state_dir)))
        except Exception as exc:  # noqa: BLE001 - the engine runs without the archive API
            log.warning("ledger archive not available to the API",
                        extra={"reason": type(exc).__name__})
            return None

    async def _open_leads(self, stack: AsyncExitStack) -> LeadArchive | None:
        """The lead archive the leads worker fills (billing.leads), for the portal's Leads
        and Analytics pages: its own connection, closed with ``stack``. None, with a
        warning, when it cannot be opened (those pages then answer 503)."""
        try:
            leads = await LeadArchive.open(self.cfg.settings.sql_url,
                                           path=str(archive_path(self.state_dir)))
            stack.push_async_callback(leads.close)
            return leads
        except Exception as exc:  # noqa: BLE001 - the engine runs without the lead pages
            log.warning("lead archive not available to the portal",
                        extra={"reason": type(exc).__name__})
            return None

    async def _open_identity(self) -> IdentityStore | None:
        """Portal users and buyer API keys (engine.identity), in the same SQL database as the
        ledger archive. None, with a warning, when it cannot be opened: buyer keys and the
        portal endpoints then answer 503; the tenant's token works as ever."""
        try:
            return await IdentityStore.open(self.cfg.settings.sql_url,
                                            path=archive_path(self.state_dir),
                                            key_cache_s=self.cfg.settings.api_key_cache_s)
        except Exception as exc:  # noqa: BLE001 - the engine runs without the portal API
            log.warning("identity store not available to the API",
                        extra={"reason": type(exc).__name__})
            return None

    async def _serve(self, app: App, sock: socket.socket, stack: AsyncExitStack) -> Server:
        """uvicorn serving ``app`` on ``sock``, started; its stop (it stops accepting, then
        in-flight requests finish) registered on ``stack``."""
        s = self.cfg.settings
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            http=protocol_for(Limits.of(s)),
            ws="none",
            timeout_keep_alive=s.keepalive_timeout_s,  # type: ignore[arg-type]
            limit_concurrency=s.max_connections,
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,  # uvicorn's records go to our JSON handler (engine/obs/logs.py)
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=30,
            proxy_headers=False,  # no X-Forwarded-* rewriting on the hot path
        )
        server = Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))

        async def stop_serving() -> None:
            server.should_exit = True
            app.draining = True  # /readyz says so while in-flight requests finish
            await task

        stack.push_async_callback(stop_serving)
        while not server.started:
            if task.done():
                raise LeadflowError(f"HTTP server stopped at start on {self.url}")
            await asyncio.sleep(0.01)
        return server

    async def _end_reloads(self) -> None:
        """No reload from now on, and the ones under way finished: a reload finishing
        later must not restart the workers."""
        self.stop_event.set()
        if self._reload_tasks:
            await asyncio.gather(*self._reload_tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Close what :meth:`start` opened, in reverse (see :class:`Parts`): after a start
        that failed half-way, exactly what it had opened. Stopping twice is harmless."""
        stack, self._stack = self._stack, AsyncExitStack()
        try:
            await stack.aclose()
        finally:
            self._parts = None
            await self._end_reloads()  # a start that failed before it started the workers

    async def reload(self, path: str | None = None) -> None:
        """Swap in a new config: accounts provisioned first, then one reference swap, then the
        workers restarted on it. One reload at a time, in the order they were asked for:
        two quick SIGHUPs used to race, and the older file could win."""
        async with self._reloading:
            cfg = configfile.load(path or self.cfg.source)
            parts = self._running()
            await provision_accounts(cfg, parts.store)
            parts.app.runtime = Runtime(cfg)
            parts.billing.config = cfg
            old, self.cfg = self.cfg, cfg
            parts.crew.restart()
            parts.app.failed_workers.clear()  # restarted: /readyz judges the new ones
            log.info("config reloaded", extra={"source": cfg.source})
            changed = _changed_settings(old.settings, cfg.settings)
            if changed:
                log.warning("settings take effect at the next restart",
                            extra={"settings": changed})

    async def run_until_signal(self) -> None:
        """``leadflow run``: serve until SIGTERM/SIGINT; SIGHUP reloads the config. The
        engine's record (engine.run.pidfile) is held from before Redis starts until exit."""
        done, started = asyncio.Event(), asyncio.Event()
        pidfile = PidFile(self.state_dir)
        self.handle_signals(done, started, pidfile)
        record = EngineState(pid=os.getpid(), config=config_path(self.cfg.source))
        pidfile.acquire(record)
        try:
            try:
                await self.start()
                self.export_balances()
            except BaseException:  # what did start (Redis, workers, the socket) stops
                started.set()  # a SIGHUP's reload waiting for the start gives up
                await self.stop()
                raise
            embedded = self.embedded
            if embedded is not None:  # where reconcile and workers find its Redis
                pidfile.write(msgspec.structs.replace(record, redis_url=embedded.url))
            started.set()
            log.info("leadflow serving", extra={"url": self.url})
            await done.wait()
            log.info("draining")
            await self.stop()
            log.info("stopped")
        finally:
            pidfile.release()

    def export_balances(self) -> None:
        """Account balances for Prometheus, read at scrape time only (docs/metrics.md).

        Registered on the app's registry until :meth:`stop` (which unregisters it, so a
        process may start a Service again, as the tests do).
        """
        parts = self._running()
        client = blocking_redis_client(parts.redis_url)
        parts.exports.callback(client.close)

        def accounts() -> list[tuple[str, str]]:
            cfg = self.cfg
            return [(t.id, WALLET) for t in cfg.tenants] + [(c.tenant, c.id) for c in cfg.clients]

        collector = BalanceCollector(redis_balance_source(client, accounts))
        parts.app.registry.register(collector)
        parts.exports.callback(parts.app.registry.unregister, collector)

    def handle_signals(self, done: asyncio.Event, started: asyncio.Event,
                       pidfile: PidFile | None = None) -> None:
        """SIGTERM and SIGINT set ``done``; SIGHUP reloads the config, once ``started`` is
        set (a SIGHUP during start-up is not lost, and does not end the process). Each
        reload's outcome goes to ``pidfile``, the engine's record, if given."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)

        def on_sighup() -> None:
            task = loop.create_task(self._safe_reload(started, pidfile))
            self._reload_tasks.add(task)  # kept until done (and awaited at stop)
            task.add_done_callback(self._reload_tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)

    async def _safe_reload(self, started: asyncio.Event, pidfile: PidFile | None) -> None:
        """A SIGHUP's reload; its outcome goes to the log and the engine's record, where
        ``leadflow config load`` reads it."""
        await started.wait()
        if self._parts is None or self.stop_event.is_set():  # the start failed, or stopping
            return
        error = ""
        try:
            await self.reload()
        except ConfigError as exc:
            error = str(exc)
            log.error("config reload refused: %s", exc)
        except Exception as exc:  # e.g. Redis down mid-provisioning: keep serving
            error = f"reload failed: {type(exc).__name__}"
            log.exception("config reload failed; the previous config stays in force")
        if pidfile is not None and pidfile.state is not None:
            state = pidfile.state
            pidfile.write(msgspec.structs.replace(
                state, reloads=state.reloads + 1, reload_error=error))


def _mount_billing(app: App, billing: BillingContext) -> None:
    """Billing's endpoints, behind the same guard as the accounts API: the tenant's bearer
    token, or a buyer key where the route table allows one (engine.api.auth)."""
    for method, path, handler in billing_routes(billing):
        app.add_tenant_route(method, path, handler)


def _listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound here rather than by uvicorn, whose bind error
    exits the process from inside a task (SystemExit) and could leave it hanging."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as exc:
        raise LeadflowError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise LeadflowError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


def _embedded_taken(exc: EmbeddedRedisError, state_dir: Path) -> str:
    """The refusal of a second embedded redis-server, with the way to join the first."""
    running = [e for e in read_running(state_dir) if e.redis_url]
    if not running:
        return str(exc)
    return (f"{exc}: the engine (pid {running[0].pid}) runs it; join it with --redis-url "
            f"{running[0].redis_url}")


async def run_worker(
    kind: str,
    cfg: Config,
    *,
    redis_url: str | None,
    consumer: str | None,
    metrics_port: int | None,
) -> int:
    """``leadflow worker KIND``: one worker in a process of its own, until SIGTERM."""
    fn = REGISTRY.get(kind)
    if fn is None:
        raise LeadflowError(f"worker {kind!r} is not available in this build")
    svc = Service(cfg, redis_url=redis_url, port=0, workers=[fn])
    if consumer:
        svc.consumer = consumer
    stop, started = asyncio.Event(), asyncio.Event()
    svc.handle_signals(stop, started)  # SIGHUP: the worker restarts on the reloaded config
    if metrics_port is not None:  # on the configured host, as the engine's API is
        host = cfg.settings.host
        server, _ = start_worker_metrics_server(metrics_port, addr=host)
        port = server.server_port  # the one bound: --metrics-port 0 picks a free one
        where = f"[{host}]" if ":" in host else host
        log.info("worker metrics serving", extra={
            "worker": kind, "port": port, "url": f"http://{where}:{port}/metrics"})
    try:
        await svc.start(serve=False)  # a worker serves no API, only its /metrics port
    except BaseException:  # what did start (Redis, the worker) stops
        started.set()  # a SIGHUP's reload waiting for the start gives up
        await svc.stop()
        raise
    failed = svc.crew.failed
    started.set()
    try:
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, failed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    finally:
        await svc.stop()
    return 1 if failed.is_set() else 0

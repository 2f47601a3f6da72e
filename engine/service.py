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
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvicorn

from billing.api import routes as billing_routes
from billing.archive import Archive
from billing.context import BillingContext
from billing.stripe_gateway import gateway_from_env
from engine import configfile, telemetry
from engine.accounts_api import tenant_route
from engine.app import App
from engine.config import Config, Settings
from engine.constants import WALLET, archive_path
from engine.delivery import client
from engine.delivery.worker import WorkerOptions
from engine.embedded import EmbeddedRedis
from engine.errors import ConfigError, EmbeddedRedisError, LeadflowError
from engine.http import Handler, Request, Response
from engine.http_server import Limits, Server, protocol_for
from engine.metrics import (
    BalanceCollector,
    redis_balance_source,
    start_worker_metrics_server,
    sync_redis_client,
)
from engine.pidfile import EngineState, PidFile, config_path, read_running
from engine.runtime import Runtime, sync_accounts
from engine.store import Store, connect, pool_size
from engine.sync_route import SyncRouter
from engine.workers import REGISTRY, Crew, WorkerContext, WorkerFn

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
    """Redis liveness and stream lag gauges of the config's tenants (engine.telemetry)."""
    await telemetry.monitor(ctx.store.redis, ctx.tenants(), stop)


def _changed_settings(old: Settings, new: Settings) -> list[str]:
    """Names of the ``[settings]`` that differ: the server, Redis and batching are set up
    once, at start."""
    return [f for f in Settings.__struct_fields__ if getattr(old, f) != getattr(new, f)]


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
        self.embedded: EmbeddedRedis | None = None
        self.store: Store | None = None
        self.app: App | None = None
        self.billing: BillingContext | None = None
        self.sync: SyncRouter | None = None
        self.http: aiohttp.ClientSession | None = None
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._server_task: asyncio.Task[Any] | None = None
        self._balances: tuple[Any, Any] | None = None  # (collector, its sync Redis client)
        self.crew: Crew | None = None  # the in-process workers (and the stream monitor)
        self._sock: socket.socket | None = None  # the listening socket, bound at start
        self.pidfile: PidFile | None = None  # leadflow run only (run_until_signal)
        self._reloading = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self.stop_event = asyncio.Event()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"  # stream consumer name

    async def start(self, *, serve: bool = True) -> None:
        if serve:  # first: a port in use fails here, before Redis or any worker starts
            self._sock = _listen(self.host, self.port)
            self.port = self._sock.getsockname()[1]
        # before any worker runs: the ledger worker's SQLite archive lives here
        self.state_dir.mkdir(parents=True, exist_ok=True)
        url = self.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(
                self.state_dir / "redis", appendfsync=self.cfg.settings.appendfsync
            )
            try:
                await asyncio.to_thread(self.embedded.start)
            except EmbeddedRedisError as exc:
                raise EmbeddedRedisError(_embedded_taken(exc, self.state_dir)) from None
            url = self.embedded.url
            log.info("embedded redis-server started", extra={"port": self.embedded.port})
        pool = pool_size(self.cfg.settings.max_connections)
        self.store = Store(connect(url, max_connections=pool), observer=telemetry.money_observer,
                           events_observer=telemetry.events_observer)
        await self.store.load_scripts()
        await sync_accounts(self.cfg, self.store)
        s = self.cfg.settings
        # the process's one HTTP client session (connection pool and limits), shared by
        # sync-mode deliveries and an in-process delivery worker; closed at stop
        lanes = WorkerOptions()  # the worker's connections; sync tries get a reserve
        self.http = client.new_session(limit=lanes.connector_limit + client.SYNC_RESERVE,
                                       limit_per_host=lanes.limit_per_host + client.SYNC_RESERVE)
        self.sync = SyncRouter(self.store, session=self.http,
                               observer=telemetry.delivery_observer)
        self.app = App(
            Runtime(self.cfg),
            self.store,
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
            sync=self.sync,
        )
        self.billing = BillingContext(self.cfg, self.store, gateway_from_env(),
                                      archive=await self._open_archive(),
                                      observer=telemetry.recharge_observer)
        self.app.archive = self.billing.archive
        self._mount_billing()
        missing = self.app.unmounted()
        if missing:  # the OpenAPI document would describe an endpoint nobody serves
            raise LeadflowError(f"declared but not mounted: {missing}")
        self.app.ready = True
        context = WorkerContext(config=lambda: self.cfg, store=self.store,
                                consumer=self.consumer, state_dir=self.state_dir,
                                http=self.http, billing=self.billing)
        self.crew = Crew(context, [_monitor, *self.worker_factories], self._worker_failed)
        self.crew.start()
        if serve:
            await self._serve()
            tune_gc()

    async def _open_archive(self) -> Any:
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

    def _worker_failed(self, name: str) -> None:
        if self.app is not None:  # /readyz says so until the process is restarted
            self.app.failed_workers.append(name)

    def _mount_billing(self) -> None:
        """Billing's endpoints, behind the same per-tenant bearer token as the accounts API."""
        assert self.app is not None and self.billing is not None
        app = self.app

        def guarded(handler: Handler) -> Handler:
            async def with_tenant(req: Request, tenant: str) -> Response:
                return await handler(req)

            return tenant_route(lambda: app.runtime, with_tenant)

        for method, path, handler in billing_routes(self.billing):
            app.add_route(method, path, guarded(handler))

    async def _serve(self) -> None:
        assert self.app is not None
        s = self.cfg.settings
        limits = Limits(header_timeout_s=s.header_timeout_s, body_timeout_s=s.body_timeout_s,
                        max_header_bytes=s.max_header_bytes, max_headers=s.max_headers)
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            http=protocol_for(limits),
            ws="none",
            timeout_keep_alive=s.keepalive_timeout_s,  # type: ignore[arg-type]
            limit_concurrency=s.max_connections,
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,  # uvicorn's records go to our JSON handler (engine/logs.py)
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=30,
            proxy_headers=False,  # no X-Forwarded-* rewriting on the hot path
        )
        assert self._sock is not None
        self._server = Server(config)
        self._server_task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        self._tasks.append(self._server_task)
        while not self._server.started:
            if self._server_task.done():
                raise LeadflowError(f"HTTP server stopped at start on {self.url}")
            await asyncio.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def reload(self, path: str | None = None) -> None:
        """Swap in a new config: accounts synced first, then one reference swap, then the
        workers restarted on it. One reload at a time, in the order they were asked for:
        two quick SIGHUPs used to race, and the older file could win."""
        async with self._reloading:
            cfg = configfile.load(path or self.cfg.source)
            assert self.store is not None and self.app is not None
            await sync_accounts(cfg, self.store)
            self.app.runtime = Runtime(cfg)
            if self.billing is not None:
                self.billing.config = cfg
            old, self.cfg = self.cfg, cfg
            if self.crew is not None:
                self.crew.restart()
                self.app.failed_workers.clear()  # restarted: /readyz judges the new ones
            log.info("config reloaded", extra={"source": cfg.source})
            changed = _changed_settings(old.settings, cfg.settings)
            if changed:
                log.warning("settings take effect at the next restart",
                            extra={"settings": changed})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self.app is not None:
            self.app.draining = True
        server_task = self._server_task
        if server_task is not None:
            await server_task
        if self._sock is not None:  # uvicorn closes it when it served; else it is ours
            self._sock.close()
            self._sock = None
        if self.app is not None:
            await self.app.drain()
        self.stop_event.set()
        if self._reload_tasks:  # a reload finishing now must not restart the workers
            await asyncio.gather(*self._reload_tasks, return_exceptions=True)
        if self.crew is not None:
            await self.crew.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sync is not None:  # after the last request: no sync delivery in flight
            await self.sync.close()
        if self.http is not None:  # after the workers: no delivery in flight
            await self.http.close()
            self.http = None
        if self.billing is not None and self.billing.archive is not None:
            if self.app is not None:
                self.app.archive = None
            await self.billing.archive.close()
            self.billing.archive = None
        if self._balances is not None:
            collector, client = self._balances
            self._balances = None
            assert self.app is not None
            self.app.registry.unregister(collector)
            client.close()
        if self.store is not None:
            await self.store.redis.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def run_until_signal(self) -> None:
        """``leadflow run``: serve until SIGTERM/SIGINT; SIGHUP reloads the config. The
        engine's record (engine.pidfile) is held from before Redis starts until exit."""
        done, started = asyncio.Event(), asyncio.Event()
        self.handle_signals(done, started)
        self.pidfile = PidFile(self.state_dir)
        record = EngineState(pid=os.getpid(), config=config_path(self.cfg.source))
        self.pidfile.acquire(record)
        try:
            try:
                await self.start()
                self.export_balances()
            except BaseException:  # what did start (Redis, workers, the socket) stops
                started.set()  # a SIGHUP's reload waiting for the start gives up
                await self.stop()
                raise
            if self.embedded is not None:  # where reconcile and workers find its Redis
                self.pidfile.write(msgspec.structs.replace(record, redis_url=self.embedded.url))
            started.set()
            log.info("leadflow serving", extra={"url": self.url})
            await done.wait()
            log.info("draining")
            await self.stop()
            log.info("stopped")
        finally:
            self.pidfile.release()

    def export_balances(self) -> None:
        """Account balances for Prometheus, read at scrape time only (docs/metrics.md).

        Registered on the app's registry until :meth:`stop` (which unregisters it, so a
        process may start a Service again, as the tests do).
        """
        assert self.app is not None and self.store is not None
        url = self.redis_url or (self.embedded.url if self.embedded is not None else None)
        assert url is not None  # start() ran: a given URL, or the embedded server's
        client = sync_redis_client(url)

        def accounts() -> list[tuple[str, str]]:
            cfg = self.cfg
            return [(t.id, WALLET) for t in cfg.tenants] + [(c.tenant, c.id) for c in cfg.clients]

        collector = BalanceCollector(redis_balance_source(client, accounts))
        self.app.registry.register(collector)
        self._balances = (collector, client)

    def handle_signals(self, done: asyncio.Event, started: asyncio.Event) -> None:
        """SIGTERM and SIGINT set ``done``; SIGHUP reloads the config, once ``started`` is
        set (a SIGHUP during start-up is not lost, and does not end the process)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)

        def on_sighup() -> None:
            task = loop.create_task(self._safe_reload(started))
            self._reload_tasks.add(task)  # kept until done (and awaited at stop)
            task.add_done_callback(self._reload_tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)

    async def _safe_reload(self, started: asyncio.Event) -> None:
        """A SIGHUP's reload; its outcome goes to the log and the engine's record, where
        ``leadflow config load`` reads it."""
        await started.wait()
        if self.app is None or self.stop_event.is_set():  # the start failed, or stopping
            return
        error = ""
        try:
            await self.reload()
        except ConfigError as exc:
            error = str(exc)
            log.error("config reload refused: %s", exc)
        except Exception as exc:  # e.g. Redis down mid-sync: keep serving
            error = f"reload failed: {type(exc).__name__}"
            log.exception("config reload failed; the previous config stays in force")
        if self.pidfile is not None and self.pidfile.state is not None:
            state = self.pidfile.state
            self.pidfile.write(msgspec.structs.replace(
                state, reloads=state.reloads + 1, reload_error=error))


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
    await svc.start(serve=False)  # a worker serves no API, only its /metrics port
    assert svc.crew is not None
    started.set()
    try:
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, svc.crew.failed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    finally:
        await svc.stop()
    return 1 if svc.crew.failed.is_set() else 0

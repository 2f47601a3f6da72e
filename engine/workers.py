"""Worker processes and the workers ``leadflow run`` starts in-process.

Each worker is a Redis Streams consumer group member, so any number of them may run in
separate processes (``leadflow worker KIND``) next to the engine; ``leadflow run`` also
starts one of each in-process so a single command gives a working system.

A worker reads the service's config once, when it starts (its buyers' endpoints, its
tenants' streams). A config reload therefore restarts the workers (:class:`Crew`): each
one's stop event is set, so it finishes what it holds and exits, while its successor,
started at once with the same consumer name, reads the new config.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from engine.config import Config
from engine.errors import LeadflowError

if TYPE_CHECKING:
    from engine.service import Service

log = logging.getLogger("leadflow.workers")

WorkerFn = Callable[["Service", asyncio.Event], Coroutine[Any, Any, None]]


class Crew:
    """A service's workers, each with its own stop event; see the module docs."""

    def __init__(self, svc: Service, factories: Sequence[WorkerFn],
                 on_failure: Callable[[str], None]) -> None:
        self._svc, self._factories, self._on_failure = svc, list(factories), on_failure
        self._current: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False  # stopped for good: a reload finishing late starts nothing
        self.failed = asyncio.Event()  # a worker died of an error

    def start(self) -> None:
        if not self._closed:
            self._current = [self._spawn(f) for f in self._factories]

    def restart(self) -> None:
        """Stop the running workers (they finish what they hold) and start new ones."""
        for stop in self._current:
            stop.set()
        self.start()

    async def stop(self) -> None:
        self._closed = True
        for stop in self._current:
            stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, factory: WorkerFn) -> asyncio.Event:
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(factory, stop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stop

    async def _run(self, factory: WorkerFn, stop: asyncio.Event) -> None:
        """Run one worker; a worker that dies says so in the log and in ``failed``."""
        name = getattr(factory, "__name__", "worker")
        try:
            await factory(self._svc, stop)
        except asyncio.CancelledError:
            raise
        except Exception:  # logged and reported here; the task ends quietly
            log.exception("worker stopped by an error", extra={"worker": name})
            self._on_failure(name)
            self.failed.set()


def _tenants(svc: Service) -> list[str]:
    return [t.id for t in svc.cfg.tenants]


async def deliver(svc: Service, stop: asyncio.Event) -> None:
    """Signed webhooks to buyers (engine/delivery), one consumer of ``deliveries``."""
    from engine.delivery.worker import run_delivery_worker
    from engine.telemetry import delivery_observer

    assert svc.store is not None
    await run_delivery_worker(svc.cfg, svc.store, tenants=_tenants(svc),
                              consumer=svc.consumer + "-deliver", stop=stop,
                              observer=delivery_observer, session=svc.http,
                              config=lambda: svc.cfg)


async def recharge(svc: Service, stop: asyncio.Event) -> None:
    """Auto-recharge through Stripe (billing/recharge), one consumer of ``events``."""
    from billing.recharge import run_recharge_worker
    from billing.stripe_gateway import ENV_KEY, StripeGateway

    if not os.environ.get(ENV_KEY):
        log.warning("recharge worker not started: no Stripe key", extra={"reason": ENV_KEY})
        return
    assert svc.store is not None
    await run_recharge_worker(svc.cfg, svc.store, StripeGateway(),
                              consumer=svc.consumer + "-recharge", stop=stop, ctx=svc.billing)


async def ledger(svc: Service, stop: asyncio.Event) -> None:
    """Copies ledger entries into SQL (SQLite by default), trims Redis after the commit."""
    from billing.archive import Archive, run_archive_worker

    assert svc.store is not None
    archive = await Archive.open(svc.cfg.settings.sql_url,
                                 path=str(svc.state_dir / "ledger.sqlite3"))
    try:
        await run_archive_worker(svc.store, archive, _tenants(svc),
                                 consumer=svc.consumer + "-ledger", stop=stop)
    finally:
        await archive.close()


def _registry() -> dict[str, WorkerFn]:
    return {"deliver": deliver, "recharge": recharge, "ledger": ledger}


def in_process_workers() -> list[WorkerFn]:
    return list(_registry().values())


async def run_worker(
    kind: str,
    cfg: Config,
    *,
    redis_url: str | None,
    consumer: str | None,
    metrics_port: int | None,
) -> int:
    fn = _registry().get(kind)
    if fn is None:
        raise LeadflowError(f"worker {kind!r} is not available in this build")
    from engine.metrics import start_worker_metrics_server
    from engine.service import Service

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

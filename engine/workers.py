"""Worker processes and the workers ``leadflow run`` starts in-process.

Each worker is a Redis Streams consumer group member, so any number of them may run in
separate processes (``leadflow worker KIND``) next to the engine; ``leadflow run`` also
starts one of each in-process so a single command gives a working system.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.config import Config
from engine.errors import LeadflowError

if TYPE_CHECKING:
    from engine.service import Service

log = logging.getLogger("leadflow.workers")

WorkerFn = Callable[["Service", asyncio.Event], Coroutine[Any, Any, None]]


def _tenants(svc: Service) -> list[str]:
    return [t.id for t in svc.cfg.tenants]


async def deliver(svc: Service, stop: asyncio.Event) -> None:
    """Signed webhooks to buyers (engine/delivery), one consumer of ``deliveries``."""
    from engine.delivery.worker import run_delivery_worker
    from engine.telemetry import delivery_observer

    assert svc.store is not None
    await run_delivery_worker(svc.cfg, svc.store, tenants=_tenants(svc),
                              consumer=svc.consumer + "-deliver", stop=stop,
                              observer=delivery_observer, session=svc.http)


async def recharge(svc: Service, stop: asyncio.Event) -> None:
    """Auto-recharge through Stripe (billing/recharge), one consumer of ``events``."""
    from billing.recharge import run_recharge_worker
    from billing.stripe_gateway import ENV_KEY, StripeGateway

    if not os.environ.get(ENV_KEY):
        log.warning("recharge worker not started: no Stripe key", extra={"reason": ENV_KEY})
        return
    assert svc.store is not None
    await run_recharge_worker(svc.cfg, svc.store, StripeGateway(),
                              consumer=svc.consumer + "-recharge", stop=stop)


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

    svc = Service(cfg, redis_url=redis_url, port=0)
    if consumer:
        svc.consumer = consumer
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if metrics_port is not None:
        start_worker_metrics_server(metrics_port)
    await svc.start(serve=False)  # a worker serves no API, only its /metrics port
    try:
        await fn(svc, stop)
    finally:
        await svc.stop()
    return 0

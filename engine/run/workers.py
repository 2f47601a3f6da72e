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
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from billing.archive import Archive, run_archive_worker
from billing.context import BillingContext
from billing.leads import LeadArchive, run_lead_archive
from billing.recharge import run_recharge_worker
from billing.stripe_gateway import ENV_KEY, StripeGateway
from engine.core.config import Config
from engine.core.constants import archive_path
from engine.core.errors import StoreUnavailable
from engine.delivery.tenant_hooks import run_tenant_hooks
from engine.delivery.worker import run_delivery_worker
from engine.identity.store import IdentityStore
from engine.notify.worker import run_notify_worker
from engine.obs.telemetry import delivery_observer, holds_expired, hooks_observer, notify_observer
from engine.run.reconcile import SWEEP_INTERVAL_MS
from engine.store.store import Store

log = logging.getLogger("leadflow.workers")
SWEEP_BATCH = 16  # expired pings released per Lua call (~10 holds each: a few ms of Redis)


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs of the process that runs it (the service builds it once its
    Redis, HTTP session and billing context are up): never the whole service."""

    config: Callable[[], Config]  # the config in force; a reload restarts the workers
    store: Store
    consumer: str  # this process's stream consumer name; each worker adds its kind
    state_dir: Path
    http: aiohttp.ClientSession  # the process's one client session
    billing: BillingContext

    def tenants(self) -> list[str]:
        return [t.id for t in self.config().tenants]


WorkerFn = Callable[[WorkerContext, asyncio.Event], Coroutine[Any, Any, None]]


class Crew:
    """A service's workers, each with its own stop event; see the module docs."""

    def __init__(self, ctx: WorkerContext, factories: Sequence[WorkerFn],
                 on_failure: Callable[[str], None]) -> None:
        self._ctx, self._factories, self._on_failure = ctx, list(factories), on_failure
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
        name = _worker_name(factory)
        try:
            await factory(self._ctx, stop)
        except asyncio.CancelledError:
            raise
        except Exception:  # logged and reported here; the task ends quietly
            log.exception("worker stopped by an error", extra={"worker": name})
            self._on_failure(name)
            self.failed.set()


async def delivery_worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """Signed webhooks to buyers (engine/delivery), one consumer of ``deliveries``."""
    cfg = ctx.config()
    await run_delivery_worker(cfg, ctx.store, tenants=ctx.tenants(),
                              consumer=ctx.consumer + "-deliver", stop=stop,
                              observer=delivery_observer, session=ctx.http,
                              config=ctx.config)


async def recharge_worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """Auto-recharge through Stripe (billing/recharge), one consumer of ``events``."""
    if not os.environ.get(ENV_KEY):
        log.warning("recharge worker not started: no Stripe key", extra={"reason": ENV_KEY})
        return
    await run_recharge_worker(ctx.config(), ctx.store, StripeGateway(),
                              consumer=ctx.consumer + "-recharge", stop=stop, ctx=ctx.billing)


async def ledger_worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """Copies ledger entries into SQL (SQLite by default), trims Redis after the commit."""
    archive = await Archive.open(ctx.config().settings.sql_url,
                                 path=str(archive_path(ctx.state_dir)))
    try:
        await run_archive_worker(ctx.store, archive, ctx.tenants(),
                                 consumer=ctx.consumer + "-ledger", stop=stop)
    finally:
        await archive.close()


async def leads_worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """The lead archive (billing/leads): sold leads, their delivery outcomes and returns
    into SQL (the ledger's database); personal fields erased after the retention."""
    archive = await LeadArchive.open(ctx.config().settings.sql_url,
                                     path=str(archive_path(ctx.state_dir)))
    try:
        await run_lead_archive(ctx.store, archive, ctx.config(),
                               consumer=ctx.consumer + "-leads", stop=stop)
    finally:
        await archive.close()


async def notify_worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """E-mail notifications (engine/notify), one consumer of ``events``; tenants without
    ``[tenants.notify.smtp]`` or ``[tenants.notify.sendgrid]`` are skipped (one log line).
    A client's messages also go to its active portal users (the identity store, in the
    ledger archive's database)."""
    sql_url, path = ctx.config().settings.sql_url, str(archive_path(ctx.state_dir))
    archive = await Archive.open(sql_url, path=path)
    try:
        ids = await IdentityStore.open(sql_url, path=path)
        try:
            await run_notify_worker(ctx.config(), ctx.store, consumer=ctx.consumer + "-notify",
                                    stop=stop, archive=archive, observer=notify_observer,
                                    portal=ids.notify_addresses)
        finally:
            await ids.close()
    finally:
        await archive.close()


async def hooks_worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """The tenants' own webhooks (engine/delivery/tenant_hooks), one consumer of
    ``events``; tenants without ``[tenants.notify.webhook]`` are not read."""
    await run_tenant_hooks(ctx.config(), ctx.store, ctx.http, consumer=ctx.consumer + "-hooks",
                           stop=stop, observer=hooks_observer)


async def sweep_pings(store: Store, tenants: Sequence[str], *, now: int | None = None,
                      batch: int = SWEEP_BATCH) -> int:
    """One pass of the ping-post expiry sweep over ``tenants``: every expired ping's holds
    released, in bounded batches (lua/ping_sweep.lua). Returns the holds released."""
    holds = 0
    for tenant in tenants:
        while True:
            n, h = await store.ping_sweep(tenant, now=now, limit=batch)
            holds += h
            if n < batch:
                break
    return holds


async def ping_sweeper(ctx: WorkerContext, stop: asyncio.Event) -> None:
    """Releases the holds of expired pings every ``SWEEP_INTERVAL_MS`` (reconcile flags a
    hold past its expiry by more than that)."""
    while not stop.is_set():
        try:
            released = await sweep_pings(ctx.store, ctx.tenants())
            if released:
                holds_expired(released)
        except StoreUnavailable:
            log.warning("ping sweep: redis unavailable")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL_MS / 1_000)


REGISTRY: dict[str, WorkerFn] = {
    "deliver": delivery_worker, "recharge": recharge_worker, "ledger": ledger_worker,
    "leads": leads_worker,
    "notify": notify_worker, "hooks": hooks_worker, "pings": ping_sweeper}


def _worker_name(factory: WorkerFn) -> str:
    """A worker's name in logs and /readyz: its CLI word (``leadflow worker KIND``) when
    it has one, else its function's name."""
    for word, fn in REGISTRY.items():
        if fn is factory:
            return word
    return getattr(factory, "__name__", "worker")


def in_process_workers() -> list[WorkerFn]:
    return list(REGISTRY.values())

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
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.config import Config
from engine.errors import LeadflowError

if TYPE_CHECKING:
    from engine.service import Service

log = logging.getLogger("leadflow.workers")

WorkerFn = Callable[["Service", asyncio.Event], Coroutine[Any, Any, None]]


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _registry() -> dict[str, WorkerFn]:
    return {}


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
    from engine.service import Service

    svc = Service(cfg, redis_url=redis_url, port=0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await svc.start()
    try:
        await fn(svc, stop)
    finally:
        await svc.stop()
    return 0

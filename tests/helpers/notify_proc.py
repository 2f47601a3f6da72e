"""A notify worker in a process of its own, for the kill -9 tests
(tests/integration/test_notify_kill.py): ``python -m tests.helpers.notify_proc CONFIG
REDIS_URL CONSUMER``. It claims idle entries after 300 ms and holds an outbox claim for
1.5 s (instead of a minute and two), so a test sees a dead worker's message taken over
without waiting minutes. It runs until killed."""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis

from engine.notify.worker import run_notify_worker
from engine.run import configfile
from engine.store.store import Store


async def main(config: str, redis_url: str, consumer: str) -> None:
    cfg = configfile.load(config)
    redis = aioredis.Redis.from_url(redis_url)
    await run_notify_worker(cfg, Store(redis), consumer=consumer, stop=asyncio.Event(),
                            claim_idle_ms=300, claim_every_ms=100, claim_ms=1_500,
                            retry_base_ms=100, retry_max_ms=200)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))

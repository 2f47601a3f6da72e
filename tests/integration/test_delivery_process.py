"""``leadflow worker deliver`` as a real process, killed with SIGKILL mid-delivery.

The lead is sold through the engine's HTTP API (in-process service, no workers), the
worker process sends it to a buyer that holds the first request open, and is killed
while the request is in flight: nothing of the outcome is recorded. A second worker takes
the entry over (XAUTOCLAIM) and delivers it again with the same ``webhook-id``; the buyer
is charged once (one sale in the ledger)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from engine.core import keys
from engine.delivery.record import read_decision
from engine.delivery.worker import DeliveryWorker, WorkerOptions
from tests.helpers import ROOT
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running


async def _until(what: str, check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_worker_process_killed_mid_delivery(redis, redis_server, buyers: Buyers,
                                                  tmp_path: Path) -> None:
    hook = (f'delivery = {{ url = "{buyers.url}/hold", secret = "{SECRET}", '
            'timeout_ms = 30000, accept = [{ path = "status", equals = "accepted" }] }')
    toml = BASE_TOML + "\n".join([campaign(), buyer("b1", client="c1", extra=hook)])
    (tmp_path / "leadflow.toml").write_text(toml)
    cfg = make_config(campaign(), buyer("b1", client="c1", extra=hook))
    async with running(cfg, redis_server.url) as eng:
        opening = await eng.balance("c1")
        _, r = await eng.lead(email="kill@example.com")
        assert r["status"] == "ACCEPTED", r
        lead_id = r["lead_id"]
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "engine.run.cli", "worker", "deliver", "--config",
             str(tmp_path / "leadflow.toml"), "--redis-url", redis_server.url,
             "--consumer", "doomed"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            async def in_flight() -> bool:
                assert proc.poll() is None, "the worker process exited early"
                return bool(buyers.at("/hold"))

            await _until("the worker process's request to reach the buyer", in_flight)
        finally:
            proc.kill()  # SIGKILL: no shutdown, no outcome recorded
            proc.wait(timeout=10)
        stream = keys.deliveries("t1")
        pending = await eng.redis.xpending(stream, "delivery")
        assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"doomed-deliver"
        assert await read_decision(eng.store, "t1", lead_id, "b1") is None

        second = DeliveryWorker(eng.svc.cfg, eng.store, tenants=["t1"], consumer="heir",
                                options=WorkerOptions(claim_idle_ms=0, block_ms=10))

        async def delivered() -> bool:
            await second.process_once(block_ms=None)
            return not await eng.redis.xlen(stream)

        try:
            await _until("the second worker to deliver the entry", delivered)
        finally:
            await second.close()
        decision = await read_decision(eng.store, "t1", lead_id, "b1")
        assert decision is not None and decision.o == "ACCEPTED"
        reqs = buyers.at("/hold")
        assert len(reqs) == 2 and reqs[0].msg_id == reqs[1].msg_id == f"msg_{lead_id}_b1"
        assert await eng.balance("c1") == opening - 10_000_000  # one sale, charged once
        entries = [f for _, f in await eng.store.ledger_page("t1", "c1")]
        assert [f["kind"] for f in entries if f["ref"] == lead_id] == ["lead"]
        await eng.assert_reconciled()

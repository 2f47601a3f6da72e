"""A config reload reaches everything that reads the config: the HTTP app, billing, and the
workers, in-process (restarted by the service's crew) and in their own processes (SIGHUP).
Reloads run one at a time, in the order asked for."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from engine.run import configfile
from engine.run.service import Service
from engine.run.workers import delivery_worker
from tests.helpers import ROOT
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.harness import BASE_TOML, Engine, buyer, campaign, running


def _hook(url: str) -> str:
    return (f'delivery = {{ url = "{url}", secret = "{SECRET}", timeout_ms = 5000, '
            'accept = [{ path = "status", equals = "accepted" }] }')


def _toml(buyers: Buyers, version: int, *, more_buyers: bool = False) -> str:
    """Campaign 'camp' sold to all; b1's webhook names the config version in its query."""
    parts = [campaign(distribution="send_to_all"),
             buyer("b1", client="c1", price="1.00",
                   extra=_hook(f"{buyers.url}/accept?v={version}"))]
    if more_buyers:
        parts.append(buyer("b2", client="c2", price="1.00",
                           extra=_hook(f"{buyers.url}/accept?b=2")))
    return BASE_TOML + "\n".join(parts)


async def _until_query(buyers: Buyers, query: str, within: float = 20.0) -> None:
    """Until a request to /accept with ``query`` arrived (woken by each arrival)."""
    async with asyncio.timeout(within):
        while not any(r.query == query for r in buyers.at("/accept")):
            buyers.arrived.clear()
            await buyers.arrived.wait()


async def test_reload_restarts_the_in_process_delivery_worker(redis, redis_server,
                                                              buyers: Buyers,
                                                              tmp_path: Path) -> None:
    """A buyer added by a reload is delivered to, and a changed webhook URL is used (the
    worker kept the start-up config: the new buyer's sale was dead-lettered "buyer not
    configured" and refunded, and b1's leads went on to the URL the operator removed)."""
    path = tmp_path / "leadflow.toml"
    path.write_text(_toml(buyers, 1))
    svc = Service(configfile.load(path), redis_url=redis_server.url, host="127.0.0.1",
                  port=0, state_dir=str(tmp_path / "state"), workers=[delivery_worker])
    await svc.start()
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            eng = Engine(svc, http)
            _, r = await eng.lead(email="before@example.com")
            assert r["status"] == "ACCEPTED", r
            await _until_query(buyers, "v=1")
            path.write_text(_toml(buyers, 2, more_buyers=True))
            await svc.reload()
            c2 = await eng.balance("c2")
            _, r = await eng.lead(email="after@example.com")
            assert r["status"] == "ACCEPTED", r
            assert await eng.balance("c2") == c2 - 1_000_000  # b2 bought it too
            await _until_query(buyers, "v=2")
            await _until_query(buyers, "b=2")
    finally:
        await svc.stop()
    assert [r.query for r in buyers.at("/accept")].count("v=1") == 1


async def test_reloads_apply_in_the_order_asked(redis, redis_server, tmp_path: Path) -> None:
    """Two reloads at once: the second file wins (the first, slower to sync its many
    accounts, used to finish last and win)."""
    many = "".join(f'\n[[clients]]\ntenant = "t1"\nid = "x{i}"\nopening_balance = "1.00"\n'
                   for i in range(300))
    v1, v2 = tmp_path / "v1.toml", tmp_path / "v2.toml"
    v1.write_text(BASE_TOML + many + campaign() + buyer("b1", price="1.00"))
    v2.write_text(BASE_TOML + campaign() + buyer("b1", price="7.00"))
    async with running(configfile.load(v1), redis_server.url) as eng:
        await asyncio.gather(eng.svc.reload(str(v1)), eng.svc.reload(str(v2)))
        assert eng.svc.cfg.source == str(v2)
        c1 = await eng.balance("c1")
        _, r = await eng.lead(email="order@example.com")
        assert r["status"] == "ACCEPTED", r
        assert await eng.balance("c1") == c1 - 7_000_000


async def test_worker_process_reloads_on_sighup(redis, redis_server, buyers: Buyers,
                                                tmp_path: Path) -> None:
    """`leadflow worker deliver` reloads its config on SIGHUP (it used to die of it)."""
    path = tmp_path / "leadflow.toml"
    path.write_text(_toml(buyers, 1))
    stderr = tmp_path / "worker.log"
    async with running(configfile.load(path), redis_server.url) as eng:
        with stderr.open("wb") as err:
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [sys.executable, "-m", "engine.run.cli", "worker", "deliver", "--config",
                 str(path), "--redis-url", redis_server.url, "--consumer", "w1"],
                cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            _, r = await eng.lead(email="one@example.com")
            assert r["status"] == "ACCEPTED", r
            await _until_query(buyers, "v=1")
            path.write_text(_toml(buyers, 2))
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while b"config reloaded" not in stderr.read_bytes():
                    assert proc.poll() is None, stderr.read_text()
                    await asyncio.sleep(0.02)  # poll interval
            _, r = await eng.lead(email="two@example.com")
            assert r["status"] == "ACCEPTED", r
            await _until_query(buyers, "v=2")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0, stderr.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


async def test_crew_stopped_starts_nothing_and_a_dead_worker_is_reported_once() -> None:
    """A reload finishing while the service stops must not start workers again (they ran
    on after the store and Redis were closed), and a worker that dies is logged and
    reported once, its task ending quietly (its exception was never retrieved)."""
    import gc

    from engine.run.workers import Crew

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
    runs: list[str] = []

    async def ok(svc: object, stop: asyncio.Event) -> None:
        runs.append("ok")
        await stop.wait()

    async def bad(svc: object, stop: asyncio.Event) -> None:
        runs.append("bad")
        raise RuntimeError("worker died")

    failed: list[str] = []
    crew = Crew(None, [ok, bad], failed.append)  # type: ignore[arg-type]
    crew.start()
    await crew.failed.wait()
    await crew.stop()
    crew.restart()  # what a reload finishing after stop() does
    await asyncio.sleep(0)  # one loop turn: a task started now would have run
    assert sorted(runs) == ["bad", "ok"] and failed == ["bad"]
    gc.collect()
    assert unhandled == []
    loop.set_exception_handler(None)

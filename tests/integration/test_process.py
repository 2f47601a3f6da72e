"""``leadflow run`` as a real subprocess: SIGTERM drains, SIGHUP reloads, logs are JSON lines
without secrets or PII.

The engine runs as ``python -m engine.run.cli run`` against the tests' redis-server on a free port,
with a temp config whose secrets (supplier keys, tenant token, webhook secret and header) and
whose Stripe key (environment) are random, so finding one in the output is never a
coincidence. Every wait polls with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from billing.archive import Archive
from engine.core import keys, money
from engine.run import configfile
from engine.run.reconcile import reconcile
from engine.store.embedded import EmbeddedRedis, free_port
from engine.store.store import Store
from tests.helpers import ROOT
from tests.helpers.stripe_fixture import LocalStripe

DECISIONS = {"ACCEPTED", "DUPLICATED", "REJECTED"}


@dataclass
class Secrets:
    token: str = field(default_factory=lambda: f"tok-{secrets.token_hex(12)}")
    lp_key: str = field(default_factory=lambda: f"lpk-{secrets.token_hex(12)}")
    wrong_key: str = field(default_factory=lambda: f"bad-{secrets.token_hex(12)}")
    whsec: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())
    header: str = field(default_factory=lambda: f"Bearer hdr-{secrets.token_hex(12)}")
    url_token: str = field(default_factory=lambda: f"urltok{secrets.token_hex(8)}")
    stripe: str = field(default_factory=lambda: f"sk_test_{secrets.token_hex(16)}")

    def all(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items()}


def config_toml(state_dir: Path, s: Secrets, *, price: str = "1.00",
                dead_port: int | None = None) -> str:
    """One tenant, one campaign, one buyer; with ``dead_port`` the buyer's webhook endpoint
    is down (connection refused: deliveries are dead-lettered and refunded: errors logged)."""
    toml = f"""
[settings]
state_dir = "{state_dir}"
replay_window_s = 1

[[tenants]]
id = "t1"
api_token = "{s.token}"
timezone = "UTC"
fees = {{ inbound_lead = "0.01", outbound_delivery = "0.02" }}
wallet = {{ opening_balance = "1000.00" }}

[[clients]]
tenant = "t1"
id = "c1"
billing = "manual"
opening_balance = "1000.00"

[[suppliers]]
tenant = "t1"
id = "s1"
key = "{s.lp_key}"
payout = "0.50"

[[campaigns]]
tenant = "t1"
id = "camp"
fields = [
  {{ name = "email", type = "email", required = true }},
  {{ name = "phone", type = "phone", required = true }},
]

[[buyers]]
tenant = "t1"
id = "b1"
campaign = "camp"
client = "c1"
price = "{price}"
"""
    if dead_port is None:
        return toml
    return toml + f"""
[buyers.delivery]
url = "http://127.0.0.1:{dead_port}/leads?token={s.url_token}"
secret = "{s.whsec}"
headers = {{ Authorization = "{s.header}" }}
timeout_ms = 1000
max_attempts = 1
"""


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    url: str
    config: Path
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


async def wait_for(fn: Callable[[], Awaitable[Any]], *, within: float, what: str) -> Any:
    """Poll ``fn`` until it returns a truthy value, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)  # poll interval


@contextlib.asynccontextmanager
async def leadflow_run(tmp_path: Path, redis_url: str | None, toml: str,
                       env: dict[str, str], *, new_session: bool = False
                       ) -> AsyncIterator[Proc]:
    """``leadflow run`` in ``tmp_path``; with no ``redis_url``, on its embedded Redis."""
    config = tmp_path / "leadflow.toml"
    config.write_text(toml)
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "engine.run.cli", "run", "--config", str(config),
             *(["--redis-url", redis_url] if redis_url else []),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, start_new_session=new_session,
        )
    proc = Proc(process, f"http://127.0.0.1:{port}", config, stderr_path)
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"leadflow run exited {process.returncode}:\n"
                                       f"{proc.stderr()}")
                try:
                    async with http.get(proc.url + "/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(ready, within=30, what="leadflow run /readyz")
        yield proc
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def lead(s: Secrets, n: int, **extra: str) -> dict[str, str]:
    return {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": s.lp_key,
            "email": f"person{n}.{secrets.token_hex(4)}@example.com",
            "phone": f"415555{n % 10_000:04d}", **extra}


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, str]
               ) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/v1/leads", json=body) as r:
        return r.status, msgspec.json.decode(await r.read())


async def exited(process: subprocess.Popen[bytes], within: float) -> int:
    async def done() -> bool:
        return process.poll() is not None

    await wait_for(done, within=within, what="leadflow run to exit")
    return int(process.returncode)


def log_lines(text: str) -> list[dict[str, Any]]:
    """Every stderr line is one JSON object with ts, level, logger and msg."""
    lines = text.splitlines()
    out = []
    for line in lines:
        rec = msgspec.json.decode(line)  # raises on anything that is not JSON
        assert isinstance(rec, dict), line
        assert {"ts", "level", "logger", "msg"} <= rec.keys(), line
        out.append(rec)
    return out


def assert_no_leak(text: str, s: Secrets, pii: list[str]) -> None:
    for name, value in s.all().items():
        assert value not in text, f"secret {name} in the engine's output"
    raw_secret = s.whsec.removeprefix("whsec_")
    assert raw_secret not in text, "webhook secret (base64 part) in the engine's output"
    for value in pii:
        assert value not in text, f"PII {value!r} in the engine's output"


# -- the embedded default ---------------------------------------------------------------------


async def test_run_on_the_embedded_redis_with_a_relative_state_dir(tmp_path: Path) -> None:
    """The README's ``leadflow run``: no Redis URL, the default relative state dir. (It
    exited at start once: redis-server opened its relative log file from inside --dir.)"""
    s = Secrets()
    toml = config_toml(Path(".leadflow"), s)
    async with leadflow_run(tmp_path, None, toml, {}) as proc:
        async with aiohttp.ClientSession() as http:
            status, body = await post(http, proc.url, lead(s, 1))
        assert (status, body["status"]) == (200, "ACCEPTED"), body
        # a worker started there without a Redis URL would append to the same AOF: it is
        # refused, and told the URL of the engine's server
        worker = await _cli(tmp_path, "worker", "deliver", "--config", str(proc.config))
        assert worker.returncode == 1, worker
        assert "--redis-url redis://127.0.0.1:" in worker.stderr.decode(), worker
        proc.process.send_signal(signal.SIGTERM)
        assert await exited(proc.process, within=30) == 0, proc.stderr()
    state = tmp_path / ".leadflow" / "redis"
    assert (state / "redis.log").is_file()
    assert any(state.glob("appendonlydir/*.aof")), "AOF on, under the state dir"


async def test_ctrl_c_drains_before_the_embedded_redis_stops(tmp_path: Path) -> None:
    """Ctrl-C signals the terminal's whole process group: the embedded redis-server was in
    the engine's group and stopped at once, under the draining engine. It runs in its own
    session now, and the engine stops it after the drain (SIGTERM, not SIGINT)."""
    s = Secrets()
    async with leadflow_run(tmp_path, None, config_toml(Path("state"), s), {},
                            new_session=True) as proc:
        async with aiohttp.ClientSession() as http:
            status, body = await post(http, proc.url, lead(s, 1))
        assert (status, body["status"]) == (200, "ACCEPTED"), body
        os.killpg(proc.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert await exited(proc.process, within=30) == 0, proc.stderr()
    assert "redis unavailable" not in proc.stderr()
    log = (tmp_path / "state" / "redis" / "redis.log").read_text()
    assert "Received SIGTERM" in log and "Received SIGINT" not in log, log[-500:]


async def test_a_port_in_use_fails_before_anything_starts(tmp_path: Path) -> None:
    """The port was bound by uvicorn after Redis and the workers had started: the engine
    exited (or hung, ignoring SIGTERM) and left its embedded redis-server running."""
    import socket as socket_mod

    s = Secrets()
    (tmp_path / "leadflow.toml").write_text(config_toml(Path("state"), s))
    with socket_mod.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = await _cli(tmp_path, "run", "--config", "leadflow.toml", "--host", "127.0.0.1",
                         "--port", str(port))
    assert run.returncode == 1 and "cannot listen on 127.0.0.1" in run.stderr.decode(), run
    assert not (tmp_path / "state" / "redis").exists()  # no redis-server was started
    assert not list((tmp_path / "state").glob("leadflow-*.pid"))


# -- SIGTERM --------------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_leads_and_logs_stay_clean(
    redis, redis_server: EmbeddedRedis, localstripe: LocalStripe, tmp_path: Path
) -> None:
    s = Secrets()
    toml = config_toml(tmp_path / "state", s, dead_port=free_port())
    env = {"LEADFLOW_STRIPE_SECRET_KEY": s.stripe, "LEADFLOW_STRIPE_API_BASE": localstripe.url}
    pii: list[str] = []
    async with leadflow_run(tmp_path, redis_server.url, toml, env) as proc:
        connector = aiohttp.TCPConnector(limit=48)
        async with aiohttp.ClientSession(connector=connector) as http:
            # errors first, with PII and secrets in them: a bad e-mail, a wrong lp_key, an
            # unknown campaign, a bad tenant token
            bad = lead(s, 0, email="not-an-email-" + secrets.token_hex(4), phone="4155550000")
            bad_phone = "212" + str(secrets.randbelow(10**7)).zfill(7)
            pii += [bad["email"], bad_phone]
            assert (await post(http, proc.url, bad))[0] == 422
            assert (await post(http, proc.url, lead(s, 1, phone=bad_phone, lp_key=s.wrong_key))
                    )[0] == 401
            assert (await post(http, proc.url, lead(s, 2, lp_campaign_id="nope")))[0] == 404
            async with http.get(proc.url + "/v1/accounts/c1",
                                headers={"Authorization": f"Bearer {s.wrong_key}"}) as r:
                assert r.status == 401
            async with http.get(proc.url + "/v1/accounts/c1",
                                headers={"Authorization": f"Bearer {s.token}"}) as r:
                assert r.status == 200

            # a burst, and SIGTERM once part of it is answered and the rest is in flight
            bodies = [lead(s, n) for n in range(10, 610)]
            pii += [b["email"] for b in bodies[:50]] + [b["phone"] for b in bodies[:50]]
            answered = 0

            async def one(body: dict[str, str]) -> tuple[int, dict[str, Any]]:
                nonlocal answered
                result = await post(http, proc.url, body)
                answered += 1
                return result

            tasks = [asyncio.create_task(one(b)) for b in bodies]

            async def some_answered() -> bool:
                return answered >= 60

            await wait_for(some_answered, within=30, what="60 answered leads")
            proc.process.send_signal(signal.SIGTERM)
            at_signal = answered
            results = await asyncio.gather(*tasks, return_exceptions=True)

        assert await exited(proc.process, within=60) == 0, proc.stderr()

    responses = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    # a request either got a complete decision, or never reached the engine (refused /
    # closed idle connection after the listener stopped): nothing in between
    assert [type(f).__name__ for f in failures
            if not isinstance(f, aiohttp.ClientConnectionError)] == []
    print(f"answered at SIGTERM {at_signal}, after {len(responses)}, refused {len(failures)}")
    assert len(responses) > at_signal  # the requests in flight at SIGTERM were answered
    # (whether the burst was cut depends on speed: a fast engine may answer all of it
    # before its listener closes; every request is accounted for either way)
    assert len(responses) + len(failures) == len(results)
    for status, body in responses:
        assert status == 200, body
        assert body["status"] in DECISIONS and isinstance(body["code"], int), body
        assert body["lead_id"], body
    accepted = {body["lead_id"] for _, body in responses if body["status"] == "ACCEPTED"}
    assert accepted, "no lead was sold"

    # every sale the engine charged was answered (nothing decided after its client was gone)
    cfg = configfile.load(str(proc.config))
    rows = await redis.xrange(keys.ledger("t1"))
    archive = await _archive_rows(tmp_path / "state")
    assert archive, "the in-process ledger worker archived nothing"
    charged = {f[b"ref"].decode() for _, f in rows if f[b"kind"] == b"lead"} | {
        ref for ref, kind in archive if kind == "lead"}
    assert charged == accepted

    # the books balance (the ledger worker may have archived part of them to SQLite)
    arc = await Archive.open(None, path=str(tmp_path / "state" / "ledger.sqlite3"))
    try:
        checks, findings = await reconcile(cfg, Store(redis), arc)
    finally:
        await arc.close()
    assert findings == []
    assert {c.account for c in checks} == {"wallet", "c1"}

    text = proc.stderr()
    records = log_lines(text)
    msgs = [r["msg"] for r in records]
    # one line per event: each lifecycle event once, one warning per dead-lettered delivery
    assert [m for m in msgs if m in ("leadflow serving", "draining", "stopped")] == [
        "leadflow serving", "draining", "stopped"], msgs
    assert msgs[-1] == "stopped"
    dead = await redis.xlen(keys.dead_letter("t1", "deliveries"))
    assert dead > 0
    assert sum("dead-lettered" in m for m in msgs) == dead
    assert [r for r in records if r["level"] in ("error", "critical")] == []
    assert_no_leak(text, s, pii)


async def _archive_rows(state_dir: Path) -> list[tuple[str, str]]:
    """(ref, kind) of the ledger entries the in-process ledger worker archived to SQLite."""
    import sqlite3

    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [(str(r), str(k)) for r, k in db.execute("SELECT ref, kind FROM ledger_entries")]


async def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "engine.run.cli", *args], cwd=cwd,
        capture_output=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- SIGHUP -----------------------------------------------------------------------------------


async def test_sighup_reloads_prices_and_refuses_a_bad_file(
    redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    s = Secrets()
    state = tmp_path / "state"
    async with leadflow_run(tmp_path, redis_server.url, config_toml(state, s), {}) as proc:
        auth = {"Authorization": f"Bearer {s.token}"}
        async with aiohttp.ClientSession() as http:

            async def charged_for_one_lead(n: int) -> int:
                async with http.get(proc.url + "/v1/accounts/c1", headers=auth) as r:
                    before = money.parse((await r.json())["balance"])
                status, body = await post(http, proc.url, lead(s, n))
                assert (status, body["status"]) == (200, "ACCEPTED"), body
                async with http.get(proc.url + "/v1/accounts/c1", headers=auth) as r:
                    return before - money.parse((await r.json())["balance"])

            def logged(msg: str) -> Callable[[], Awaitable[int]]:
                async def count() -> int:
                    return sum(1 for r in log_lines(proc.stderr()) if r["msg"].startswith(msg))
                return count

            assert await charged_for_one_lead(1) == 1_000_000

            proc.config.write_text(config_toml(state, s, price="2.50"))
            proc.process.send_signal(signal.SIGHUP)
            await wait_for(logged("config reloaded"), within=20, what="config reloaded")
            assert await charged_for_one_lead(2) == 2_500_000

            # `leadflow config load` validates first: a bad file is never signalled
            good = proc.config.read_text()
            proc.config.write_text(good.replace('price = "2.50"', 'price = "cheap"'))
            load = await _cli(tmp_path, "config", "load", str(proc.config))
            assert load.returncode == 2, load.stderr.decode()
            # a raw SIGHUP with the bad file in place: refused, the old config stays
            proc.process.send_signal(signal.SIGHUP)
            await wait_for(logged("config reload refused"), within=20,
                           what="config reload refused")
            assert await charged_for_one_lead(3) == 2_500_000

            # `leadflow config load` of another file: the engine reloads only its own file,
            # so that is refused rather than signalled and silently ignored
            other = tmp_path / "other.toml"
            other.write_text(good.replace('price = "2.50"', 'price = "9.00"'))
            load = await _cli(tmp_path, "config", "load", str(other))
            assert load.returncode == 1 and "reloads" in load.stderr.decode(), load
            # and `leadflow config load` of its file signals the engine through its record,
            # and answers once the engine has reloaded it
            proc.config.write_text(good.replace('price = "2.50"', 'price = "4.00"'))
            load = await _cli(tmp_path, "config", "load", str(proc.config))
            assert load.returncode == 0, load.stderr.decode()
            assert "config reloaded by the engine" in load.stdout.decode()
            assert await charged_for_one_lead(4) == 4_000_000

        proc.process.send_signal(signal.SIGTERM)
        assert await exited(proc.process, within=60) == 0, proc.stderr()

    # the record goes with the engine: nothing left to signal
    assert not list(state.glob("leadflow-*.pid"))
    load = await _cli(tmp_path, "config", "load", str(proc.config))
    assert load.returncode == 1 and "no engine runs" in load.stderr.decode(), load

    # `leadflow reconcile` on what the run left (archive included) finds nothing wrong
    rec = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "engine.run.cli", "reconcile", "--config",
                         str(proc.config), "--redis-url", redis_server.url],
        cwd=tmp_path, capture_output=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = rec.stdout.decode()
    assert rec.returncode == 0, out + rec.stderr.decode()
    assert "2 accounts checked, 0 problems" in out, out
    log_lines(proc.stderr())
    assert_no_leak(proc.stderr(), s, [])

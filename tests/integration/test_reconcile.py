"""reconcile: Redis ledger streams, plus the SQL archive once the ledger worker trimmed them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from billing.archive import Archive
from engine.core import keys, money
from engine.run import configfile
from engine.run.pidfile import EngineState, PidFile
from engine.run.reconcile import reconcile
from engine.store.embedded import free_port
from engine.store.store import Store
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running


async def test_reconcile_with_archive_after_trim(redis, redis_server, tmp_path):
    cfg = make_config(campaign(), buyer("b1", price="10.00"))
    async with running(cfg, redis_server.url) as eng:
        for i in range(5):
            await eng.lead(email=f"a{i}@example.com")
        archive = await Archive.open(None, path=str(tmp_path / "ledger.sqlite3"))
        try:
            await archive.archive_once(redis, "t1", consumer="test")
            assert (await eng.store.ledger_sum("t1", "c1"))[1] == 0  # trimmed after commit
            checks, findings = await reconcile(cfg, eng.store, archive)
            assert findings == [] and any(c.account == "c1" for c in checks)
            await eng.lead(email="late@example.com")  # not archived yet: still adds up
            _, findings = await reconcile(cfg, eng.store, archive)
            assert findings == []
            await redis.hincrby(keys.acct("t1", "c1"), "bal", 1)  # a balance without an entry
            _, findings = await reconcile(cfg, eng.store, archive)
            assert [f.account for f in findings] == ["c1"]
        finally:
            await archive.close()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


async def test_reconcile_command_exit_codes(redis, redis_server, tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(BASE_TOML + f'\n[settings]\nstate_dir = "{tmp_path}"\n')
    cfg = make_config()
    async with running(cfg, redis_server.url):
        pass
    cmd = [sys.executable, "-m", "engine.run.cli", "reconcile", "--config", str(path),
           "--redis-url", redis_server.url]
    ok = await asyncio.to_thread(_run, cmd)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    await redis.hincrby(keys.acct("t1", "wallet"), "bal", -1)
    bad = await asyncio.to_thread(_run, cmd)
    assert bad.returncode == 1 and "FAIL t1/wallet" in bad.stdout


class Interleaved(aioredis.Redis):
    """A real client after each of whose commands ``between`` runs (on other clients): the
    engine acting between any two reads of a reconcile."""

    between: Callable[[], Awaitable[None]] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await super().execute_command(*args, **options)
        hook, self.between = self.between, None  # not between its own commands
        if hook is not None:
            try:
                await hook()
            finally:
                self.between = hook
        return reply


async def _reconcile_between(cfg, url, between, archive=None):
    client = Interleaved.from_url(url)
    client.between = between
    try:
        return await reconcile(cfg, Store(client), archive, page=2)
    finally:
        await client.aclose()


async def test_reconcile_while_leads_are_sold(redis, redis_server):
    """A sale between any two reads of the reconcile is no problem (the balance was read
    apart from the ledger: 4 of 8 runs under traffic failed)."""
    cfg = make_config(campaign(), buyer("b1", price="1.00"))
    async with running(cfg, redis_server.url) as eng:
        for i in range(5):
            await eng.lead(email=f"a{i}@example.com")
        sold = []

        async def sale():
            if len(sold) == 60:  # enough (a reconcile chasing new entries would not end)
                return
            status, body = await eng.lead(email=f"live{len(sold)}@example.com")
            assert status == 200 and body["status"] == "ACCEPTED", body
            sold.append(body["lead_id"])

        checks, findings = await _reconcile_between(cfg, redis_server.url, sale)
        assert findings == []
        assert len(sold) > 10
        assert {(c.tenant, c.account) for c in checks} == {
            ("t1", "wallet"), ("t1", "c1"), ("t1", "c2"), ("t2", "wallet"), ("t2", "other")}
        await eng.assert_reconciled()


async def test_reconcile_while_leads_are_sold_and_archived(redis, redis_server, tmp_path):
    """The same with the ledger worker committing to SQL and trimming the streams between
    any two reads (also between two pages of one stream)."""
    cfg = make_config(campaign(), buyer("b1", price="1.00"))
    archive = await Archive.open(None, path=str(tmp_path / "ledger.sqlite3"))
    try:
        async with running(cfg, redis_server.url) as eng:
            for i in range(5):
                await eng.lead(email=f"a{i}@example.com")
            await archive.archive_once(redis, "t1", consumer="test")
            for i in range(6):  # a tail not archived yet, longer than a page
                await eng.lead(email=f"b{i}@example.com")
            n = 0

            async def sale_and_archive():
                nonlocal n
                if n == 60:
                    return
                n += 1
                status, body = await eng.lead(email=f"live{n}@example.com")
                assert status == 200 and body["status"] == "ACCEPTED", body
                await archive.archive_once(redis, "t1", consumer="test")

            _, findings = await _reconcile_between(cfg, redis_server.url, sale_and_archive,
                                                   archive)
            assert findings == []
            assert n >= 5  # sales between its reads: one stream pass per tenant, in pages
            assert (await eng.store.ledger_sum("t1", "c1"))[1] == 0  # all in SQL
            bal = await redis.hincrby(keys.acct("t1", "c1"), "bal", 1)  # still caught
            _, findings = await reconcile(cfg, eng.store, archive)
            assert [(f.account, f.problem) for f in findings] == [
                ("c1", f"ledger sums to {money.format(bal - 1)} but the balance is "
                       f"{money.format(bal)}")]
    finally:
        await archive.close()


async def test_every_configured_account_must_be_in_redis(redis):
    """A Redis without the config's accounts is no pass: each one (clients and every
    tenant's wallet) is a problem."""
    cfg = make_config()
    checks, findings = await reconcile(cfg, Store(redis))
    assert checks == []
    assert [(f.tenant, f.account, f.problem) for f in findings] == [
        ("t1", "c1", "in the config but not in Redis"),
        ("t1", "c2", "in the config but not in Redis"),
        ("t1", "wallet", "in the config but not in Redis"),
        ("t2", "other", "in the config but not in Redis"),
        ("t2", "wallet", "in the config but not in Redis"),
    ]


async def test_account_set_and_hashes_disagree(redis, redis_server):
    cfg = make_config()
    async with running(cfg, redis_server.url):
        pass
    await redis.delete(keys.acct("t1", "c2"))
    await redis.srem(keys.accounts("t2"), "other")
    _, findings = await reconcile(cfg, Store(redis))
    assert [(f.tenant, f.account, f.problem) for f in findings] == [
        ("t1", "c2", "in the tenant's account set but its account hash is missing"),
        ("t2", "other", "missing from the tenant's account set"),
    ]


T1_ONLY = """
[[tenants]]
id = "t1"
api_token = "tok-t1"

[[clients]]
tenant = "t1"
id = "c1"
"""


async def test_tenants_removed_from_the_config_are_checked(redis, redis_server):
    """A tenant no longer in the config still has its money in Redis: its accounts are
    found (SCAN for account sets) and checked; so is a client removed from the config."""
    async with running(make_config(), redis_server.url):
        pass
    # an id of another key kind that the SCAN pattern matches too: not a tenant
    await redis.set(keys.idem("t1", "x}:accounts"), "{}")
    cfg = configfile.loads(T1_ONLY, source="<test>")
    checks, findings = await reconcile(cfg, Store(redis))
    assert findings == []
    assert sorted((c.tenant, c.account, c.configured) for c in checks) == [
        ("t1", "c1", True), ("t1", "c2", True), ("t1", "wallet", True),
        ("t2", "other", False), ("t2", "wallet", False)]
    await redis.hincrby(keys.acct("t2", "other"), "bal", -400_000_000)  # no ledger entry
    await redis.hincrby(keys.acct("t1", "c2"), "bal", 1)
    _, findings = await reconcile(cfg, Store(redis))
    assert [(f.tenant, f.account) for f in findings] == [
        ("t1", "c2"), ("t2", "other"), ("t2", "other")]  # ledger, and below its floor
    assert "below its floor" in findings[2].problem


async def test_below_floor_clients_and_wallets(redis, redis_server):
    """Below the floor is a problem for a client and for a wallet; not for a client in
    billing mode "none" (it has no floor)."""
    cfg = make_config('[[clients]]\ntenant = "t1"\nid = "free"\nbilling = "none"\n')
    async with running(cfg, redis_server.url) as eng:
        for tenant, account, debit in [("t1", "c1", 120_000_001), ("t1", "wallet", 1_020_000_001),
                                       ("t2", "wallet", 20_000_001), ("t1", "free", 50_000_000)]:
            res = await eng.store.adjust(tenant, account, -debit, "adjustment",
                                         enforce_floor=False)
            assert res.ok, res
        _, findings = await reconcile(cfg, eng.store)
    assert [(f.tenant, f.account, f.problem) for f in findings] == [
        ("t1", "c1", "balance -20.000001 is below its floor -20.00"),
        ("t1", "wallet", "balance -20.000001 is below its floor -20.00"),
        ("t2", "wallet", "balance -20.000001 is below its floor -20.00"),
    ]


def _cli(path, url: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "engine.run.cli", "reconcile", "--config", str(path),
                 "--redis-url", url])


def _config_file(tmp_path, settings: str = "", name: str = "cfg.toml"):
    path = tmp_path / name
    path.write_text(BASE_TOML + f'\n[settings]\nstate_dir = "{tmp_path}"\n{settings}')
    return path


async def test_reconcile_command_on_an_empty_redis(redis, redis_server, tmp_path):
    r = await asyncio.to_thread(_cli, _config_file(tmp_path), redis_server.url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL t1/wallet: in the config but not in Redis" in r.stdout
    assert r.stdout.endswith("reconcile: 0 accounts checked, 5 problems\n")


def _no_verdict(r: subprocess.CompletedProcess[str], what: str, secret: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith(f"reconcile: could not check: {what}: ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert secret not in r.stderr


async def test_reconcile_command_without_a_verdict_exits_2(redis, redis_server, tmp_path):
    """Exit 1 means problems found; could not check is 2 (as config errors), one line,
    no traceback, no password."""
    path = _config_file(tmp_path)
    async with running(make_config(), redis_server.url):
        pass
    closed = free_port()
    r = await asyncio.to_thread(_cli, path, f"redis://admin:pw-s3cret@127.0.0.1:{closed}/0")
    _no_verdict(r, "Redis", "pw-s3cret")
    await redis.execute_command("ACL", "SETUSER", "rc", "on", ">pw-r1ght", "~*", "+@all")
    try:
        wrong = redis_server.url.replace("redis://", "redis://rc:pw-wr0ng@")
        r = await asyncio.to_thread(_cli, path, wrong)
        _no_verdict(r, "Redis", "pw-wr0ng")
    finally:
        await redis.execute_command("ACL", "DELUSER", "rc")
    sql = _config_file(tmp_path, f'sql_url = "postgresql://u:pg-s3cret@127.0.0.1:{closed}/x"\n',
                       name="sql.toml")
    r = await asyncio.to_thread(_cli, sql, redis_server.url)
    _no_verdict(r, "SQL archive", "pg-s3cret")
    r = await asyncio.to_thread(_cli, path, redis_server.url)  # the same, reachable: a pass
    assert r.returncode == 0, r.stdout + r.stderr


def _cli_no_url(path) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "engine.run.cli", "reconcile", "--config", str(path)])


async def test_reconcile_command_reads_the_running_engines_embedded_redis(
        redis, redis_server, tmp_path):
    """With no Redis URL and an engine running on the state dir, its own redis-server is
    read: a second one started on the same AOF files read a stale copy."""
    path = _config_file(tmp_path)
    async with running(make_config(), redis_server.url):
        pass
    record = PidFile(tmp_path)  # this process plays the engine holding the state dir
    record.acquire(EngineState(pid=os.getpid(), config=str(path), redis_url=redis_server.url))
    try:
        r = await asyncio.to_thread(_cli_no_url, path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "reconcile: 5 accounts checked, 0 problems" in r.stdout
        assert not (tmp_path / "redis").exists()  # no second redis-server was started
        record.write(EngineState(pid=os.getpid(), config=str(path)))  # a given Redis
        r = await asyncio.to_thread(_cli_no_url, path)
        assert r.returncode == 2 and "pass --redis-url" in r.stderr, r.stdout + r.stderr
    finally:
        record.release()

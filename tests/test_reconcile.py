"""reconcile: Redis ledger streams, plus the SQL archive once the ledger worker trimmed them."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from billing.archive import Archive
from engine import keys
from engine.reconcile import reconcile
from tests.harness import BASE_TOML, buyer, campaign, make_config, running


async def test_reconcile_with_archive_after_trim(redis, redis_server, tmp_path):
    cfg = make_config(campaign(), buyer("b1", price="10.00"))
    async with running(cfg, redis_server.url) as eng:
        for i in range(5):
            await eng.lead(email=f"a{i}@example.com")
        archive = await Archive.open(None, path=str(tmp_path / "ledger.sqlite3"))
        try:
            await archive.archive_once(redis, "t1", consumer="test")
            assert await redis.xlen(keys.acct_ledger("t1", "c1")) < 6  # trimmed after commit
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
    cmd = [sys.executable, "-m", "engine.cli", "reconcile", "--config", str(path),
           "--redis-url", redis_server.url]
    ok = await asyncio.to_thread(_run, cmd)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    await redis.hincrby(keys.acct("t1", "wallet"), "bal", -1)
    bad = await asyncio.to_thread(_run, cmd)
    assert bad.returncode == 1 and "FAIL t1/wallet" in bad.stdout

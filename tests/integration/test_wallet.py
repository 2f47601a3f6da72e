"""``leadflow wallet credit``: the platform operator credits a tenant's platform-fee wallet.

A tenant cannot credit its own wallet through the API (403 wallet_not_creditable: free
money against the fees); a payment the platform received outside leadflow had no way in
but a card funding. The operator's credit is one idempotent adjust.lua step.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

from engine.core.constants import WALLET
from engine.run.wallet import credit_wallet
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running

D = 1_000_000


async def _wallet_entries(eng) -> list[dict[str, str]]:
    return [f for _, f in await eng.store.ledger_page("t1", WALLET)]


async def test_an_operator_credit_lands_once_per_reference(redis, redis_server):
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        before = await eng.balance(WALLET)
        done = await credit_wallet(cfg, eng.store, "t1", "250.00", ref="wire-1", note="March")
        assert done.ok and "credited $250.00" in done.message, done
        assert await eng.balance(WALLET) == before + 250 * D
        entry = (await _wallet_entries(eng))[0]
        assert (entry["kind"], entry["delta"], entry["process"], entry["reference"],
                entry["note"]) == ("funding", str(250 * D), "operator", "wire-1", "March")
        again = await credit_wallet(cfg, eng.store, "t1", "250.00", ref="wire-1")
        assert again.ok and "already credited" in again.message
        other = await credit_wallet(cfg, eng.store, "t1", "99.00", ref="wire-1")
        assert not other.ok and "was used for a credit of $250.00" in other.message
        refused = [await credit_wallet(cfg, eng.store, tenant, amount, ref=ref)
                   for tenant, amount, ref in [("nope", "1.00", "r"), ("t1", "0", "r"),
                                               ("t1", "-5.00", "r"), ("t1", "abc", "r"),
                                               ("t1", "1.00", ""), ("t1", "1.00", "x" * 101)]]
        assert [r.ok for r in refused] == [False] * 6, refused
        assert await eng.balance(WALLET) == before + 250 * D  # once, whatever came after
        assert len(await _wallet_entries(eng)) == 2  # the opening entry and the credit
        await eng.assert_reconciled()


async def test_a_credit_lets_a_wallet_at_its_floor_route_again(redis, redis_server):
    """No routing without funds (the seeds): a wallet at its floor refuses leads (203)
    until it is funded; the operator's credit is such a funding."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        await eng.store.adjust("t1", WALLET, -1_020 * D, "adjustment", op_id="drain",
                               enforce_floor=False)  # $1,000 -> -$20.00, the floor
        status, body = await eng.lead(email="stuck@example.com")
        assert status == 200 and body["code"] == 203, body
        assert (await credit_wallet(cfg, eng.store, "t1", "50.00", ref="wire-2")).ok
        status, body = await eng.lead(email="flows@example.com")
        assert status == 200 and body["status"] == "ACCEPTED", body
        await eng.assert_reconciled()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.run.cli", "wallet", "credit", *args],
                          check=False, capture_output=True, text=True, timeout=60)


async def test_wallet_credit_command_exit_codes(redis, redis_server, tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(BASE_TOML + f'\n[settings]\nstate_dir = "{tmp_path}"\n')
    async with running(make_config(), redis_server.url) as eng:
        before = await eng.balance(WALLET)
        common = ["--config", str(path), "--redis-url", redis_server.url]
        ok = await asyncio.to_thread(_cli, "t1", "12.50", "--ref", "chk-7", *common)
        assert ok.returncode == 0 and "credited $12.50" in ok.stdout, ok.stdout + ok.stderr
        replay = await asyncio.to_thread(_cli, "t1", "12.50", "--ref", "chk-7", *common)
        assert replay.returncode == 0 and "already credited" in replay.stdout
        refused = await asyncio.to_thread(_cli, "t9", "12.50", "--ref", "chk-8", *common)
        assert refused.returncode == 1 and "unknown tenant" in refused.stderr
        down = await asyncio.to_thread(_cli, "t1", "1.00", "--ref", "chk-9", "--config",
                                       str(path), "--redis-url", "redis://127.0.0.1:1/0")
        assert down.returncode == 2 and "could not run" in down.stderr, down.stderr
        assert await eng.balance(WALLET) == before + 12_500_000

"""The archive's totals read while the ledger worker archives (found by review): an entry
archived between the stream snapshot and the SQL sum is counted once, not twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from billing.archive import Archive, account_totals, period_totals
from engine.core import keys
from engine.store.store import Store

T, ACCOUNT = "t1", "c1"


async def _racing(redis: aioredis.Redis, tmp_path: Path) -> Archive:
    """An archive whose SQL reads run after the ledger worker archived the one entry."""
    arc = await Archive.open(path=str(tmp_path / "ledger.db"))
    await redis.hset(keys.acct(T, ACCOUNT), mapping={"bal": "-10000000"})
    await redis.xadd(keys.ledger(T), {"account": ACCOUNT, "kind": "lead", "delta": "-10000000",
                                      "balance": "-10000000", "ref": "L1", "ts": "1500"})
    for name in ("period_sums", "account_sum"):
        real = getattr(arc, name)

        async def archived_first(*a: Any, _real: Any = real, **kw: Any) -> Any:
            await arc.archive_once(redis, T, consumer="w")  # the worker commits meanwhile
            return await _real(*a, **kw)
        setattr(arc, name, archived_first)
    return arc


async def test_an_entry_archived_during_the_weekly_totals_counts_once(
        redis: aioredis.Redis, tmp_path: Path) -> None:
    arc = await _racing(redis, tmp_path)
    try:
        totals = await period_totals(Store(redis), arc, T, ACCOUNT, from_ms=1000, to_ms=2000)
        assert (totals.leads, totals.spent) == (1, 10_000_000)
    finally:
        await arc.close()


async def test_an_entry_archived_during_account_totals_counts_once(
        redis: aioredis.Redis, tmp_path: Path) -> None:
    arc = await _racing(redis, tmp_path)
    try:
        totals = await account_totals(Store(redis), arc, T, ACCOUNT)
        assert totals.ok, totals
    finally:
        await arc.close()

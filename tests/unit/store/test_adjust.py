"""adjust.lua / account_settings.lua / the shared balance machinery, on a real redis-server."""

from __future__ import annotations

import redis.asyncio as aioredis

from engine.core import keys
from engine.store.store import Store

T = "acme"


async def _account(store: Store, **kw: object) -> None:
    args: dict[str, object] = dict(
        opening=100_000_000, floor=-20_000_000, alert=20_000_000, recharge_threshold=0,
        auto_recharge=False, min_balance=None, mode="manual",
    )
    args.update(kw)
    await store.apply_account_settings(T, "c1", **args)  # type: ignore[arg-type]


async def test_opening_balance_is_a_ledger_entry(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store)
    acct = await store.account(T, "c1")
    assert acct is not None and acct.balance == 100_000_000
    assert await store.ledger_sum(T, "c1") == (100_000_000, 1)
    # a reload updates settings, never the balance
    await _account(store, opening=5, floor=-1)
    acct = await store.account(T, "c1")
    assert acct is not None and acct.balance == 100_000_000 and acct.floor == -1


async def test_idempotent_credit(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store)
    first = await store.adjust(T, "c1", 5_000_000, "adjustment", op_id="op-1")
    again = await store.adjust(T, "c1", 5_000_000, "adjustment", op_id="op-1")
    assert first.ok and not first.replay and again.replay
    assert first.balance == again.balance == "105000000"
    assert await store.ledger_sum(T, "c1") == (105_000_000, 2)


async def test_debit_below_floor_refused_and_changes_nothing(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store)
    res = await store.adjust(T, "c1", -120_000_001, "usage", op_id="u1")
    assert not res.ok and res.error == "below_floor"
    assert await store.ledger_sum(T, "c1") == (100_000_000, 1)
    assert await redis.xlen(keys.events(T)) == 0
    ok = await store.adjust(T, "c1", -120_000_000, "usage", op_id="u1")
    assert ok.ok and ok.balance == "-20000000"


async def test_alert_once_per_crossing_and_rearm(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store, opening=25_000_000)
    for i in range(4):
        await store.adjust(T, "c1", -2_000_000, "usage", op_id=f"u{i}")
    events = await redis.xrange(keys.events(T))
    assert [e[1][b"type"] for e in events] == [b"balance_alert"]
    await store.adjust(T, "c1", 10_000_000, "adjustment")
    await store.adjust(T, "c1", -10_000_000, "usage")
    events = await redis.xrange(keys.events(T))
    assert [e[1][b"type"] for e in events] == [b"balance_alert", b"balance_alert"]


async def test_min_balance_pauses_and_credit_resumes(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store, opening=60_000_000, min_balance=50_000_000, alert=0)
    await store.adjust(T, "c1", -15_000_000, "usage")
    acct = await store.account(T, "c1")
    assert acct is not None and acct.paused == "min_balance"
    await store.adjust(T, "c1", 20_000_000, "adjustment")
    acct = await store.account(T, "c1")
    assert acct is not None and acct.paused == ""
    types = [e[1][b"type"] for e in await redis.xrange(keys.events(T))]
    assert types == [b"buyer_paused", b"buyer_resumed"]


async def test_noscript_fallback_after_script_flush(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await store.load_scripts()
    await redis.script_flush()
    await _account(store)
    assert (await store.account(T, "c1")) is not None

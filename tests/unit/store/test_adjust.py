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


async def _events(redis: aioredis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _, f in await redis.xrange(keys.events(T))]


async def test_balance_negative_once_per_crossing_of_zero(redis: aioredis.Redis) -> None:
    """balance_negative: a debit taking the balance from 0 or more to below 0 (the account
    accrues toward its floor). Once per crossing, as balance_alert: again only after a
    credit brought the balance back to 0 or more."""
    store = Store(redis)
    await _account(store, opening=5_000_000, alert=0)
    await store.adjust(T, "c1", -5_000_000, "usage", op_id="u0")  # to 0.00: not negative
    assert await _events(redis) == []
    first = await store.adjust(T, "c1", -3_000_000, "usage", op_id="u1")  # 0 -> -3
    assert first.events == ["balance_negative", 1]
    await store.adjust(T, "c1", -3_000_000, "usage", op_id="u2")  # still negative
    await store.adjust(T, "c1", -3_000_000, "usage", op_id="u2")  # a replay
    await store.adjust(T, "c1", 4_000_000, "adjustment")  # -6 -> -2: still negative
    await store.adjust(T, "c1", -1_000_000, "usage")
    assert [e["type"] for e in await _events(redis)] == ["balance_negative"]
    await store.adjust(T, "c1", 3_000_000, "adjustment")  # -3 -> 0: back at 0
    await store.adjust(T, "c1", -1_000_000, "usage")  # 0 -> -1: the second crossing
    events = await _events(redis)
    assert [(e["type"], e["account"], e["balance"], e["floor"]) for e in events] == [
        ("balance_negative", "c1", "-3000000", "-20000000"),
        ("balance_negative", "c1", "-1000000", "-20000000"),
    ]


async def test_balance_negative_not_for_an_account_without_balance_checks(
        redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store, opening=1_000_000, alert=0, mode="none")
    await store.adjust(T, "c1", -5_000_000, "usage")
    assert await _events(redis) == []


async def test_funding_received_for_a_credit_of_kind_funding_only(
        redis: aioredis.Redis) -> None:
    """A funding credit (by card: the credit carries the card's payment_method; a manual
    or operator credit: not) emits funding_received with amount and method, once per op
    id; a recharge (its own events, from billing), usage, a negative funding do not."""
    store = Store(redis)
    await _account(store, alert=0)
    card = await store.adjust(T, "c1", 100_000_000, "funding", op_id="pi_1",
                              extra={"payment_method": "pm_1", "process": "manual_funding"})
    assert card.events == ["funding_received", 1]
    manual = await store.adjust(T, "c1", 5_000_000, "funding", op_id="credit:c1:k",
                                extra={"process": "manual", "note": "wire"})
    again = await store.adjust(T, "c1", 5_000_000, "funding", op_id="credit:c1:k",
                               extra={"process": "manual", "note": "wire"})
    assert manual.ok and again.replay  # (its reply is the first call's, events too)
    await store.adjust(T, "c1", 100_000_000, "recharge", op_id="pi_2",
                       extra={"payment_method": "pm_1"})
    await store.adjust(T, "c1", -1_000_000, "usage", op_id="u1")
    await store.adjust(T, "c1", -1_000_000, "funding", op_id="correction")
    events = await _events(redis)
    assert [(e["type"], e["amount"], e["method"], e["ref"], e["balance"]) for e in events] == [
        ("funding_received", "100000000", "card", "pi_1", "200000000"),
        ("funding_received", "5000000", "manual", "credit:c1:k", "205000000"),
    ]
    assert await store.ledger_sum(T, "c1") == (303_000_000, 6)


async def test_an_event_given_to_adjust_is_emitted_with_its_change_once(
        redis: aioredis.Redis) -> None:
    """Store.adjust(event=...): the event a change completes (refund_processed with the
    last booking of a balance refund) is written in the change's step, with the balance
    after it; a replay of the op id emits nothing."""
    store = Store(redis)
    await _account(store, alert=0)
    notice = {"type": "refund_processed", "amount": "40000000"}
    res = await store.adjust(T, "c1", -40_000_000, "refund", op_id="refund:re_1",
                             enforce_floor=False, event=notice)
    again = await store.adjust(T, "c1", -40_000_000, "refund", op_id="refund:re_1",
                               enforce_floor=False, event=notice)
    assert res.events == ["refund_processed", 1] and again.replay
    [event] = await _events(redis)
    assert {k: event[k] for k in ("type", "account", "amount", "balance")} == {
        "type": "refund_processed", "account": "c1", "amount": "40000000",
        "balance": "60000000"}


async def test_an_adjust_refused_emits_nothing(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _account(store, alert=0)
    res = await store.adjust(T, "c1", -200_000_000, "usage", op_id="u1",
                             event={"type": "refund_processed", "amount": "1"})
    assert not res.ok and res.error == "below_floor"
    assert await _events(redis) == []

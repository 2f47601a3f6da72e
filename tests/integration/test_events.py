"""Events of #19 through the running engine (real redis-server, real HTTP, decide.lua):
each is emitted exactly once per occurrence, in the step of its balance change.

lead_returned (refund.lua, a buyer's return), cap_reached (decide.lua, the sale that fills
a cap), balance_negative (any debit crossing zero). The Lua-level tests of the others:
tests/unit/store/test_adjust.py (balance_negative, funding_received),
tests/unit/billing/test_billing_funding.py (refund_processed),
tests/unit/delivery/test_delivery_worker.py (webhook_failing).
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.core import keys
from engine.core.constants import WALLET
from engine.store.scripts import scripts
from tests.helpers.harness import Engine, buyer, campaign, make_config, running


async def _of(eng: Engine, etype: str) -> list[dict[str, str]]:
    return [e for e in await eng.events() if e["type"] == etype]


async def test_a_return_is_one_lead_returned_event_and_a_delivery_refund_none(
        redis, redis_server) -> None:
    cfg = make_config(campaign(), buyer("b1", price="10.00"))
    async with running(cfg, redis_server.url) as eng:
        _, lead = await eng.lead(email="r@example.com")
        _, other = await eng.lead(email="o@example.com")
        path = f"/v1/leads/{lead['lead_id']}/returns"
        for _ in range(2):  # the second is a replay: nothing moves, nothing is emitted
            status, _body = await eng.api("POST", path,
                                          json={"buyer": "b1", "reason": "wrong_number"})
            assert status == 200
        # the delivery worker's refund of a rejected lead: not a return
        assert (await eng.store.refund_sale("t1", other["lead_id"], "b1", "rejected")).ok
        [event] = await _of(eng, "lead_returned")
        assert {k: event[k] for k in ("account", "lead_id", "buyer", "amount", "reason",
                                      "balance")} == {
            "account": "c1", "lead_id": lead["lead_id"], "buyer": "b1",
            "amount": "10000000", "reason": "return: wrong_number", "balance": "90000000"}
        await eng.assert_reconciled()


async def test_cap_reached_once_by_the_filling_sale_even_when_a_refund_frees_the_slot(
        redis, redis_server) -> None:
    """b1's daily cap of 2: the second sale fills it (one cap_reached: buyer, cap, window,
    on its client's account); the third lead goes to b2. A rejection refunds a sale and
    frees the slot, the next lead fills it again: the day was told already, no second
    event."""
    cfg = make_config(campaign(), buyer("b1", price="10.00", extra="caps = { day = 2 }"),
                      buyer("b2", client="c2", priority=2))
    async with running(cfg, redis_server.url) as eng:
        sold = []
        for i in range(3):
            _, r = await eng.lead(email=f"c{i}@example.com")
            assert r["status"] == "ACCEPTED", r
            sold.append(r)
        [event] = await _of(eng, "cap_reached")
        assert {k: event[k] for k in ("account", "buyer", "campaign", "cap", "window", "ref",
                                      "balance")} == {
            "account": "c1", "buyer": "b1", "campaign": "camp", "cap": "2", "window": "day",
            "ref": sold[1]["lead_id"], "balance": "80000000"}
        jobs = await redis.xrange(keys.deliveries("t1"))
        assert [f[b"buyer"] for _, f in jobs] == [b"b1", b"b1", b"b2"]

        assert (await eng.store.refund_sale("t1", sold[1]["lead_id"], "b1", "rejected")).ok
        _, r = await eng.lead(email="refill@example.com")
        assert r["status"] == "ACCEPTED"
        jobs = await redis.xrange(keys.deliveries("t1"))
        assert jobs[-1][1][b"buyer"] == b"b1"  # the freed slot, filled again
        assert len(await _of(eng, "cap_reached")) == 1
        await eng.assert_reconciled()


async def test_cap_reached_names_the_widest_window_filled_and_hourly_caps_are_not_told(
        redis, redis_server) -> None:
    cfg = make_config(
        campaign(),
        buyer("b1", price="1.00", extra="caps = { day = 1, total = 1 }"),
        buyer("b2", client="c2", price="1.00", priority=2, extra="caps = { hour = 1 }"),
        buyer("b3", client="c2", price="1.00", priority=3, extra="caps = { week = 1 }"))
    async with running(cfg, redis_server.url) as eng:
        for i in range(3):
            _, r = await eng.lead(email=f"w{i}@example.com")
            assert r["status"] == "ACCEPTED", r
        _, r = await eng.lead(email="none@example.com")
        assert r["status"] == "REJECTED" and r["code"] == 201
        events = await _of(eng, "cap_reached")
        assert [(e["buyer"], e["window"], e["cap"]) for e in events] == [
            ("b1", "total", "1"), ("b3", "week", "1")]


def _lead(n: int, win: list[str], cap: list[int]) -> dict[str, Any]:
    return {"id": f"L{n}", "k": f"k{n}", "kt": 60, "t": 0, "c": "camp", "fi": 0, "n": 1,
            "rr": 0, "q": [], "d": [], "dt": 60, "win": win, "x": "{}",
            "cs": [{"b": "b1", "a": "c1", "p": 1, "fo": 0, "bd": [], "cap": cap}]}


async def test_cap_reached_once_per_window(redis, redis_server) -> None:
    """Driven through decide.lua with the window ids of its call: a new day fills the
    daily cap again and is told again; a test lead fills nothing."""
    cfg = make_config(campaign(), buyer("b1"))
    day = [-1, 1, -1, -1, -1, -1, -1]
    async with running(cfg, redis_server.url) as eng:
        async def run(n: int, win: list[str], test: int = 0) -> str:
            raw = await scripts().decide(redis, [keys.tenant_prefix("t1")], [msgspec.json.encode(
                {"now": 1, "w": WALLET, "leads": [{**_lead(n, win, day), "t": test}]})])
            return msgspec.json.decode(raw)["r"][0]["s"]  # type: ignore[no-any-return]

        assert await run(0, ["h1", "d1", "w1", "m1"], test=1) == "ACCEPTED"
        assert await _of(eng, "cap_reached") == []
        assert await run(1, ["h1", "d1", "w1", "m1"]) == "ACCEPTED"
        assert await run(2, ["h1", "d1", "w1", "m1"]) == "REJECTED"
        assert await run(3, ["h2", "d2", "w1", "m1"]) == "ACCEPTED"
        assert [(e["window"], e["ref"]) for e in await _of(eng, "cap_reached")] == [
            ("day", "L1"), ("day", "L3")]


async def test_a_lead_crossing_zero_is_one_balance_negative_for_the_client(
        redis, redis_server) -> None:
    """$100 at $30 a lead: 100 -> 70 -> 40 -> 10 -> -20 (the floor), then refused. The
    fourth lead crosses zero: one balance_negative (balance, floor). A credit lifts the
    balance to $50; 50 -> 20 -> -10 crosses again: a second one."""
    cfg = make_config(campaign(), buyer("b1", price="30.00"))
    async with running(cfg, redis_server.url) as eng:
        for i in range(5):
            await eng.lead(email=f"n{i}@example.com")
        [event] = await _of(eng, "balance_negative")
        assert (event["account"], event["balance"], event["floor"]) == (
            "c1", "-20000000", "-20000000")
        status, _ = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "70.00"},
                                  headers={"Idempotency-Key": "top-up-1"})
        assert status == 201
        for i in range(2):
            _, r = await eng.lead(email=f"again{i}@example.com")
            assert r["status"] == "ACCEPTED"
        events = await _of(eng, "balance_negative")
        assert [e["balance"] for e in events] == ["-20000000", "-10000000"]
        assert len(await _of(eng, "funding_received")) == 1  # the credit
        await eng.assert_reconciled()

"""Distribution methods, caps, schedules, floors and wallet rules through the real engine."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import msgspec

from engine.core import keys
from engine.routing.plans import smooth_wrr
from tests.helpers.harness import buyer, campaign, make_config, running


def _emails(n: int, tag: str = "x") -> list[str]:
    return [f"{tag}{i}@example.com" for i in range(n)]


async def _sold_to(eng, n: int, tag: str = "x", **fields) -> list[str]:
    out = []
    for email in _emails(n, tag):
        _, r = await eng.lead(email=email, **fields)
        assert r["status"] == "ACCEPTED", r
        out.append(r)
    jobs = await eng.redis.xrange(keys.deliveries("t1"))
    return [f[b"buyer"].decode() for _, f in jobs]


def test_smooth_wrr_spreads_heavy_buyers():
    assert smooth_wrr([3, 1]) == [0, 0, 1, 0]
    assert Counter(smooth_wrr([5, 2, 1])) == {0: 5, 1: 2, 2: 1}


async def test_waterfall_priority_then_next(redis, redis_server):
    cfg = make_config(campaign(), buyer("b1", priority=1), buyer("b2", client="c2", priority=2))
    async with running(cfg, redis_server.url) as eng:
        assert await _sold_to(eng, 3) == ["b1"] * 3
        await eng.api("POST", "/v1/buyers/b1/pause")
        await _sold_to(eng, 1, "y")
        jobs = await eng.redis.xrange(keys.deliveries("t1"))
        assert jobs[-1][1][b"buyer"] == b"b2"


async def test_round_robin_alternates(redis, redis_server):
    cfg = make_config(campaign(distribution="round_robin"), buyer("b1"),
                      buyer("b2", client="c2"), buyer("b3"))
    async with running(cfg, redis_server.url) as eng:
        assert await _sold_to(eng, 6) == ["b1", "b2", "b3", "b1", "b2", "b3"]


async def test_round_robin_skips_capped_buyer(redis, redis_server):
    cfg = make_config(campaign(distribution="round_robin"),
                      buyer("b1", extra="caps = { total = 1 }"), buyer("b2", client="c2"))
    async with running(cfg, redis_server.url) as eng:
        assert await _sold_to(eng, 4) == ["b1", "b2", "b2", "b2"]


async def test_round_robin_starves_no_buyer_with_a_narrow_filter(redis, redis_server):
    """b2 and b3 take CA leads only; CA and TX leads alternate. The turn moves one position
    per sale from where the lead started, so b2 and b3 share the CA leads (it used to jump
    past the buyer who took each TX lead, back to b2: b3 never got one)."""
    ca = 'filters = [{ field = "state", op = "states", values = ["CA"] }]'
    cfg = make_config(campaign(distribution="round_robin"), buyer("b1"),
                      buyer("b2", client="c2", extra=ca), buyer("b3", extra=ca))
    async with running(cfg, redis_server.url) as eng:
        for i in range(12):
            _, r = await eng.lead(email=f"rr{i}@example.com", state="CA" if i % 2 else "TX")
            assert r["status"] == "ACCEPTED", r
        jobs = await eng.redis.xrange(keys.deliveries("t1"))
        sold = [f[b"buyer"].decode() for _, f in jobs]
        ca_buyers = Counter(sold[1::2])  # the CA leads
        assert set(sold[0::2]) == {"b1"}  # TX: only b1 may take them
        assert ca_buyers["b2"] >= 2 and ca_buyers["b3"] >= 2, sold


async def test_weighted_round_robin(redis, redis_server):
    cfg = make_config(campaign(distribution="weighted_round_robin"), buyer("b1", weight=3),
                      buyer("b2", client="c2", weight=1))
    async with running(cfg, redis_server.url) as eng:
        assert Counter(await _sold_to(eng, 8)) == {"b1": 6, "b2": 2}


async def test_highest_price_and_exclusive(redis, redis_server):
    for method in ("highest_price", "exclusive"):
        await redis.flushdb()
        cfg = make_config(campaign(distribution=method), buyer("cheap", price="5.00"),
                          buyer("rich", client="c2", price="9.00", priority=5))
        async with running(cfg, redis_server.url) as eng:
            assert await _sold_to(eng, 2) == ["rich", "rich"]


async def test_send_to_all_respects_sell_limit(redis, redis_server):
    cfg = make_config(campaign(distribution="send_to_all", sell_limit=2),
                      buyer("b1", price="3.00"), buyer("b2", client="c2", price="4.00"),
                      buyer("b3", price="5.00"))
    async with running(cfg, redis_server.url) as eng:
        assert sorted(await _sold_to(eng, 1)) == ["b2", "b3"]
        assert await eng.balance("wallet") == 1000_000_000 - 100_000 - 2 * 200_000


async def test_count_and_spend_caps(redis, redis_server):
    cfg = make_config(campaign(),
                      buyer("b1", price="10.00", extra='caps = { hour = 2, spend_day = "25.00" }'),
                      buyer("b2", client="c2", priority=2))
    async with running(cfg, redis_server.url) as eng:
        assert await _sold_to(eng, 4) == ["b1", "b1", "b2", "b2"]
    cfg = make_config(campaign(), buyer("b1", price="10.00", extra='caps = { spend_day = "25.00" }'))
    await redis.flushdb()
    async with running(cfg, redis_server.url) as eng:
        await _sold_to(eng, 2)
        _, r = await eng.lead(email="z@example.com")
        assert r["status"] == "REJECTED" and r["code"] == 201


async def test_schedule_closed_buyer_is_not_a_candidate(redis, redis_server):
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    other = days[(datetime.now(UTC).weekday() + 3) % 7]  # a day that is not today (UTC)
    cfg = make_config(campaign(), buyer("b1", extra=f'schedule = {{ days = ["{other}"] }}'))
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(email="a@example.com")
        assert r["status"] == "REJECTED" and r["code"] == 200


async def test_floor_refuses_debit_pauses_buyer_and_alerts_once(redis, redis_server):
    cfg = make_config(campaign(), buyer("b1", price="30.00"))
    async with running(cfg, redis_server.url) as eng:
        statuses = [(await eng.lead(email=e))[1]["status"] for e in _emails(6)]
        # 100 -> 70 -> 40 -> 10 -> -20 (at the floor) -> refused
        assert statuses == ["ACCEPTED"] * 4 + ["REJECTED"] * 2
        assert await eng.balance("c1") == -20_000_000
        types = [e["type"] for e in await eng.events()]
        assert types.count("balance_alert") == 1 and types.count("buyer_paused") == 1
        state = await eng.store.account("t1", "c1")
        assert state is not None and state.paused == "floor"
        status, body = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "50.00"},
                                     headers={"Idempotency-Key": "top-up-1"})
        assert status == 201 and body["balance"] == "30.00"
        assert (await eng.store.account("t1", "c1")).paused == ""
        _, r = await eng.lead(email="again@example.com")
        assert r["status"] == "ACCEPTED"
        await eng.assert_reconciled()


async def test_tenant_wallet_at_floor_refuses_leads(redis, redis_server):
    base_wallet = 'opening_balance = "0.30"\nfloor = "0.00"\nalert = "0"'
    from tests.helpers.harness import BASE_TOML

    cfg = make_config(campaign(), buyer("b1"),
                      base=BASE_TOML.replace('opening_balance = "1000.00"', base_wallet))
    async with running(cfg, redis_server.url) as eng:
        _, a = await eng.lead(email="a@example.com")
        _, b = await eng.lead(email="b@example.com")
        assert a["status"] == "ACCEPTED" and b["status"] == "REJECTED" and b["code"] == 203
        assert await eng.balance("wallet") == 0
        await eng.assert_reconciled()


async def test_buyer_scope_dedupe(redis, redis_server):
    cfg = make_config(
        campaign(distribution="send_to_all",
                 extra='dedupe = { fields = ["phone"], match = "all", days = 7, scope = "buyer" }'),
        buyer("b1", extra='caps = { total = 1 }'), buyer("b2", client="c2"),
    )
    async with running(cfg, redis_server.url) as eng:
        _, a = await eng.lead(email="a@example.com", phone="2125550123")
        assert a["status"] == "ACCEPTED"
        wallet = await eng.balance("wallet")
        _, b = await eng.lead(email="b@example.com", phone="212-555-0123")
        assert b["status"] == "DUPLICATED" and b["code"] == 101
        assert await eng.balance("wallet") == wallet  # no inbound fee for a duplicate
        _, c = await eng.lead(email="c@example.com", phone="2125550199")
        assert c["status"] == "ACCEPTED"  # b2 only: b1 is at its total cap


async def test_decide_survives_script_flush(redis, redis_server):
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        await redis.script_flush()
        _, r = await eng.lead(email="a@example.com")
        assert r["status"] == "ACCEPTED"


async def test_windows_reset_counts(redis, redis_server):
    """Day/week/month caps count within their window only (driven through decide.lua)."""
    import msgspec

    from engine.core.constants import WALLET
    from engine.store.scripts import scripts

    cfg = make_config(campaign(), buyer("b1", extra="caps = { day = 1, week = 2, month = 3 }"))
    async with running(cfg, redis_server.url):
        def lead(n, win):
            return {"id": f"L{n}", "k": f"k{n}", "kt": 60, "t": 0, "c": "camp", "fi": 0, "n": 1,
                    "rr": 0, "q": [], "d": [], "dt": 60, "win": win, "x": "{}",
                    "cs": [{"b": "b1", "a": "c1", "p": 1, "fo": 0, "bd": [], "cap": [-1, 1, 2, 3, -1, -1, -1]}]}

        async def run(n, win):
            raw = await scripts().decide(redis, [keys.tenant_prefix("t1")], [msgspec.json.encode(
                {"now": 1, "w": WALLET, "leads": [lead(n, win)]})])
            return msgspec.json.decode(raw)["r"][0]["s"]

        assert await run(1, ["h1", "d1", "w1", "m1"]) == "ACCEPTED"
        assert await run(2, ["h1", "d1", "w1", "m1"]) == "REJECTED"  # day cap
        assert await run(3, ["h2", "d2", "w1", "m1"]) == "ACCEPTED"  # new day
        assert await run(4, ["h3", "d3", "w1", "m1"]) == "REJECTED"  # week cap (2)
        assert await run(5, ["h4", "d4", "w2", "m1"]) == "ACCEPTED"  # new week
        assert await run(6, ["h5", "d5", "w3", "m1"]) == "REJECTED"  # month cap (3)
        assert await run(7, ["h6", "d6", "w4", "m2"]) == "ACCEPTED"  # new month


async def test_open_breaker_skips_buyer_until_it_closes(redis, redis_server):
    """A buyer whose delivery breaker is open is skipped like a paused one (decide.lua)."""
    import asyncio
    import time

    from engine.delivery.breaker import Breaker, Breakers, is_open

    cfg = make_config(campaign(), buyer("b1", priority=1), buyer("b2", client="c2", priority=2))
    async with running(cfg, redis_server.url) as eng:
        assert await _sold_to(eng, 1, "a") == ["b1"]
        # the delivery worker opens b1's breaker (what it writes after N failures)
        breakers = Breakers(redis)
        br = breakers.get("t1", "b1", failures=1, cooldown_s=30)
        assert await breakers.failure("t1", "b1", br, int(time.time() * 1000))
        assert await is_open(redis, "t1", "b1")
        assert (await _sold_to(eng, 1, "b"))[-1] == "b2"
        # with no other buyer the lead is refused and the breaker counts as "paused"
        await eng.api("POST", "/v1/buyers/b2/pause")
        _, r = await eng.lead(email="c0@example.com")
        assert r["status"] == "REJECTED" and r["code"] == 202 and "2 paused" in r["message"]
        await eng.api("POST", "/v1/buyers/b2/resume")
        # the probe succeeds: the breaker closes and b1 gets leads again
        await breakers.success("t1", "b1", br)
        assert not await is_open(redis, "t1", "b1")
        assert (await _sold_to(eng, 1, "d"))[-1] == "b1"
        # an open state no worker closes ends by itself with the key's TTL
        short = Breaker(1, 50)
        assert await breakers.failure("t1", "b1", short, int(time.time() * 1000))
        assert (await _sold_to(eng, 1, "e"))[-1] == "b2"
        deadline = time.monotonic() + 5
        while await is_open(redis, "t1", "b1"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert (await _sold_to(eng, 1, "f"))[-1] == "b1"
        await eng.assert_reconciled()


async def test_a_refunded_lead_no_longer_counts_as_a_duplicate(redis, redis_server):
    """Only sold leads count: once every sale of a lead is refunded (rejected by the buyer,
    returned), the same person may be offered again; while one sale stands it may not."""
    dedupe = 'dedupe = { fields = ["email"], match = "all", days = 7 }'
    cfg = make_config(campaign(distribution="send_to_all", extra=dedupe),
                      buyer("b1"), buyer("b2", client="c2"))
    async with running(cfg, redis_server.url) as eng:
        _, a = await eng.lead(email="again@example.com")
        assert a["status"] == "ACCEPTED"
        assert await redis.xlen(keys.deliveries("t1")) == 2  # sold to b1 and b2
        assert (await eng.store.refund_sale("t1", a["lead_id"], "b1", "rejected")).ok
        _, dup = await eng.lead(email="again@example.com", lp_subid1="2")
        assert (dup["status"], dup["code"]) == ("DUPLICATED", 100)  # b2's sale stands
        assert (await eng.store.refund_sale("t1", a["lead_id"], "b2", "rejected")).ok
        _, b = await eng.lead(email="again@example.com", lp_subid1="3")
        assert b["status"] == "ACCEPTED" and b["lead_id"] != a["lead_id"]
        _, dup = await eng.lead(email="again@example.com", lp_subid1="4")
        assert dup["status"] == "DUPLICATED"  # the new sale marks it again
        await eng.assert_reconciled()


async def test_batcher_shares_pending_leads_over_free_call_slots(redis, redis_server):
    """Leads waiting together go out as one Lua call per free slot (two of five with the
    default two calls in flight), not as one call with all of them: one call would leave
    the engine idle while Redis decides, then Redis idle while the engine answers."""
    import asyncio

    import msgspec

    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        batcher = eng.svc.app.batcher("t1")
        assert batcher.max_inflight == 2

        def lead(n):
            return msgspec.json.encode({
                "id": f"S{n}", "k": f"sk{n}", "kt": 60, "t": 0, "c": "camp", "fi": 0, "n": 1,
                "rr": 0, "q": [], "d": [], "dt": 60, "win": ["h", "d", "w", "m"],
                "cs": [{"b": "b1", "a": "c1", "p": 1, "fo": 0, "bd": [],
                        "cap": [-1] * 7}]})

        async def evalsha_calls() -> int:
            return (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]

        before = await evalsha_calls()
        decisions = await asyncio.gather(*(batcher.decide(lead(n), b"{}") for n in range(5)))
        assert [d.s for d in decisions] == ["ACCEPTED"] * 5
        assert [d.id for d in decisions] == [f"S{n}" for n in range(5)]
        assert await evalsha_calls() - before == 2


async def test_a_calls_candidate_table_is_shared_but_each_lead_keeps_its_own_parts(
        redis, redis_server):
    """The engine sends each buyer's candidate object once per call, in a table, and each
    lead refers to it by key with its own buyer-scope fingerprints beside it. Two plans of
    one buyer (a reload between two leads of a call: other price) are two keys; one lead's
    fingerprints never become another's (the table's objects are shared)."""
    import msgspec

    from engine.ingest.batcher import encode_call
    from engine.store.scripts import scripts

    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        def cand(price):
            return msgspec.json.encode({"b": "b1", "a": "c1", "p": price, "fo": 0,
                                        "cap": [-1] * 7})

        table = [b'"old.0":' + cand(1_000_000), b'"new.0":' + cand(2_000_000)]

        def lead(n, key, bd=None):
            obj = {"id": f"T{n}", "k": f"tk{n}", "kt": 60, "t": 0, "c": "camp", "fi": 0,
                   "n": 1, "rr": 0, "q": [], "d": [], "dt": 60, "win": ["h", "d", "w", "m"],
                   "cs": [key]}
            if bd is not None:
                obj["bd"] = [bd]
            return (msgspec.json.encode(obj), b"{}", table, None)

        calls = [lead(1, "old.0", ["fpA"]), lead(2, "new.0", ["fpA"]), lead(3, "old.0"),
                 lead(4, "new.0", ["fpD"])]
        before = await eng.balance("c1")
        raw = await scripts().decide(redis, [keys.tenant_prefix("t1")],
                                     [encode_call(calls, 1), *[b"{}"] * 4])
        results = msgspec.json.decode(raw)["r"]
        assert [(r["s"], r["c"]) for r in results] == [
            ("ACCEPTED", 0), ("DUPLICATED", 101), ("ACCEPTED", 0), ("ACCEPTED", 0)]
        assert [r["sold"] for r in results if r["s"] == "ACCEPTED"] == [
            [["b1", "1000000"]], [["b1", "1000000"]], [["b1", "2000000"]]]
        assert await eng.balance("c1") == before - 4_000_000

        async def record(n):
            return msgspec.json.decode(await redis.hget(keys.lead("t1", f"T{n}"), "b1"))

        assert (await record(1))["bd"] == ["fpA"]
        assert (await record(3))["bd"] in ({}, [])  # none of its own, none leaked in
        assert (await record(4))["bd"] == ["fpD"]
        await eng.assert_reconciled()


BROKE = """
[[clients]]
tenant = "t1"
id = "broke"
opening_balance = "0.00"
floor = "0.00"
"""


def _unfunded_first(funded_last: bool) -> list[str]:
    """A waterfall whose first four buyers (priorities 1-4: the candidates a lead is first
    routed with, sell limit 1 + EXTRA_CANDIDATES) pay from an account without funds; the
    fifth (priority 5) from a funded one, or from the same when ``funded_last`` is off."""
    parts = [campaign(), BROKE]
    for i in range(1, 5):
        parts.append(buyer(f"b{i}", client="broke", priority=i))
    parts.append(buyer("b5", client="c1" if funded_last else "broke", priority=5))
    return parts


async def test_a_lead_whose_first_candidates_cannot_pay_sells_to_the_next(redis, redis_server):
    """The lead goes first with buyers b1-b4 (decide.lua answers MORE: nothing written,
    no idempotency record), then with all five: it sells to b5, once, with one record, one
    sale's ledger entries and one buyer_paused event of the account without funds."""
    from engine.routing.plans import EXTRA_CANDIDATES

    assert EXTRA_CANDIDATES == 3  # the five buyers below are one more than the first
    cfg = make_config(*_unfunded_first(funded_last=True))
    async with running(cfg, redis_server.url) as eng:
        status, r = await eng.lead(email="more@example.com")
        assert (status, r["status"], r["code"]) == (200, "ACCEPTED", 0), r
        jobs = await eng.redis.xrange(keys.deliveries("t1"))
        assert [f[b"buyer"] for _, f in jobs] == [b"b5"]
        assert len(await eng.redis.keys(keys.idem("t1", "*"))) == 1
        ledger = [{k.decode(): v.decode() for k, v in f.items()}
                  for _, f in await eng.redis.xrange(keys.ledger("t1"))
                  if f.get(b"ref") == r["lead_id"].encode()]
        assert sorted((e["account"], e["kind"], e["delta"]) for e in ledger) == [
            ("c1", "lead", "-10000000"), ("wallet", "fee", "-300000")]
        assert await eng.balance("c1") == 90_000_000
        assert await eng.balance("broke") == 0
        assert await eng.balance("wallet") == 1000_000_000 - 300_000
        paused = [e for e in await eng.events() if e["type"] == "buyer_paused"]
        assert [(e["account"], e["reason"]) for e in paused] == [("broke", "floor")]
        # a replay answers the stored decision and changes nothing
        _, again = await eng.lead(email="more@example.com")
        assert again["lead_id"] == r["lead_id"] and again["status"] == "ACCEPTED"
        assert len(await eng.redis.xrange(keys.deliveries("t1"))) == 1
        # the batch endpoint's leads too, each on its own
        lines = [msgspec.json.encode({"lp_campaign_id": "camp", "lp_supplier_id": "s1",
                                      "lp_key": "key-s1", "email": f"more{i}@example.com"})
                 for i in range(3)]
        _, rows = await eng.post(raw=b"\n".join(lines), path="/v1/leads/batch",
                                 headers={"content-type": "application/x-ndjson"})
        assert [row["status"] for row in rows] == ["ACCEPTED"] * 3, rows
        jobs = await eng.redis.xrange(keys.deliveries("t1"))
        assert [f[b"buyer"] for _, f in jobs] == [b"b5"] * 4
        assert len(await eng.redis.keys(keys.idem("t1", "*"))) == 4
        await eng.assert_reconciled()


async def test_a_lead_no_candidate_can_take_is_refused_as_before(redis, redis_server):
    """Every one of the five buyers without funds: the second try, with all five, decides
    it as one try always did (every buyer counted in the message, the inbound fee)."""
    cfg = make_config(*_unfunded_first(funded_last=False))
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(email="none@example.com")
        assert (r["status"], r["code"]) == ("REJECTED", 202), r
        assert r["message"] == ("no matching buyer could take the lead (0 at cap, 0 paused, "
                                "5 without funds)")
        assert len(await eng.redis.keys(keys.idem("t1", "*"))) == 1
        assert await eng.balance("wallet") == 1000_000_000 - 100_000
        await eng.assert_reconciled()

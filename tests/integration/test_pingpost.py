"""Ping-post (#17, docs/pingpost.md): auctions, holds, settlement, expiry and every error
code, through the real engine over HTTP, real ping buyers on loopback (tests/helpers/
buyers.py) and the tests' redis-server. No sleeps: expiry is driven by explicit sweep
calls with an injected clock."""

from __future__ import annotations

import asyncio
from typing import Any

from engine.core import keys
from engine.run.workers import sweep_pings
from engine.store.embedded import EmbeddedRedis
from engine.store.store import now_ms
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running

PP = ('ping_post = {{ ping_fields = ["state"], auction = "{auction}", sell_limit = 2, '
      'min_bid = "{min_bid}", ping_ttl_s = {ttl}{margin} }}')


def pp_campaign(auction: str = "exclusive", min_bid: str = "0.00", ttl: int = 60,
                margin: str = "") -> str:
    return campaign("pp", extra=PP.format(auction=auction, min_bid=min_bid, ttl=ttl,
                                          margin=margin))


def fixed(id: str, price: str, client: str = "c1", priority: int = 1, extra: str = "") -> str:
    return buyer(id, campaign="pp", client=client, price=price, priority=priority,
                 extra=extra + "\n[buyers.ping]\n")


def bidder(id: str, url: str, client: str = "c2", timeout_ms: int = 500,
           delivery: str = "") -> str:
    return buyer(id, campaign="pp", client=client, price="0.00", extra=(
        delivery + f'\n[buyers.ping]\nurl = "{url}"\nsecret = "{SECRET}"\n'
        f'bid_path = "bid"\ntimeout_ms = {timeout_ms}\n'))


def hook(url: str) -> str:
    return (f'[buyers.delivery]\nurl = "{url}"\nsecret = "{SECRET}"\ntimeout_ms = 2000\n'
            'accept = [{ path = "status", equals = "accepted" }]\n')


LEAD = {"email": "ann@example.com", "phone": "4155550123", "state": "CA"}


async def ping(eng: Any, key: str | None = None, **over: Any) -> tuple[int, Any]:
    body = {"lp_campaign_id": "pp", "lp_supplier_id": "s1", "lp_key": "key-s1",
            "state": "CA", **over}
    return await eng.post(body, path="/v1/ping",
                          headers={"Idempotency-Key": key} if key else None)


async def post(eng: Any, ping_id: str, key: str | None = None, **over: Any
               ) -> tuple[int, Any]:
    body = {"lp_campaign_id": "pp", "lp_supplier_id": "s1", "lp_key": "key-s1",
            "lp_ping_id": ping_id, **LEAD, **over}
    return await eng.post(body, path="/v1/post",
                          headers={"Idempotency-Key": key} if key else None)


async def held(eng: Any, account: str) -> int:
    state = await eng.store.account("t1", account)
    return state.held




async def test_exclusive_auction_holds_every_bid_and_settles_the_winner(redis_server,
                                                                       buyers: Buyers):
    cfg = make_config(pp_campaign(margin=', margin = { percent = "20" }'),
                      fixed("fx", "10.00", client="c1"),
                      bidder("url", buyers.url + "/bid/12.00", client="c2"))
    async with running(cfg, redis_server.url) as eng:
        await eng.redis.flushdb()
        from engine.run.provision import provision_accounts
        await provision_accounts(cfg, eng.store)
        status, r = await ping(eng)
        assert status == 200 and r["status"] == "ACCEPTED", r
        assert [b["price"] for b in r["bids"]] == ["9.60"]  # 12.00 less 20 %
        assert await held(eng, "c2") == 12_000_000 and await held(eng, "c1") == 10_000_000
        # the ping buyer got the ping fields only, signed
        (req,) = buyers.at("/bid/12.00")
        assert req.verified and b"ann@" not in req.body and b'"state":"CA"' in req.body
        _, view = await eng.api("GET", "/v1/accounts/c2")
        assert (view["balance"], view["held"], view["available"]) == (
            "100.00", "12.00", "88.00")
        status, d = await post(eng, r["ping_id"])
        assert status == 200 and d["status"] == "ACCEPTED", d
        assert await eng.balance("c2") == 88_000_000 and await eng.balance("c1") == 100_000_000
        assert await held(eng, "c2") == 0 and await held(eng, "c1") == 0  # backup released
        await eng.assert_reconciled()


async def test_shared_auction_sells_the_accepted_bids_only(redis_server, buyers: Buyers):
    cfg = make_config(pp_campaign("shared"), fixed("a", "10.00", client="c1"),
                      fixed("b", "8.00", client="c2"), fixed("c", "5.00", client="c2"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        _, r = await ping(eng)
        assert [b["price"] for b in r["bids"]] == ["10.00", "8.00"]  # sell_limit 2
        status, d = await post(eng, r["ping_id"], bid_ids=["nope"])
        assert (status, d["code"]) == (422, 1066)
        status, d = await post(eng, r["ping_id"], bid_ids=[r["bids"][1]["bid_id"]])
        assert status == 200 and d["status"] == "ACCEPTED", d
        assert await eng.balance("c1") == 100_000_000 and await eng.balance("c2") == 92_000_000
        assert await held(eng, "c1") == 0 and await held(eng, "c2") == 0
        await eng.assert_reconciled()


async def test_min_bid_and_ties(redis_server, buyers: Buyers):
    """Equal bids: the buyer priority first (lower wins), then the buyer id."""
    cfg = make_config(pp_campaign("shared", min_bid="6.00"),
                      fixed("zz", "9.00", client="c1", priority=1),
                      fixed("aa", "9.00", client="c2", priority=2),
                      fixed("mm", "9.00", client="c2", priority=1),
                      fixed("low", "5.00", client="c1"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        _, r = await ping(eng)
        meta = await eng.redis.hget(keys.ping("t1", r["ping_id"]), "m")
        import msgspec
        order = [b[0] for b in msgspec.json.decode(meta)["b"]]
        assert order == ["mm", "zz", "aa"]  # "low" is under min_bid


async def test_eligibility_caps_pause_breaker_and_buyers_sharing_an_account(redis_server,
                                                                           buyers: Buyers):
    """Before any bid: a buyer at its cap, a paused buyer and one whose breaker is open are
    left out; buyers paid by one account are each checked against it (read once)."""
    import time

    import msgspec

    from engine.delivery.breaker import Breakers

    cfg = make_config(pp_campaign("shared"),
                      fixed("capped", "9.00", client="c1", extra="caps = { day = 1 }"),
                      fixed("a", "8.00", client="c2"), fixed("b", "7.00", client="c2"),
                      fixed("paused", "6.00", client="c1"),
                      fixed("broken", "5.00", client="c1"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)

        held_by: list[str] = []

        async def bidders() -> list[str]:
            """The buyers that bid on a new ping (held_by: those held), then released."""
            _, r = await ping(eng)
            raw = await eng.redis.hgetall(keys.ping("t1", r["ping_id"]))
            await eng.store.ping_release("t1", r["ping_id"])
            bids = [b[0] for b in msgspec.json.decode(raw[b"m"])["b"]]
            held_by[:] = [b for b in bids if f"h:{b}".encode() in raw]
            return bids

        assert await bidders() == ["capped", "a", "b", "paused", "broken"] == held_by
        _, r = await ping(eng)
        status, d = await post(eng, r["ping_id"], bid_ids=[r["bids"][0]["bid_id"]])
        assert status == 200 and d["status"] == "ACCEPTED", d  # "capped" sold: day cap 1
        status, _ = await eng.api("POST", "/v1/buyers/paused/pause")
        assert status == 200
        breakers = Breakers(eng.redis)
        br = breakers.get("t1", "broken", failures=1, cooldown_s=30)
        assert await breakers.failure("t1", "broken", br, int(time.time() * 1000))
        assert await bidders() == ["a", "b"]
        # c2 can hold one 8.00 bid above its floor (-20.00), not a 7.00 one beside it
        await eng.store.adjust("t1", "c2", -110_000_000, "adjustment", enforce_floor=False)
        assert await bidders() == ["a", "b"]  # each asked (10.00 above the floor) ...
        assert held_by == ["a"]  # ... and held while the account could cover it
        await eng.assert_reconciled()


async def test_test_ping_holds_nothing_and_its_post_sells_nothing(redis_server, buyers):
    cfg = make_config(pp_campaign(), fixed("fx", "10.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        wallet = await eng.balance("wallet")
        _, r = await ping(eng, lp_action="test")
        assert r["status"] == "ACCEPTED" and r["test"] is True
        assert await held(eng, "c1") == 0
        status, d = await post(eng, r["ping_id"], lp_action="test")
        assert status == 200 and d["test"] is True and d["status"] == "ACCEPTED"
        assert await eng.balance("c1") == 100_000_000 and await eng.balance("wallet") == wallet


async def test_error_codes(redis_server, buyers: Buyers):
    extra = '[[suppliers]]\ntenant = "t1"\nid = "s9"\nkey = "key-s9"\n'
    cfg = make_config(pp_campaign(), campaign("direct"), fixed("fx", "10.00"), extra)
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        status, r = await ping(eng, lp_campaign_id="direct")
        assert (status, r["code"]) == (400, 1060)
        status, r = await ping(eng, state="nowhere")
        assert (status, r["code"]) == (422, 1020)
        status, d = await post(eng, "no-such-ping")
        assert (status, d["code"]) == (404, 1061)
        _, r = await ping(eng)
        status, d = await post(eng, r["ping_id"], lp_supplier_id="s9", lp_key="key-s9")
        assert (status, d["code"]) == (403, 1065)
        status, d = await post(eng, r["ping_id"], state="TX")
        assert (status, d["code"]) == (422, 1063)
        status, d = await post(eng, r["ping_id"], key="k1")
        assert status == 200 and d["status"] == "ACCEPTED"
        again = await post(eng, r["ping_id"], key="k1")  # a replay: the same answer
        assert again == (200, d)
        status, d2 = await post(eng, r["ping_id"], key="k2", email="bob@example.com")
        assert (status, d2["code"]) == (409, 1062)
        assert await eng.balance("c1") == 90_000_000  # one sale
        # a buyer without funds for any bid: REJECTED 206
        await eng.store.adjust("t1", "c1", -105_000_000, "adjustment", enforce_floor=False)
        _, r = await ping(eng)
        assert (r["status"], r["code"]) == ("REJECTED", 206)
        await eng.assert_reconciled()


async def test_ping_replay_by_idempotency_key_holds_once(redis_server, buyers: Buyers):
    cfg = make_config(pp_campaign(), bidder("url", buyers.url + "/bid/7.00", client="c1"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        a = await ping(eng, key="p1")
        b = await ping(eng, key="p1")
        assert a == b and a[1]["status"] == "ACCEPTED"
        assert len(buyers.at("/bid/7.00")) == 1  # the replay asked no buyer
        assert await held(eng, "c1") == 7_000_000


async def test_buyers_that_time_out_answer_garbage_or_close_give_no_bid(redis_server,
                                                                       buyers: Buyers):
    cfg = make_config(
        pp_campaign(),
        bidder("slow", buyers.url + "/bid_slow", client="c1", timeout_ms=50),
        bidder("text", buyers.url + "/text", client="c1"),
        bidder("garbage", buyers.raw_url + "/garbage", client="c1"),
        bidder("reset", buyers.raw_url + "/reset", client="c1"),
        bidder("ok", buyers.url + "/bid/3.00", client="c2"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        status, r = await ping(eng)
        assert status == 200 and r["status"] == "ACCEPTED"
        assert await held(eng, "c1") == 0 and await held(eng, "c2") == 3_000_000
        raw = await eng.redis.hgetall(keys.ping("t1", r["ping_id"]))
        assert [k for k in raw if k.startswith(b"h:")] == [b"h:ok"]


async def test_cascade_winner_rejects_second_accepts_one_net_charge(redis_server,
                                                                   buyers: Buyers):
    cfg = make_config(
        pp_campaign(),
        bidder("high", buyers.url + "/bid/20.00", client="c1", delivery=hook(
            buyers.url + "/reject")),
        bidder("next", buyers.url + "/bid/15.00", client="c2", delivery=hook(
            buyers.url + "/accept")))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        _, r = await ping(eng)
        status, d = await post(eng, r["ping_id"])
        assert status == 200 and d["status"] == "ACCEPTED", d
        assert await eng.balance("c1") == 100_000_000  # debited, then refunded
        assert await eng.balance("c2") == 85_000_000
        assert await held(eng, "c1") == 0 and await held(eng, "c2") == 0
        await eng.assert_reconciled()


async def test_expiry_post_refused_and_hold_gone(redis_server, buyers: Buyers):
    cfg = make_config(pp_campaign(ttl=30), fixed("fx", "10.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        _, r = await ping(eng)
        assert await held(eng, "c1") == 10_000_000
        assert await sweep_pings(eng.store, ["t1"]) == 0  # not expired yet
        later = now_ms() + 31_000  # the injected clock: past the ping's ttl
        assert await sweep_pings(eng.store, ["t1"], now=later) == 1
        assert await held(eng, "c1") == 0
        assert await eng.redis.zcard(keys.holds("t1", "c1")) == 0
        status, d = await post(eng, r["ping_id"])
        assert (status, d["code"]) == (410, 1064)
        assert await eng.balance("c1") == 100_000_000
        await eng.assert_reconciled()


async def test_sweep_releases_more_expired_pings_than_one_call_takes(redis_server, buyers):
    """The sweep calls ping_sweep.lua in batches of SWEEP_BATCH until one returns fewer:
    every expired ping is released in one pass however many there are."""
    from engine.run.workers import SWEEP_BATCH

    cfg = make_config(pp_campaign(ttl=30), fixed("fx", "1.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        n = 2 * SWEEP_BATCH + 3
        await asyncio.gather(*(ping(eng) for _ in range(n)))
        assert await held(eng, "c1") == n * 1_000_000
        assert await sweep_pings(eng.store, ["t1"], now=now_ms() + 31_000) == n
        assert await held(eng, "c1") == 0 and await eng.redis.zcard(keys.pings("t1")) == 0
        await eng.assert_reconciled()


async def test_expired_holds_are_released_lazily_by_the_next_hold(redis_server, buyers):
    """An account read by a script with a clock past a hold's expiry releases it."""
    cfg = make_config(pp_campaign(ttl=30), fixed("fx", "70.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        await ping(eng)
        assert await held(eng, "c1") == 70_000_000
        _, r2 = await ping(eng)  # 100 - 70 - 70 < -20 (the floor): no second hold
        assert r2["code"] == 206
        call = {"now": now_ms() + 31_000, "id": "later", "ex": now_ms() + 60_000, "kt": 60,
                "w": "wallet", "fi": 0, "fo": 0, "c": "pp", "t": 0, "k": "", "kt2": 60,
                "n": 1, "m": "{}", "xa": "", "bids": [["fx", "c1", 70_000_000, "70.00", "x"]]}
        res = await eng.store.ping_hold("t1", call)
        # the old hold released (counted in the events), the new placed
        assert res.s == "ACCEPTED" and res.e == ["hold:expired", 1]
        assert await held(eng, "c1") == 70_000_000
        await eng.assert_reconciled()


async def test_holds_under_concurrency_exactly_ten_of_1000(redis_server, buyers: Buyers):
    await _concurrent(redis_server, 1_000)  # about 2 s on 2 cores


async def _concurrent(redis_server: EmbeddedRedis, n: int) -> None:
    """n concurrent pings against a buyer whose available balance covers exactly 10 bids
    above its floor: exactly 10 held; posts for all 10 settle; never below the floor."""
    floor_toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                                   'id = "c1"\nopening_balance = "100.00"\nfloor = "0.00"')
    cfg = make_config(pp_campaign(), fixed("fx", "10.00"), base=floor_toml)
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        answers = await asyncio.gather(*(ping(eng) for _ in range(n)))
        won = [r["ping_id"] for s, r in answers if s == 200 and r["status"] == "ACCEPTED"]
        assert len(won) == 10
        assert all(r["code"] == 206 for s, r in answers if r["status"] != "ACCEPTED")
        assert await held(eng, "c1") == 100_000_000
        posts = await asyncio.gather(*(post(eng, p, email=f"u{i}@example.com")
                                       for i, p in enumerate(won)))
        assert [d["status"] for _, d in posts] == ["ACCEPTED"] * 10, posts
        state = await eng.store.account("t1", "c1")
        assert (state.balance, state.held) == (0, 0)
        await eng.assert_reconciled()


async def test_redis_down_mid_ping_is_503_and_holds_nothing(tmp_path, buyers: Buyers):
    server = EmbeddedRedis(tmp_path / "r", persistent=False).start()
    cfg = make_config(pp_campaign(), bidder("slow", buyers.url + "/bid_slow",
                                            client="c1", timeout_ms=5_000))
    try:
        async with running(cfg, server.url) as eng:
            task = asyncio.create_task(ping(eng))
            await buyers.reached("/bid_slow")  # the ping is out, waiting for the bid
            server.stop()
            buyers.release.set()
            status, r = await task
            assert (status, r["code"]) == (503, 1040)
    finally:
        server.stop()


async def _fresh(eng: Any, cfg: Any) -> None:
    """A clean database with the config's accounts (the tests share one redis-server)."""
    from engine.run.provision import provision_accounts

    await eng.redis.flushdb()
    await eng.store.load_scripts()
    await provision_accounts(cfg, eng.store)

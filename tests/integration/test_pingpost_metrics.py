"""Ping-post metrics (#17, docs/metrics.md): pings and posts by campaign and status (the
ping-to-post ratio), bid requests by buyer and outcome (the timeout-rate alert), the bid
latency histogram, and holds placed, settled, released and expired, the lazy releases of
decide.lua and adjust.lua included. Through the real engine (which reports to the
process-wide METRICS) with real ping buyers on loopback; counts are read as deltas."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from engine.core import keys
from tests.helpers.buyers import Buyers
from tests.integration.test_pingpost import (
    LEAD,
    _fresh,
    bidder,
    fixed,
    held,
    ping,
    post,
    pp_campaign,
)


class Counts:
    """The samples named in ``wanted`` now; :meth:`delta` their growth since."""

    def __init__(self, wanted: dict[str, tuple[str, dict[str, str]]]) -> None:
        self.wanted = wanted
        self.before = self.read()

    def read(self) -> dict[str, float]:
        return {k: REGISTRY.get_sample_value(name, labels) or 0.0
                for k, (name, labels) in self.wanted.items()}

    def delta(self) -> dict[str, float]:
        now = self.read()
        return {k: now[k] - self.before[k] for k in now}


def wanted() -> dict[str, tuple[str, dict[str, str]]]:
    return {
        "pings": ("leadflow_pings_total", {"campaign": "pp", "status": "accepted"}),
        "posts": ("leadflow_ping_posts_total", {"campaign": "pp", "status": "accepted"}),
        "post_errors": ("leadflow_ping_posts_total", {"campaign": "pp", "status": "error"}),
        "slow_timeout": ("leadflow_ping_bid_requests_total",
                         {"buyer": "slow", "outcome": "timeout"}),
        "b12_bid": ("leadflow_ping_bid_requests_total", {"buyer": "b12", "outcome": "bid"}),
        "slow_latency": ("leadflow_ping_bid_duration_seconds_count", {"buyer": "slow"}),
        "b12_latency": ("leadflow_ping_bid_duration_seconds_count", {"buyer": "b12"}),
        "bids_timeout": ("leadflow_ping_bids_total", {"campaign": "pp", "outcome": "timeout"}),
        "placed": ("leadflow_holds_total", {"event": "placed"}),
        "settled": ("leadflow_holds_total", {"event": "settled"}),
        "released": ("leadflow_holds_total", {"event": "released"}),
        "expired": ("leadflow_holds_total", {"event": "expired"}),
    }


async def _age(eng: Any, account: str, ping_id: str, buyer: str) -> None:
    """The ping's hold of ``buyer`` past its expiry, as time would leave it (no sleep)."""
    hk = keys.holds("t1", account)
    (member,) = [m for m in await eng.redis.zrange(hk, 0, -1)
                 if m.decode().startswith(f"{ping_id}|{buyer}|")]
    await eng.redis.zadd(hk, {member: 1})
    await eng.redis.hset(keys.acct("t1", account), "hnext", 1)
    await eng.redis.hset(keys.ping("t1", ping_id), "ex", 1)


async def test_ping_post_counts(redis_server, buyers: Buyers) -> None:
    from tests.helpers.harness import make_config, running

    cfg = make_config(pp_campaign(), fixed("fx", "10.00", client="c1"),
                      bidder("b12", buyers.url + "/bid/12.00", client="c2"),
                      bidder("slow", buyers.url + "/bid_slow", client="c2", timeout_ms=50))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        c = Counts(wanted())
        status, r = await ping(eng)
        assert status == 200 and r["status"] == "ACCEPTED", r
        status, d = await post(eng, r["ping_id"], key="k1")
        assert status == 200 and d["status"] == "ACCEPTED", d
        assert await post(eng, r["ping_id"], key="k1") == (200, d)  # a replay: not counted
        status, d = await post(eng, "no-such-ping")
        assert status == 404
        got = c.delta()
        assert got == {**got, "pings": 1, "posts": 1, "post_errors": 1, "slow_timeout": 1,
                       "b12_bid": 1, "slow_latency": 1, "b12_latency": 1, "bids_timeout": 1,
                       "placed": 2, "settled": 1, "released": 1, "expired": 0}, got


async def test_holds_released_lazily_by_decide_and_adjust_are_counted(redis_server,
                                                                      buyers: Buyers) -> None:
    from tests.helpers.harness import make_config, running

    cfg = make_config(pp_campaign(), fixed("fx", "10.00", client="c1"),
                      fixed("gx", "9.00", client="c2", priority=2))  # a direct post: fx's
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        _, r = await ping(eng)
        assert await held(eng, "c1") == 10_000_000 and await held(eng, "c2") == 9_000_000
        await _age(eng, "c1", r["ping_id"], "fx")
        await _age(eng, "c2", r["ping_id"], "gx")
        c = Counts(wanted())
        # a direct post: decide.lua reads c1 (the buyer fx's account) and releases its hold
        status, d = await eng.post({"lp_campaign_id": "pp", "lp_supplier_id": "s1",
                                    "lp_key": "key-s1", **LEAD})
        assert status == 200 and d["status"] == "ACCEPTED", d
        assert await held(eng, "c1") == 0 and c.delta()["expired"] == 1
        # adjust.lua, refused (below the floor), still counts the hold it released
        res = await eng.store.adjust("t1", "c2", -500_000_000, "adjustment")
        assert not res.ok and res.error == "below_floor"
        assert await held(eng, "c2") == 0 and c.delta()["expired"] == 2
        await eng.assert_reconciled()

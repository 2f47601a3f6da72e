"""The delivery worker end to end: real redis-server, real HTTP buyers, real decide.lua sales.

No mocks and no sleep-based synchronization: the tests drive ``process_once`` and poll
Redis/the buyers' records with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.core.config import Buyer, Config, ResponseRule
from engine.delivery import record
from engine.delivery.breaker import WEBHOOK_FAILING_EVERY_MS, Breakers, is_open, open_buyers
from engine.delivery.client import Endpoint
from engine.delivery.record import DeliveryEvent, read_decision
from engine.delivery.sync import deliver_sync
from engine.delivery.verdict import BuyerVerdict
from engine.delivery.worker import DeliveryWorker, WorkerOptions
from engine.store.store import Store, now_ms
from tests.helpers import settled
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.sales import FEE, OPENING, T, accounts, balance, buyer, sell

PRICE = 25_000_000
ACCEPT = [ResponseRule(path="status", equals="accepted")]
DUP = [ResponseRule(status=[409])]
FAST = dict(secret=SECRET, accept=ACCEPT, duplicate=DUP, timeout_ms=300, retry_base_ms=5,
            retry_max_ms=20)




@pytest.fixture
def store(redis: aioredis.Redis) -> Store:
    return Store(redis)


class Clock:
    """Real time plus an offset the test can move forward (no sleeping)."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return now_ms() + self.offset


def worker(store: Store, *buyers_: Buyer, consumer: str = "w1", clock: Clock | None = None,
           events: list[DeliveryEvent] | None = None, **opts: Any) -> DeliveryWorker:
    cfg = Config(buyers=list(buyers_))
    return DeliveryWorker(cfg, store, tenants=[T], consumer=consumer,
                          options=WorkerOptions(**opts), clock=clock,
                          observer=events.extend if events is not None else None)


async def until(
    w: DeliveryWorker, done: Callable[[], Awaitable[bool]], within: float = 10.0
) -> None:
    """Run worker passes until ``done()`` or the deadline."""
    deadline = time.monotonic() + within
    while not await done():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await w.process_once()
        await asyncio.sleep(0.005)


async def decided(store: Store, lead_id: str, b: Buyer) -> str:
    d = await read_decision(store, T, lead_id, b.id)
    return d.o if d else ""


async def stream_empty(redis: aioredis.Redis) -> bool:
    if await redis.xlen(keys.deliveries(T)):
        return False
    pending = await redis.xpending(keys.deliveries(T), "delivery")
    return bool(pending["pending"] == 0)


async def assert_refunded(store: Store, b: Buyer, *, wallet: int = OPENING) -> None:
    assert await balance(store, b.client) == OPENING
    assert await balance(store, "wallet") == wallet  # the outbound fee came back
    counters = await store.redis.hgetall(keys.buyer(T, b.id))
    assert counters[b"tn"] == b"0" and counters[b"dn"] == b"0"  # the cap slot is free


async def test_accepted_keeps_the_sale(store: Store, buyers: Buyers) -> None:
    b = buyer("b1", buyers.url + "/accept", **FAST)
    await accounts(store, b)
    await sell(store, b, "L1")
    events: list[DeliveryEvent] = []
    w = worker(store, b, events=events)
    try:
        assert await w.process_once() == 1
    finally:
        await w.close()
    assert await decided(store, "L1", b) == "ACCEPTED"
    assert await balance(store, b.client) == OPENING - PRICE
    assert await balance(store, "wallet") == OPENING - FEE
    [req] = buyers.at("/accept")
    assert req.verified and req.msg_id == "msg_L1_b1"
    assert await stream_empty(store.redis)
    [entry] = await settled.delivery_log(store, T, "L1")
    assert entry["result"] == "accepted" and entry["status"] == 200 and entry["attempt"] == 1
    assert "headers" not in entry and SECRET not in str(entry)
    assert [(e.kind, e.status) for e in events] == [("accepted", 200)]


async def test_one_batch_over_two_tenants_keeps_each_jobs_own_precheck(
    store: Store, buyers: Buyers
) -> None:
    """Jobs of two tenants read in one batch: each is checked against its own tenant's sale
    (one precheck call per tenant, results back in job order). beta's sale was refunded
    before delivery, so only acme's lead reaches the buyer."""
    a = buyer("b1", buyers.url + "/accept", **FAST)
    b = buyer("b2", buyers.url + "/accept", tenant="beta", **FAST)
    await accounts(store, a, b)
    await sell(store, b, "L2")
    await sell(store, a, "L1")
    assert (await store.refund_sale("beta", "L2", "b2", "returned")).ok
    for tenant in (T, "beta"):  # the same entry id in both streams, as XADD may well give
        stream = keys.deliveries(tenant)
        [(_, fields)] = await store.redis.xrange(stream)
        await store.redis.delete(stream)
        await store.redis.xadd(stream, fields, id="1700000000000-0")
    w = DeliveryWorker(Config(buyers=[a, b]), store, tenants=[T, "beta"], consumer="w1")
    try:
        assert await w.process_once() == 2
    finally:
        await w.close()
    assert [r.msg_id for r in buyers.at("/accept")] == ["msg_L1_b1"]
    assert await decided(store, "L1", a) == "ACCEPTED"
    skipped = await read_decision(store, "beta", "L2", "b2")
    assert skipped is not None and skipped.r == "sale refunded before delivery"


async def test_claim_skips_only_this_workers_in_flight_job_not_its_id_twin(
    store: Store, buyers: Buyers
) -> None:
    """A worker never re-claims a job it is still sending, and tells that job apart from
    another tenant's entry with the same id, left pending by a dead worker."""
    held = buyer("b1", buyers.url + "/slow", **{**FAST, "timeout_ms": 10_000})
    other = buyer("b2", buyers.url + "/accept", tenant="beta", **FAST)
    await accounts(store, held, other)
    await sell(store, held, "L1")
    await sell(store, other, "L2")
    for tenant in (T, "beta"):  # the same entry id in both streams
        stream = keys.deliveries(tenant)
        [(_, fields)] = await store.redis.xrange(stream)
        await store.redis.delete(stream)
        await store.redis.xadd(stream, fields, id="1700000000000-0")
        await store.redis.xgroup_create(stream, "delivery", id="0")
    # beta's entry: read by a worker that then died
    await store.redis.xreadgroup("delivery", "dead", {keys.deliveries("beta"): ">"})
    w = DeliveryWorker(Config(buyers=[held, other]), store, tenants=[T, "beta"],
                       consumer="w1", options=WorkerOptions(claim_idle_ms=0))
    try:
        await w.start()
        sending = asyncio.create_task(w.handle_batch(await w._read(10, None)))
        await buyers.reached("/slow")  # acme's job is in flight in w1
        claimed = await w._claim(10)
        assert [(j.tenant, j.entry_id) for j in claimed] == [("beta", "1700000000000-0")]
        buyers.release.set()
        await sending
    finally:
        await w.close()


async def test_malformed_entries_are_dropped_and_bad_bytes_never_fail_a_batch(
    store: Store, buyers: Buyers
) -> None:
    """An entry whose lead is not a JSON object of strings is dropped as malformed (its
    bytes would be the buyer's body). Stray non-UTF-8 bytes elsewhere must not fail the
    batch's commit: L2 has no sale, so it is dead-lettered, which copies its fields (the
    bad bytes become U+FFFD), in the same MULTI as L1's decision and ack."""
    b = buyer("b1", buyers.url + "/accept", **FAST)
    await accounts(store, b)
    await sell(store, b, "L1")
    stream = keys.deliveries(T)
    [(_, fields)] = await store.redis.xrange(stream)
    await store.redis.xadd(stream, {**fields, b"lead": b"[1, 2]", b"lead_id": b"Lbad"})
    await store.redis.xadd(stream, {**fields, b"lead": b'{"a":"\xff"}', b"lead_id": b"Lutf"})
    await store.redis.xadd(stream, {**fields, b"fee": b"\xfe\xff", b"lead_id": b"L2"})
    w = worker(store, b)
    try:
        await until(w, lambda: stream_empty(store.redis))
    finally:
        await w.close()
    assert [r.msg_id for r in buyers.at("/accept")] == ["msg_L1_b1"]
    assert await decided(store, "L1", b) == "ACCEPTED"
    [(_, dead)] = await store.redis.xrange(keys.dead_letter(T, "deliveries"))
    assert dead[b"lead_id"] == b"L2" and dead[b"fee"] == "\ufffd\ufffd".encode()


@pytest.mark.parametrize(("path", "outcome"), [("/reject", "REJECTED"),
                                               ("/duplicate", "DUPLICATED")])
async def test_rejected_and_duplicate_are_refunded(
    store: Store, buyers: Buyers, path: str, outcome: str
) -> None:
    b = buyer("b1", buyers.url + path, **FAST)
    await accounts(store, b)
    await sell(store, b, "L1")
    w = worker(store, b)
    try:
        await w.process_once()
    finally:
        await w.close()
    assert await decided(store, "L1", b) == outcome
    await assert_refunded(store, b)
    assert not await store.redis.exists(keys.dup(T, "fp-L1"))  # fingerprint forgotten
    ledger = await store.ledger_page(T, b.client)
    assert ledger[0][1]["kind"] == "refund" and ledger[0][1]["delta"] == str(PRICE)
    # the reason is recorded: in the decision, the refund's ledger entry and the log
    d = await read_decision(store, T, "L1", b.id)
    want = ("rejected: HTTP 200, no accept rule matched" if outcome == "REJECTED"
            else "duplicate: status in [409]")
    assert d is not None and d.r == want
    assert ledger[0][1]["reason"] == want
    log = await settled.delivery_log(store, T, "L1")
    assert [(e["result"], e["reason"]) for e in log] == [(outcome.lower(), want)]
    assert await stream_empty(store.redis)
    # a replayed job (e.g. re-claimed) refunds nothing twice
    assert (await store.refund_sale(T, "L1", b.id, "again")).replay


async def test_realtime_price_reprices_the_sale(store: Store, buyers: Buyers) -> None:
    b = buyer("b1", buyers.url + "/price", price_path="bid.price", **FAST)
    b2 = buyer("b2", buyers.url + "/price_high", price_path="bid.price", max_price="30.00",
               **FAST)
    await accounts(store, b, b2)
    await sell(store, b, "L1")
    await sell(store, b2, "L2")
    w = worker(store, b, b2)
    try:
        await w.process_once()
    finally:
        await w.close()
    assert await balance(store, b.client) == OPENING - 18_500_000
    assert await balance(store, b2.client) == OPENING - 30_000_000


async def test_500_then_200_delivered_once_with_the_same_webhook_id(
    store: Store, buyers: Buyers
) -> None:
    b = buyer("b1", buyers.url + "/flaky", **FAST)
    await accounts(store, b)
    await sell(store, b, "L1")
    w = worker(store, b)
    try:
        await w.process_once()
        assert await store.redis.zcard(keys.retries(T)) == 1
        assert await stream_empty(store.redis)  # the retry waits in the ZSET, not the PEL
        await until(w, lambda: _is(decided(store, "L1", b), "ACCEPTED"))
    finally:
        await w.close()
    reqs = buyers.at("/flaky")
    assert len(reqs) == 2 and all(r.verified for r in reqs)
    assert reqs[0].msg_id == reqs[1].msg_id == "msg_L1_b1"
    assert reqs[0].body == reqs[1].body
    assert await balance(store, b.client) == OPENING - PRICE
    log = await settled.delivery_log(store, T, "L1")
    assert [(e["result"], e["status"]) for e in log] == [("retry", 500), ("accepted", 200)]


async def test_429_honours_retry_after(store: Store, buyers: Buyers) -> None:
    b = buyer("b1", buyers.url + "/busy", **FAST)  # backoff at most 20 ms
    await accounts(store, b)
    await sell(store, b, "L1")
    clock = Clock()
    w = worker(store, b, clock=clock)
    try:
        before = clock()
        await w.process_once()
        [(_, due)] = await store.redis.zrange(keys.retries(T), 0, -1, withscores=True)
        assert due - before >= 1_000  # Retry-After: 1 beats the 20 ms backoff
        await w.process_once()
        assert len(buyers.at("/busy")) == 1  # not due yet
        clock.offset = int(due) - now_ms() + 1  # time passes, without sleeping
        await until(w, lambda: _is(decided(store, "L1", b), "ACCEPTED"))
    finally:
        await w.close()
    assert len(buyers.at("/busy")) == 2


@pytest.mark.parametrize("path", ["/slow", "/reset", "/garbage"])
async def test_exhausted_retries_dead_letter_event_and_refund(
    store: Store, buyers: Buyers, path: str
) -> None:
    base = buyers.url if path == "/slow" else buyers.raw_url
    b = buyer("b1", base + path, max_attempts=3, **FAST)
    await accounts(store, b)
    await sell(store, b, "L1")
    events: list[DeliveryEvent] = []
    w = worker(store, b, events=events)
    try:
        await until(w, lambda: _is(decided(store, "L1", b), "FAILED"))
    finally:
        await w.close()
    [(_, dead)] = await store.redis.xrange(keys.dead_letter(T, "deliveries"))
    assert dead[b"lead_id"] == b"L1" and dead[b"attempts"] == b"3"
    ev = [f for _, f in await store.redis.xrange(keys.events(T))
          if f[b"type"] == b"delivery_failed"]
    assert len(ev) == 1 and ev[0][b"buyer"] == b"b1"
    await assert_refunded(store, b)
    assert await stream_empty(store.redis) and await store.redis.zcard(keys.retries(T)) == 0
    kinds = [e.kind for e in events]
    assert kinds[-1] == "dead_letter" and len(kinds) == 4
    assert kinds[0] == ("timeout" if path == "/slow" else "error")
    log = await settled.delivery_log(store, T, "L1")
    assert [e["result"] for e in log] == ["retry", "retry", "failed"]


async def test_breaker_opens_and_router_sees_it(store: Store, buyers: Buyers) -> None:
    b = buyer("b1", buyers.url + "/down", breaker_failures=2, breaker_cooldown_s=5,
              max_attempts=50, **FAST)
    await accounts(store, b)
    for i in range(3):
        await sell(store, b, f"L{i}")
    clock = Clock()
    w = worker(store, b, clock=clock)
    try:
        await until(w, lambda: is_open(store.redis, T, "b1"))
        assert await open_buyers(store.redis, T) == {"b1"}
        sent = len(buyers.at("/down"))
        assert sent >= 2  # requests already in flight when it opened still went out
        for _ in range(3):  # jobs are deferred, nothing is sent while open
            await w.process_once()
        assert len(buyers.at("/down")) == sent
        assert 0 < await store.redis.pttl(keys.breaker(T, "b1")) <= 5_000
        buyers.flaky_fail = ""  # the buyer recovers; after the cool-down one probe closes it
        clock.offset = 5_001

        async def all_accepted() -> bool:
            return all([await decided(store, f"L{i}", b) == "ACCEPTED" for i in range(3)])

        await until(w, all_accepted)
    finally:
        await w.close()
    assert await open_buyers(store.redis, T) == set()
    assert not await is_open(store.redis, T, "b1")


async def _webhook_failing(store: Store) -> list[dict[str, str]]:
    rows = await store.redis.xrange(keys.events(T))
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows
            if f[b"type"] == b"webhook_failing"]


async def test_a_breaker_opening_is_one_webhook_failing_event_with_the_host_only(
        store: Store, buyers: Buyers) -> None:
    """The breaker opens after 2 failures: one webhook_failing event on the buyer's client
    account (the tenant's operators are told), with the webhook's host and port but not
    its path or query (a token), the failures and the last error; counted once."""
    b = buyer("b1", buyers.url + "/down?token=s3cret", breaker_failures=2,
              breaker_cooldown_s=5, max_attempts=50, **FAST)
    await accounts(store, b)
    for i in range(3):
        await sell(store, b, f"L{i}")
    counted: list[Any] = []
    store.events_observer = counted.append
    w = worker(store, b)
    try:
        await until(w, lambda: is_open(store.redis, T, "b1"))
        for _ in range(3):  # deferred while open: nothing more is emitted
            await w.process_once()
    finally:
        await w.close()
    [event] = await _webhook_failing(store)
    host = buyers.url.removeprefix("http://")
    assert {k: event[k] for k in ("account", "buyer", "host", "failures", "error",
                                  "status")} == {
        "account": "c-b1", "buyer": "b1", "host": host, "failures": "2",
        "error": "http 500", "status": "500"}
    assert "s3cret" not in str(event) and "/down" not in str(event)
    assert counted == [["webhook_failing", 1]]


async def test_webhook_failing_once_per_outage_across_processes(store: Store) -> None:
    """Each worker process has its own breaker: the first to open tells, the others do
    not (keys.breaker_told, set in the same step); a failed probe re-opening a breaker is
    the same outage; a webhook that recovers and fails again within the hour is not told
    again. Once that mark is gone, a new outage is told."""
    notice = {"account": "c-b1", "host": "hooks.example", "error": "timeout", "status": "0"}
    now = now_ms()
    one, two = Breakers(store.redis), Breakers(store.redis)
    a = one.get(T, "b1", failures=1, cooldown_s=30)
    b = two.get(T, "b1", failures=1, cooldown_s=30)
    assert await one.failure(T, "b1", a, now, notice=notice)
    assert await two.failure(T, "b1", b, now + 5, notice=notice)
    assert a.allow(now + 30_000) == 0  # half-open: one probe, and it fails
    assert await one.failure(T, "b1", a, now + 30_000, notice=notice)
    await one.success(T, "b1", a)  # recovered ...
    assert await one.failure(T, "b1", a, now + 60_000, notice=notice)  # ... and down again
    assert len(await _webhook_failing(store)) == 1
    await store.redis.delete(keys.breaker_told(T, "b1"))  # an hour later
    await one.success(T, "b1", a)
    assert await one.failure(T, "b1", a, now + 90_000, notice=notice)
    events = await _webhook_failing(store)
    assert [(e["host"], e["error"], e["failures"]) for e in events] == [
        ("hooks.example", "timeout", "1")] * 2
    told = await store.redis.pttl(keys.breaker_told(T, "b1"))
    assert 0 < told <= WEBHOOK_FAILING_EVERY_MS


async def test_killed_worker_job_is_reclaimed_and_charged_once(
    store: Store, buyers: Buyers
) -> None:
    b = buyer("b1", buyers.url + "/hold", **{**FAST, "timeout_ms": 10_000})
    await accounts(store, b)
    await sell(store, b, "L1")
    first = worker(store, b, consumer="w1")
    task = asyncio.create_task(first.process_once())
    await buyers.reached("/hold")  # the request reached the buyer ...
    task.cancel()  # ... and the worker dies before recording the outcome
    with pytest.raises(asyncio.CancelledError):
        await task
    await first.close()
    pending = await store.redis.xpending(keys.deliveries(T), "delivery")
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"w1"
    second = worker(store, b, consumer="w2", claim_idle_ms=0)
    try:
        await until(second, lambda: _is(decided(store, "L1", b), "ACCEPTED"))
    finally:
        await second.close()
    reqs = buyers.at("/hold")
    assert len(reqs) == 2 and reqs[0].msg_id == reqs[1].msg_id == "msg_L1_b1"
    assert await balance(store, b.client) == OPENING - PRICE  # charged once
    assert await stream_empty(store.redis)


async def test_sync_mode_single_attempt(store: Store, buyers: Buyers) -> None:
    ok = buyer("b1", buyers.url + "/accept", **FAST)
    no = buyer("b2", buyers.url + "/reject", **FAST)
    slow = buyer("b3", buyers.url + "/slow", **FAST)
    await accounts(store, ok, no, slow)
    for bb, lead_id in ((ok, "S1"), (no, "S2"), (slow, "S3")):
        await sell(store, bb, lead_id)
    lead = {"first_name": "Ada"}
    async with aiohttp.ClientSession() as session:
        async def sync(bb: Buyer, lead_id: str, deadline: int) -> Any:
            return await deliver_sync(store, session, Endpoint(bb), lead_id=lead_id, lead=lead,
                                      price=PRICE, deadline_ms=deadline)

        v = await sync(ok, "S1", now_ms() + 2_000)
        assert v is not None and v.outcome is BuyerVerdict.ACCEPTED
        v = await sync(no, "S2", now_ms() + 2_000)
        assert v is not None and v.outcome is BuyerVerdict.REJECTED
        # money freed before the next buyer is tried (the S1 and S3 fees stay)
        await assert_refunded(store, no, wallet=OPENING - 2 * FEE)
        assert await sync(slow, "S3", now_ms() + 100) is None  # no verdict in time: no sale
        await assert_refunded(store, slow, wallet=OPENING - FEE)
        again = await sync(ok, "S1", now_ms() + 2_000)  # a replay returns the decision
        assert again is not None and again.outcome is BuyerVerdict.ACCEPTED
    assert len(buyers.at("/accept")) == 1
    # the worker acks every decided job (FAILED included) without sending it again
    buyers.release.set()
    w = worker(store, ok, no, slow)
    try:
        await until(w, lambda: stream_empty(store.redis))
    finally:
        await w.close()
    assert [len(buyers.at(p)) for p in ("/accept", "/reject", "/slow")] == [1, 1, 1]
    assert await decided(store, "S3", slow) == "FAILED"
    await assert_refunded(store, no, wallet=OPENING - FEE)


async def test_run_loop_delivers_and_stops(store: Store, buyers: Buyers) -> None:
    b = buyer("b1", buyers.url + "/accept", price="1.00", **FAST)
    await accounts(store, b)
    for i in range(20):
        await sell(store, b, f"R{i}")
    w = worker(store, b, block_ms=50, count=8, max_inflight=16)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    deadline = time.monotonic() + 10
    while len(buyers.at("/accept")) < 20 or not await stream_empty(store.redis):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert await balance(store, b.client) == OPENING - 20 * 1_000_000


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def test_log_entry_has_latency_and_a_truncated_excerpt(store: Store, buyers: Buyers) -> None:
    b = buyer("b1", buyers.url + "/accept_long", **FAST)
    await accounts(store, b)
    await sell(store, b, "L1")
    w = worker(store, b, excerpt_chars=40)
    try:
        await w.process_once()
    finally:
        await w.close()
    (entry,) = await settled.delivery_log(store, T, "L1")
    assert entry["result"] == "accepted" and entry["status"] == 200
    assert isinstance(entry["ms"], int) and 0 <= entry["ms"] < 300
    assert entry["excerpt"] == '{"status":"accepted","note":"' + "x" * 11  # 40 characters
    assert SECRET not in str(entry)


async def test_a_job_older_than_max_age_is_dead_lettered_and_refunded(
    store: Store, buyers: Buyers
) -> None:
    b = buyer("b1", buyers.url + "/accept", **{**FAST, "max_age_s": 60})
    await accounts(store, b)
    await sell(store, b, "L1")
    clock = Clock()
    clock.offset = 61_000  # the sale is now older than max_age_s: never sent
    w = worker(store, b, clock=clock)
    try:
        await w.process_once()
    finally:
        await w.close()
    assert buyers.at("/accept") == []
    assert await decided(store, "L1", b) == "FAILED"
    await assert_refunded(store, b)
    dead = await store.redis.xrange(keys.dead_letter(T, "deliveries"))
    assert len(dead) == 1 and b"expired" in dead[0][1][b"reason"]
    events = await store.redis.xrange(keys.events(T))
    assert [f[b"type"] for _, f in events].count(b"delivery_failed") == 1
    assert await stream_empty(store.redis)


async def test_two_workers_share_one_stream_each_job_delivered_once(
    store: Store, buyers: Buyers
) -> None:
    b = buyer("b1", buyers.url + "/accept", price="1.00", **FAST)
    await accounts(store, b)
    for i in range(60):
        await sell(store, b, f"T{i}")
    one = worker(store, b, consumer="one", block_ms=20, count=8, max_inflight=16)
    two = worker(store, b, consumer="two", block_ms=20, count=8, max_inflight=16)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in (one, two)]
    try:
        deadline = time.monotonic() + 10
        while not await stream_empty(store.redis):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    ids = [r.msg_id for r in buyers.at("/accept")]
    assert sorted(ids) == sorted(f"msg_T{i}_b1" for i in range(60))  # each once
    assert await balance(store, b.client) == OPENING - 60 * 1_000_000


async def test_a_job_waiting_on_a_slow_buyer_is_not_claimed_by_another_worker(
    store: Store, buyers: Buyers
) -> None:
    """The running worker keeps refreshing the idle time of what it has in flight, so a
    request outliving ``claim_idle_ms`` is not taken over (and sent again) elsewhere."""
    b = buyer("b1", buyers.url + "/hold", **{**FAST, "timeout_ms": 10_000})
    await accounts(store, b)
    await sell(store, b, "K1")
    claim_idle_ms = 200
    busy = worker(store, b, consumer="busy", claim_idle_ms=claim_idle_ms, block_ms=20)
    other = worker(store, b, consumer="other", claim_idle_ms=claim_idle_ms)
    stop = asyncio.Event()
    task = asyncio.create_task(busy.run(stop))
    try:
        await buyers.reached("/hold")
        held_since = time.monotonic()
        while time.monotonic() - held_since < 3 * claim_idle_ms / 1000:  # well past it
            rows = await store.redis.xpending_range(keys.deliveries(T), "delivery",
                                                    "-", "+", 10)
            assert len(rows) == 1 and rows[0]["consumer"] == b"busy"
            assert rows[0]["time_since_delivered"] < claim_idle_ms
            assert await other._claim(10) == []
            await asyncio.sleep(0.02)
        buyers.release.set()
        deadline = time.monotonic() + 10
        while not await stream_empty(store.redis):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task
        await other.close()
    assert len(buyers.at("/hold")) == 1
    assert await decided(store, "K1", b) == "ACCEPTED"


async def _decided_meanwhile(store: Store, buyers: Buyers, path: str, lead_id: str,
                             **opts: Any) -> Any:
    """One worker sends ``lead_id`` to a buyer that holds its answer (``path``); meanwhile
    another worker delivered the same job and its buyer accepted it (that decision is
    recorded); then the held answer comes. Returns the buyer."""
    b = buyer("b1", buyers.url + path, **{**FAST, "timeout_ms": 10_000, **opts})
    await accounts(store, b)
    await sell(store, b, lead_id)
    w = worker(store, b)
    task = asyncio.create_task(w.process_once())
    try:
        await buyers.reached(path)
        accepted = record.DeliveryDecision(record.ACCEPTED, "accepted: by the other worker")
        await store.redis.hset(keys.dstate(T, lead_id), b.id,
                               record.encode_decision(accepted))
        buyers.release.set()
        assert await task == 1
    finally:
        await w.close()
    return b


async def test_a_decision_recorded_meanwhile_by_another_worker_stands(
    store: Store, buyers: Buyers
) -> None:
    """Two workers on one job (the first stalled past the claim time): the decision
    recorded first stands with its money effect; the later one neither overwrites it nor
    refunds the sale the other one's buyer accepted."""
    b = await _decided_meanwhile(store, buyers, "/hold_reject", "R1")
    assert await decided(store, "R1", b) == "ACCEPTED"
    assert await balance(store, b.client) == OPENING - PRICE  # not refunded
    log = await settled.delivery_log(store, T, "R1")
    assert [e["result"] for e in log] == ["rejected"]  # this attempt is still logged
    assert await stream_empty(store.redis)


async def test_a_job_given_up_on_writes_no_dead_letter_when_another_worker_decided_it(
    store: Store, buyers: Buyers
) -> None:
    """The same race, when this worker's last attempt fails and it gives the job up: the
    other worker's decision stands, so the delivery did not fail. The dead letter and the
    delivery_failed event used to be written anyway (an alert for a lead the buyer took)."""
    b = await _decided_meanwhile(store, buyers, "/hold_fail", "F1", max_attempts=1)
    assert await decided(store, "F1", b) == "ACCEPTED"
    assert await balance(store, b.client) == OPENING - PRICE  # not refunded
    events = [f for _, f in await store.redis.xrange(keys.events(T))]
    assert not [e for e in events if e[b"type"] == b"delivery_failed"]
    assert await store.redis.xlen(keys.dead_letter(T, "deliveries")) == 0
    assert [e["result"] for e in await settled.delivery_log(store, T, "F1")] == ["failed"]
    assert await stream_empty(store.redis)


class _Held(NamedTuple):
    b: Buyer
    w: DeliveryWorker
    clock: Clock
    task: asyncio.Task[int]
    entry_id: bytes
    fields: dict[bytes, bytes]


@contextlib.asynccontextmanager
async def _held(store: Store, buyers: Buyers, path: str, lead_id: str) -> AsyncIterator[_Held]:
    """Worker A (on a movable clock) sending ``lead_id`` to a buyer that holds its answer
    (``path``) until ``buyers.release``; the job's stream entry, for the test to act as
    another worker meanwhile. The worker is closed on the way out."""
    clock = Clock()
    b = buyer("b1", buyers.url + path, **{**FAST, "timeout_ms": 10_000})
    await accounts(store, b)
    await sell(store, b, lead_id)
    w = worker(store, b, clock=clock)
    task = asyncio.create_task(w.process_once())
    try:
        await buyers.reached(path)
        [(entry_id, fields)] = await store.redis.xrange(keys.deliveries(T))
        yield _Held(b, w, clock, task, entry_id, fields)
    finally:
        await w.close()


async def test_a_verdict_stands_when_the_entry_was_moved_to_retries(
    store: Store, buyers: Buyers
) -> None:
    """Worker A holds the job; worker B took it over, got a 5xx and moved it to the retries
    (ZADD + XACK/XDEL). A's buyer then accepts: A's decision is recorded, and the retry
    finds it and sends nothing (review of the settle change: a missing entry once counted
    as settled, so A's verdict was dropped and the lead sent twice)."""
    async with _held(store, buyers, "/hold", "D1") as h:
        fields = {k.decode(): v.decode() for k, v in h.fields.items()} | {"attempt": "1"}
        member = msgspec.json.encode([x for kv in fields.items() for x in kv])
        async with store.redis.pipeline(transaction=True) as p:  # worker B's retry
            p.zadd(keys.retries(T), {member: 0})
            p.xack(keys.deliveries(T), "delivery", h.entry_id)
            p.xdel(keys.deliveries(T), h.entry_id)
            await p.execute()
        buyers.release.set()
        assert await h.task == 1
        h.clock.offset = 60_000
        await h.w.process_once()  # the retry: decided already, nothing sent
    b = h.b
    assert len(buyers.at("/hold")) == 1
    assert await decided(store, "D1", b) == "ACCEPTED"
    assert await balance(store, b.client) == OPENING - PRICE
    assert await stream_empty(store.redis)


async def test_a_late_retry_of_a_settled_job_sends_nothing(store: Store, buyers: Buyers) -> None:
    """Worker A holds the job (its buyer will answer 500); worker B took it over, its buyer
    accepted and B settled it. A's 500 then schedules a retry: the retry finds B's decision
    (settling keeps it) and neither sends nor refunds."""
    async with _held(store, buyers, "/hold_fail", "S2") as h:
        b, raw_id = h.b, h.entry_id
        accepted = record.DeliveryDecision(record.ACCEPTED, "accepted: by the other worker")
        await store.lua.delivery_finish(store.redis, [keys.tenant_prefix(T)], [
            record.finish_arg([("S2", b.id, record.encode_decision(accepted).decode(),
                                record.log_entry(buyer=b.id, attempt=1, ts=1,
                                                 result="accepted").decode())],
                              [(raw_id.decode(), "S2", b.id)], "delivery")])
        buyers.release.set()
        assert await h.task == 1
        assert await store.redis.zcard(keys.retries(T)) == 1
        h.clock.offset = 3_600_000
        await h.w.process_once()
        await h.w.process_once()
    assert len(buyers.at("/hold_fail")) == 1
    assert await decided(store, "S2", b) == "ACCEPTED"
    assert await store.redis.xlen(keys.dead_letter(T, "deliveries")) == 0
    assert await balance(store, b.client) == OPENING - PRICE  # not refunded
    assert await stream_empty(store.redis)


async def test_a_shared_lead_settles_each_buyers_log_apart(store: Store,
                                                           buyers: Buyers) -> None:
    """One lead sold to Y (its first try fails, retried later) and X (accepts at once): X
    settling hands on X's log only; Y's log, with its failed try, waits for Y's settle."""
    clock = Clock()
    y = buyer("y", buyers.url + "/flaky", **{**FAST, "retry_base_ms": 60_000,
                                              "retry_max_ms": 60_000})
    x = buyer("x", buyers.url + "/accept", **FAST)
    await accounts(store, x, y)
    w = worker(store, x, y, clock=clock)
    try:
        await sell(store, y, "L", key="L-y")
        await w.process_once()  # Y: 500, a retry in a minute
        await sell(store, x, "L", key="L-x")
        await w.process_once()  # X: accepted, settled
        assert await store.redis.llen(keys.dlog(T, "L", "y")) == 1
        clock.offset = 120_000
        await w.process_once()
        await w.process_once()
    finally:
        await w.close()
    logs = {f[b"buyer"].decode(): [e["result"] for e in msgspec.json.decode(f[b"log"])]
            for _, f in await store.redis.xrange(keys.sold(T)) if b"settled" in f}
    assert logs == {"x": ["accepted"], "y": ["retry", "accepted"]}
    assert not await store.redis.exists(keys.dlog(T, "L", "x"), keys.dlog(T, "L", "y"))


async def test_a_sync_try_keeps_a_decision_recorded_first(store: Store, buyers: Buyers) -> None:
    """A sync try that outlived its claim (the worker took the job over and its buyer
    accepted) neither overwrites that decision nor refunds the sale: it returns it."""
    b = buyer("b1", buyers.url + "/hold_reject", **{**FAST, "timeout_ms": 10_000})
    await accounts(store, b)
    await sell(store, b, "Y1")
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(deliver_sync(
            store, session, Endpoint(b), lead_id="Y1", lead={"first_name": "Ada"},
            price=PRICE, deadline_ms=now_ms() + 10_000))
        await buyers.reached("/hold_reject")
        accepted = record.DeliveryDecision(record.ACCEPTED, "accepted: by the worker")
        await store.redis.hset(keys.dstate(T, "Y1"), b.id, record.encode_decision(accepted))
        buyers.release.set()
        v = await task
    assert v is not None and v.outcome is BuyerVerdict.ACCEPTED and v.reason == accepted.r
    assert await decided(store, "Y1", b) == "ACCEPTED"
    assert await balance(store, b.client) == OPENING - PRICE  # not refunded
    assert [e["result"] for e in await settled.delivery_log(store, T, "Y1")] == ["rejected"]


async def test_put_form_template_headers_and_get_reach_a_real_buyer(
    store: Store, buyers: Buyers
) -> None:
    """The settings only unit-tested by building the request, sent for real: a PUT of a
    form-encoded template with a custom header, and a GET with the fields as its query.
    The buyer verifies both signatures (body for PUT, query string for GET)."""
    put = buyer("b1", buyers.url + "/accept", method="PUT", format="form",
                template={"fname": "{first_name}", "src": "leadflow", "id": "{lead_id}"},
                headers={"X-Api-Key": "k-123"}, **FAST)
    get = buyer("b2", buyers.url + "/accept?aff=7", method="GET", **FAST)
    await accounts(store, put, get)
    await sell(store, put, "P1")
    await sell(store, get, "G1")
    w = worker(store, put, get)
    try:
        await until(w, lambda: stream_empty(store.redis))
    finally:
        await w.close()
    sent = {r.method: r for r in buyers.at("/accept")}
    assert sent.keys() == {"PUT", "GET"} and all(r.verified for r in sent.values())
    p = sent["PUT"]
    assert p.headers["content-type"] == "application/x-www-form-urlencoded"
    assert p.headers["x-api-key"] == "k-123"
    assert p.body == b"fname=Ada&src=leadflow&id=P1"
    g = sent["GET"]
    assert g.body == b"" and g.query.startswith("aff=7&") and "first_name=Ada" in g.query
    assert await decided(store, "P1", put) == "ACCEPTED"
    assert await decided(store, "G1", get) == "ACCEPTED"

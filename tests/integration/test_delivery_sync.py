"""Sync-mode campaigns end to end: the real engine over HTTP, real buyer webhooks
(tests/helpers/buyers.py), decide.lua sales, deliver_sync attempts, refunds and the final record."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from engine.core import keys
from engine.delivery.record import read_decision
from engine.delivery.worker import DeliveryWorker, WorkerOptions
from engine.store.store import now_ms
from tests.helpers import settled
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.harness import Engine, buyer, campaign, make_config, running

PRICE = 10_000_000
OPENING = 100_000_000
WALLET0 = 1_000_000_000
FEE_IN, FEE_OUT = 100_000, 200_000
RULES = ('accept = [{ path = "status", equals = "accepted" }], '
         'duplicate = [{ status = [409] }]')




def hook(buyers: Buyers, path: str, timeout_ms: int = 5_000) -> str:
    return (f'delivery = {{ url = "{buyers.url}{path}", secret = "{SECRET}", '
            f'timeout_ms = {timeout_ms}, {RULES} }}')


def sync_config(buyers: Buyers, *paths: str, deadline_ms: int = 3_000,
                distribution: str = "waterfall") -> Any:
    extra = (f'mode = "sync"\nsync_deadline_ms = {deadline_ms}\n'
             'dedupe = { fields = ["email"], days = 7 }')
    parts = [campaign(distribution=distribution, extra=extra)]
    for i, path in enumerate(paths, 1):
        parts.append(buyer(f"b{i}", client=f"c{2 - i % 2}", priority=i,
                           extra=hook(buyers, path)))
    return make_config(*parts)


async def ledgers_sum(eng: Engine) -> None:
    for account in ("c1", "c2", "wallet"):
        total, _ = await eng.store.ledger_sum("t1", account)
        assert total == await eng.balance(account), account
    await eng.assert_reconciled()


async def drain_worker(eng: Engine, *, offset_ms: int = 0) -> None:
    """Run the stream worker (clock moved by ``offset_ms``) until the stream is empty."""
    w = DeliveryWorker(eng.svc.cfg, eng.store, tenants=["t1"], consumer="w",
                       options=WorkerOptions(claim_idle_ms=0),
                       clock=lambda: now_ms() + offset_ms)
    deadline = time.monotonic() + 10
    try:
        while True:
            await w.process_once(block_ms=None)
            pending = await eng.redis.xpending(keys.deliveries("t1"), "delivery")
            if not await eng.redis.xlen(keys.deliveries("t1")) and pending["pending"] == 0:
                return
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await w.close()


async def test_first_rejects_second_accepts(redis, redis_server, buyers: Buyers) -> None:
    cfg = sync_config(buyers, "/reject", "/accept")
    async with running(cfg, redis_server.url) as eng:
        status, r = await eng.lead(email="ada@example.com")
        assert status == 200
        assert (r["status"], r["code"], r["payout"]) == ("ACCEPTED", 0, "3.00"), r
        lead_id = r["lead_id"]
        assert [x.msg_id for x in buyers.at("/reject")] == [f"msg_{lead_id}_b1"]
        assert [x.msg_id for x in buyers.at("/accept")] == [f"msg_{lead_id}_b2"]
        assert all(x.verified for x in buyers.received)
        # b1 was charged then refunded; b2 pays once; one inbound fee, one outbound fee
        assert await eng.balance("c1") == OPENING
        assert await eng.balance("c2") == OPENING - PRICE
        assert await eng.balance("wallet") == WALLET0 - FEE_IN - FEE_OUT
        kinds = [f["kind"] for _, f in reversed(await eng.store.ledger_page("t1", "c1"))]
        assert kinds == ["opening", "lead", "refund"]
        await ledgers_sum(eng)
        d1 = await read_decision(eng.store, "t1", lead_id, "b1")
        d2 = await read_decision(eng.store, "t1", lead_id, "b2")
        assert d1 is not None and d1.o == "REJECTED" and d2 is not None and d2.o == "ACCEPTED"
        log = await settled.delivery_log(eng.store, "t1", lead_id)
        assert [(e["buyer"], e["result"]) for e in log] == [("b1", "rejected"),
                                                           ("b2", "accepted")]
        # a replay returns the final result and charges nothing
        status, again = await eng.lead(email="ada@example.com")
        assert status == 200 and again == r
        assert await eng.balance("c2") == OPENING - PRICE
        assert await eng.balance("wallet") == WALLET0 - FEE_IN - FEE_OUT
        assert len(buyers.received) == 2
        # the stream worker acks both jobs (decided already) without sending again
        await drain_worker(eng)
        assert len(buyers.received) == 2
        assert await eng.balance("c1") == OPENING and await eng.balance("c2") == OPENING - PRICE
        # only the final result is left under the lead's idempotency key
        idem = [k for k in await redis.keys(keys.idem("t1", "*"))]
        assert len(idem) == 1
        await ledgers_sum(eng)


async def test_every_buyer_rejects(redis, redis_server, buyers: Buyers) -> None:
    cfg = sync_config(buyers, "/reject", "/duplicate")
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(email="bob@example.com")
        assert (r["status"], r["code"], r["payout"]) == ("REJECTED", 204, None), r
        assert r["message"] == "every buyer rejected the lead (2 tried)"
        assert len(buyers.at("/reject")) == 1 and len(buyers.at("/duplicate")) == 1
        # buyers pay nothing; the inbound fee stays (a valid lead no buyer took)
        assert await eng.balance("c1") == OPENING and await eng.balance("c2") == OPENING
        assert await eng.balance("wallet") == WALLET0 - FEE_IN
        await ledgers_sum(eng)
        _, again = await eng.lead(email="bob@example.com")
        assert again == r and len(buyers.received) == 2
        assert await eng.balance("wallet") == WALLET0 - FEE_IN
        # the lead was not sold: its dedupe fingerprint is forgotten
        _, other = await eng.lead(email="bob@example.com", state="CA")
        assert other["code"] == 204 and other["lead_id"] != r["lead_id"]
        assert await eng.balance("wallet") == WALLET0 - 2 * FEE_IN
        await drain_worker(eng)
        assert len(buyers.received) == 4
        await ledgers_sum(eng)


async def test_deadline_passes_no_sale_and_the_worker_never_sends_it(
    redis, redis_server, buyers: Buyers
) -> None:
    """No verdict before the deadline is no sale: the seller gets REJECTED 205, the buyer
    is refunded, and the stream worker, finding the try decided FAILED, does not send it."""
    cfg = sync_config(buyers, "/slow", "/accept", deadline_ms=300)
    async with running(cfg, redis_server.url) as eng:
        started = time.monotonic()
        _, r = await eng.lead(email="cy@example.com")
        assert time.monotonic() - started < 2.0
        assert (r["status"], r["code"], r.get("payout")) == ("REJECTED", 205, None), r
        assert "deadline" in r["message"]
        lead_id = r["lead_id"]
        assert await eng.balance("c1") == OPENING  # b1's sale refunded
        assert buyers.at("/accept") == []  # no time was left for the next buyer
        log = await settled.delivery_log(eng.store, "t1", lead_id)
        assert [(e["buyer"], e["result"]) for e in log] == [("b1", "failed")]
        d = await read_decision(eng.store, "t1", lead_id, "b1")
        assert d is not None and d.o == "FAILED" and "timeout" in d.r
        _, again = await eng.lead(email="cy@example.com")
        assert again == r
        buyers.release.set()
        await drain_worker(eng, offset_ms=5_000)
        assert len(buyers.at("/slow")) == 1  # the one sync try; the worker sent nothing
        assert await eng.balance("c1") == OPENING
        assert await eng.balance("wallet") == WALLET0 - FEE_IN  # inbound fee only
        await ledgers_sum(eng)
        # not sold, so not a duplicate: the same person can be offered again
        _, r2 = await eng.lead(email="cy@example.com", lp_subid1="again")
        assert r2["lead_id"] != lead_id and r2["status"] != "DUPLICATED", r2


async def test_no_next_try_without_time_for_it(redis, redis_server, buyers: Buyers) -> None:
    """b1 rejects with less than MIN_TRY_MS left: b2 is neither sold nor sent the lead."""
    cfg = sync_config(buyers, "/reject", "/accept", deadline_ms=200)
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(email="ed@example.com")
        assert (r["status"], r["code"]) == ("REJECTED", 205), r
        assert len(buyers.at("/reject")) == 1 and buyers.at("/accept") == []
        assert await eng.balance("c1") == OPENING and await eng.balance("c2") == OPENING
        ledger = await eng.store.ledger_page("t1", "c2")
        assert [f["kind"] for _, f in ledger] == ["opening"]  # b2 never sold: no churn
        await ledgers_sum(eng)


async def test_a_buyer_without_a_verdict_is_skipped_while_time_is_left(
    redis, redis_server, buyers: Buyers
) -> None:
    """b1 times out on its own timeout, well before the campaign deadline: refunded, and
    b2 is tried and accepts."""
    extra = ('mode = "sync"\nsync_deadline_ms = 3000\n'
             'dedupe = { fields = ["email"], days = 7 }')
    cfg = make_config(campaign(extra=extra),
                      buyer("b1", client="c1", priority=1,
                            extra=hook(buyers, "/slow", timeout_ms=200)),
                      buyer("b2", client="c2", priority=2, extra=hook(buyers, "/accept")))
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(email="dot@example.com")
        assert (r["status"], r["code"], r["payout"]) == ("ACCEPTED", 0, "3.00"), r
        lead_id = r["lead_id"]
        assert await eng.balance("c1") == OPENING and await eng.balance("c2") == OPENING - PRICE
        b1 = await read_decision(eng.store, "t1", lead_id, "b1")
        assert b1 is not None and b1.o == "FAILED"
        buyers.release.set()
        await drain_worker(eng, offset_ms=5_000)
        assert len(buyers.at("/slow")) == 1 and len(buyers.at("/accept")) == 1
        assert await eng.balance("wallet") == WALLET0 - FEE_IN - FEE_OUT
        await ledgers_sum(eng)


async def test_replay_during_the_waterfall_waits_for_the_final_result(
    redis, redis_server, buyers: Buyers
) -> None:
    cfg = sync_config(buyers, "/slow", "/accept")
    async with running(cfg, redis_server.url) as eng:
        first = asyncio.create_task(eng.lead(email="dee@example.com"))
        await buyers.reached("/slow")
        replay = asyncio.create_task(eng.lead(email="dee@example.com"))
        await asyncio.sleep(0.1)
        assert not replay.done()  # waiting for the waterfall, not answering "pending"
        buyers.release.set()
        (_, r1), (_, r2) = await first, await replay
        assert r1 == r2 and (r1["status"], r1["code"]) == ("ACCEPTED", 0)
        assert len(buyers.at("/slow")) == 1 and await eng.balance("c1") == OPENING - PRICE
        await ledgers_sum(eng)


async def test_idempotency_key_replay_and_round_robin_exclusion(
    redis, redis_server, buyers: Buyers
) -> None:
    cfg = sync_config(buyers, "/reject", "/reject", "/accept", distribution="round_robin")
    async with running(cfg, redis_server.url) as eng:
        body = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}
        hdr = {"Idempotency-Key": "sale-1"}
        _, r = await eng.post({**body, "email": "eve@example.com"}, headers=hdr)
        assert (r["status"], r["code"]) == ("ACCEPTED", 0)
        assert [len(buyers.at(p)) for p in ("/reject", "/accept")] == [2, 1]
        tried = {x.msg_id.rsplit("_", 1)[1] for x in buyers.received}
        assert tried == {"b1", "b2", "b3"}  # each buyer once: the tried ones are excluded
        _, again = await eng.post({**body, "email": "other@example.com"}, headers=hdr)
        assert again == r and len(buyers.received) == 3
        # the same payload without the key, within the replay window: the final result too
        # (its record points to the key's, which the waterfall wrote last)
        _, third = await eng.post({**body, "email": "eve@example.com"})
        assert third == r and len(buyers.received) == 3
        assert await eng.balance("c1") == OPENING - PRICE  # b3 (client c1) pays; b1 refunded
        assert await eng.balance("c2") == OPENING
        assert await eng.balance("wallet") == WALLET0 - FEE_IN - FEE_OUT
        await ledgers_sum(eng)


async def test_worker_running_alongside_never_sends_a_claimed_job(
    redis, redis_server, buyers: Buyers
) -> None:
    """The claims are written before the sale, so a worker reading the job at once defers
    it: each buyer gets each lead exactly once."""
    cfg = sync_config(buyers, "/reject", "/accept")
    async with running(cfg, redis_server.url) as eng:
        w = DeliveryWorker(eng.svc.cfg, eng.store, tenants=["t1"], consumer="live",
                           options=WorkerOptions(block_ms=5))
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        try:
            for i in range(10):
                _, r = await eng.lead(email=f"w{i}@example.com")
                assert (r["status"], r["code"]) == ("ACCEPTED", 0)
            # until the worker has been through every job (it acks and deletes each one it
            # finds decided or refunded), so the counts below include whatever it sent
            deadline = time.monotonic() + 10
            while await eng.redis.xlen(keys.deliveries("t1")):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
        assert len(buyers.at("/reject")) == 10 and len(buyers.at("/accept")) == 10
        assert len({x.msg_id for x in buyers.received}) == 20
        assert await eng.balance("c2") == OPENING - 10 * PRICE
        assert await eng.balance("c1") == OPENING
        await ledgers_sum(eng)


async def test_test_leads_and_async_campaigns_are_not_waited_for(
    redis, redis_server, buyers: Buyers
) -> None:
    cfg = sync_config(buyers, "/reject")
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(supplier="stest", key="key-test", email="t@example.com")
        assert r["status"] == "ACCEPTED" and r["test"] is True
        assert buyers.received == []


async def test_concurrent_twins_get_the_final_result(redis, redis_server, buyers: Buyers) -> None:
    """The same payload posted several times at once: one waterfall, every answer final."""
    cfg = sync_config(buyers, "/reject", "/accept")
    async with running(cfg, redis_server.url) as eng:
        for i in range(5):
            results = await asyncio.gather(*(eng.lead(email=f"twin{i}@example.com")
                                             for _ in range(4)))
            bodies = [r for _, r in results]
            assert all(b == bodies[0] for b in bodies), bodies
            assert (bodies[0]["status"], bodies[0]["code"]) == ("ACCEPTED", 0)
        assert len(buyers.at("/reject")) == 5 and len(buyers.at("/accept")) == 5
        assert await eng.balance("c2") == OPENING - 5 * PRICE
        assert await eng.balance("c1") == OPENING
        await ledgers_sum(eng)


async def test_a_try_that_fails_inside_decide_lua_skips_that_buyer(redis, redis_server,
                                                                   buyers: Buyers) -> None:
    """Try 2 fails in decide.lua (b2's buyer hash is not a hash): it is taken back whole,
    b2 is skipped as a paused buyer would be, and try 3 sells to b3. Before, the lead was
    answered REJECTED 204 ("every buyer rejected it") and b3 never saw it."""
    cfg = sync_config(buyers, "/reject", "/accept", "/accept")
    async with running(cfg, redis_server.url) as eng:
        await redis.delete(keys.buyer("t1", "b2"))
        await redis.set(keys.buyer("t1", "b2"), "not a hash")
        status, r = await eng.lead(email="skip@example.com")
        assert (status, r["status"], r["code"]) == (200, "ACCEPTED", 0), r
        lead_id = r["lead_id"]
        assert [x.msg_id for x in buyers.at("/reject")] == [f"msg_{lead_id}_b1"]
        assert [x.msg_id for x in buyers.at("/accept")] == [f"msg_{lead_id}_b3"]
        assert await eng.balance("c1") == OPENING - PRICE  # b1 refunded, b3 (c1) pays
        assert await eng.balance("c2") == OPENING  # b2's try left nothing
        assert await eng.balance("wallet") == WALLET0 - FEE_IN - FEE_OUT
        status, again = await eng.lead(email="skip@example.com")
        assert (status, again) == (200, r)  # the final record replays
        await ledgers_sum(eng)


async def test_a_failing_last_buyer_ends_the_waterfall_as_all_rejected(
        redis, redis_server, buyers: Buyers) -> None:
    """No buyer left after the skipped one: every buyer the lead was sent to rejected it."""
    cfg = sync_config(buyers, "/reject", "/accept")
    async with running(cfg, redis_server.url) as eng:
        await redis.delete(keys.buyer("t1", "b2"))
        await redis.set(keys.buyer("t1", "b2"), "not a hash")
        status, r = await eng.lead(email="last@example.com")
        assert (status, r["status"], r["code"]) == (200, "REJECTED", 204), r
        assert buyers.at("/accept") == []
        assert await eng.balance("c1") == OPENING and await eng.balance("c2") == OPENING
        await ledgers_sum(eng)


async def test_the_try_after_a_skipped_one_has_a_key_of_its_own(redis, redis_server,
                                                               buyers: Buyers) -> None:
    """b1 rejects; b2's try fails in decide.lua and is skipped; b3 gives no verdict (500)
    and is refunded; b4 rejects. Every try has its own derived key: the try after b3's used
    to be numbered like the skipped one's, so decide.lua replayed b3's sale and the lead
    went to b3 a second time, for nothing. b2 is not tried after a later rejection either."""
    cfg = sync_config(buyers, "/reject", "/accept", "/flaky", "/reject")
    async with running(cfg, redis_server.url) as eng:
        await redis.delete(keys.buyer("t1", "b2"))
        await redis.set(keys.buyer("t1", "b2"), "not a hash")
        status, r = await eng.lead(email="keys@example.com")
        assert (status, r["status"], r["code"]) == (200, "REJECTED", 204), r
        sent = [x.path for x in buyers.received]
        assert sent == ["/reject", "/flaky", "/reject"], sent
        assert "3 tried" in r["message"]
        assert await eng.balance("c1") == OPENING and await eng.balance("c2") == OPENING
        await ledgers_sum(eng)

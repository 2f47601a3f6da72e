"""Every money script is all or nothing: decide.lua per lead, the others per call.

Redis never rolls a script back: a lead whose write failed after its debit (a WRONGTYPE on
a key, a TTL Redis refuses, a Lua error) used to keep its debit and ledger entry without
its delivery job or idempotency record, and a retry charged the buyer again; a refund that
failed after its credit left the sale "sold", and the retry credited again. Each script's
writes are now journaled and undone when it fails (engine/store/lua/_lib.lua): a decide.lua lead
answers ERROR 1050 and the call goes on with the next one; any other script fails whole,
with nothing of it left.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.core.constants import WALLET
from engine.store.scripts import scripts
from tests.helpers.harness import buyer, campaign, make_config, running

_WIN = ["h", "d", "w", "m"]


def _cand(b: str, account: str, price: int, fee: int = 0, day: int = 5) -> dict[str, Any]:
    return {"b": b, "a": account, "p": price, "fo": fee, "bd": [],
            "cap": [-1, day, -1, -1, -1, -1, -1]}


def _lead(n: int, *cands: dict[str, Any], **over: Any) -> dict[str, Any]:
    lead = {"id": f"L{n}", "k": f"k{n}", "kt": 60, "t": 0, "c": "camp", "fi": 0, "n": 1,
            "rr": 0, "q": [], "d": [], "dt": 60, "win": _WIN, "x": "{}",
            "cs": list(cands) or [_cand("b1", "c1", 1_000_000)]}
    return {**lead, **over}


async def _decide(redis: aioredis.Redis, *leads: dict[str, Any]) -> dict[str, Any]:
    raw = await scripts().decide(redis, [keys.tenant_prefix("t1")], [msgspec.json.encode(
        {"now": 1, "w": WALLET, "leads": list(leads)})])
    return msgspec.json.decode(raw)  # type: ignore[no-any-return]


async def _calls(redis: aioredis.Redis, command: str) -> int:
    stats = (await redis.info("commandstats")).get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


async def _keyspace(redis: aioredis.Redis) -> dict[bytes, Any]:
    """Every key of our own test server with its value, for before/after comparisons."""
    out: dict[bytes, Any] = {}
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out[key] = await redis.get(key)
        elif kind == "hash":
            out[key] = await redis.hgetall(key)
        elif kind == "stream":
            out[key] = await redis.xrange(key)
        elif kind == "set":
            out[key] = await redis.smembers(key)
        elif kind == "zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await redis.lrange(key, 0, -1)
    return out


async def test_a_lead_failing_half_way_is_taken_back_and_the_call_goes_on(redis, redis_server):
    """L2's sale record is a string (WRONGTYPE on its HSET, after its debit and ledger
    entry): L2 answers ERROR 1050 with nothing of it left, L1 and L3 are sold. Once the key
    is repaired, the same lead is decided afresh and charged once."""
    cfg = make_config(campaign(), buyer("b1", extra="caps = { day = 5 }"))
    async with running(cfg, redis_server.url) as eng:
        before = await eng.balance("c1")
        await redis.set(keys.lead("t1", "L2"), "not a hash")
        reply = await _decide(redis, _lead(1), _lead(2), _lead(3))

        assert [(r["id"], r["s"], r["c"]) for r in reply["r"]] == [
            ("L1", "ACCEPTED", 0), ("L2", "ERROR", 1050), ("L3", "ACCEPTED", 0)]
        assert reply["r"][1]["sold"] in ([], {})
        [(lead_id, why)] = reply["x"]
        assert lead_id == "L2" and "WRONGTYPE" in why
        assert await eng.balance("c1") == before - 2_000_000
        assert await redis.hget(keys.buyer("t1", "b1"), "dn") == b"2"
        ledger = await redis.xrange(keys.ledger("t1"))
        assert [f[b"ref"] for _, f in ledger if f[b"kind"] == b"lead"] == [b"L1", b"L3"]
        jobs = await redis.xrange(keys.deliveries("t1"))
        assert [f[b"lead_id"] for _, f in jobs] == [b"L1", b"L3"]
        assert await redis.exists(keys.idem("t1", "k2")) == 0  # a retry decides it afresh
        assert reply["m"] == ["2000000", "0"]
        await eng.assert_reconciled()

        await redis.delete(keys.lead("t1", "L2"))
        again = await _decide(redis, _lead(2))
        assert (again["r"][0]["s"], again["r"][0].get("rp", False)) == ("ACCEPTED", False)
        assert await eng.balance("c1") == before - 3_000_000  # L2 charged once
        await eng.assert_reconciled()


async def test_a_lead_failing_at_its_last_write_leaves_the_keyspace_as_it_was(
        redis, redis_server):
    """The latest point a lead can fail: its campaign dedupe marks (a TTL of 0, which SET
    refuses), after everything else it writes. On its way it paused a buyer without funds
    (buyer_paused), sold to the next one round robin (debit, ledger entry, balance_alert,
    balance_negative, cap counters, its daily cap filled: cap_reached and the buyer hash's
    mark of it, sale record, delivery job, cursor) and debited the wallet's fees. Every
    key of the server compares equal before and after; nothing is emitted or debited."""
    cfg = make_config(campaign(distribution="round_robin"),
                      buyer("b0", client="c2", price="500.00"), buyer("b1", price="110.00"))
    async with running(cfg, redis_server.url) as eng:
        failing = _lead(1, _cand("b0", "c2", 500_000_000),
                        _cand("b1", "c1", 110_000_000, 200_000, day=1),
                        rr=1, q=[1, 2], fi=100_000, d=["fp-last"], dt=0)
        state = await _keyspace(redis)
        reply = await _decide(redis, failing)

        assert (reply["r"][0]["s"], reply["r"][0]["c"]) == ("ERROR", 1050)
        assert "invalid expire time" in reply["x"][0][1]
        assert reply["e"] in ([], {}) and reply["m"] == ["0", "0"]
        assert await _keyspace(redis) == state

        # the same lead with a valid TTL does every one of those writes; the events stream
        # is trimmed once, after the leads (a lead's XADD does not: undo could not bring
        # the trimmed entries back)
        trims = await _calls(redis, "xtrim")
        ok = await _decide(redis, {**failing, "dt": 60})
        assert await _calls(redis, "xtrim") == trims + 1
        assert ok["r"][0]["s"] == "ACCEPTED" and ok["r"][0]["sold"] == [["b1", "110000000"]]
        events = [e["type"] for e in await eng.events()]
        assert {"buyer_paused", "balance_alert", "balance_negative", "cap_reached"} <= set(events)
        assert await redis.hget(keys.buyer("t1", "b1"), "crd") == b"d"
        assert await redis.hget(keys.cursors("t1"), "camp") == b"1"
        assert await eng.balance("c1") == -10_000_000
        await eng.assert_reconciled()


async def test_a_lead_the_script_cannot_decide_answers_500_and_its_retry_is_charged_once(
        redis, redis_server, caplog: pytest.LogCaptureFixture):
    """Through HTTP: the tenant's delivery stream is not a stream (XADD fails after the
    debit). The seller gets 500 ERROR 1050, nothing is charged, the log says why; once
    repaired, the seller's retry of the same payload is sold, once."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        before, ledger = await eng.balance("c1"), await redis.xlen(keys.ledger("t1"))
        await redis.set(keys.deliveries("t1"), "not a stream")
        with caplog.at_level(logging.ERROR, logger="leadflow.batcher"):
            status, body = await eng.lead(email="half@example.com")
        assert status == 500
        assert (body["status"], body["code"], body["lead_id"]) == ("ERROR", 1050, None)
        assert "nothing was charged" in body["message"]
        assert "WRONGTYPE" not in body["message"]  # internals stay in the log
        assert await eng.balance("c1") == before
        assert await redis.xlen(keys.ledger("t1")) == ledger
        assert any("not decided, nothing charged" in r.getMessage() and "WRONGTYPE" in
                   r.getMessage() for r in caplog.records)

        await redis.delete(keys.deliveries("t1"))
        status, body = await eng.lead(email="half@example.com")
        assert (status, body["status"]) == (200, "ACCEPTED")
        assert await eng.balance("c1") == before - 10_000_000
        assert await redis.xlen(keys.deliveries("t1")) == 1
        await eng.assert_reconciled()

        # a test lead that fails says it was one
        await redis.delete(keys.buyer("t1", "b1"))
        await redis.set(keys.buyer("t1", "b1"), "not a hash")
        status, body = await eng.lead(email="test@example.com", lp_action="test")
        assert (status, body["code"], body["test"]) == (500, 1050, True)


async def test_a_calls_fees_are_one_wallet_entry_per_campaign_without_the_leads_taken_back(
        redis, redis_server):
    """The platform fees of a call are one wallet ledger entry per campaign, written once
    every lead has committed: its ref lists the leads (comma-separated), inbound and
    outbound are their sums, balance the wallet's after it. L2 fails at its dedupe marks,
    after its fees were counted: they are taken back with the rest of it."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        w0 = await eng.balance("wallet")
        sold = _cand("b1", "c1", 1_000_000, 200_000)
        reply = await _decide(redis, _lead(1, sold, fi=100_000),
                              _lead(2, sold, fi=100_000, d=["fp-2"], dt=0),
                              _lead(3, sold, fi=100_000, c="camp2"),
                              _lead(4, fi=100_000, cs=[]))
        assert [r["s"] for r in reply["r"]] == ["ACCEPTED", "ERROR", "ACCEPTED", "REJECTED"]
        assert reply["m"] == ["2000000", "700000"]
        fees = [{k.decode(): v.decode() for k, v in f.items()}
                for _, f in await redis.xrange(keys.ledger("t1")) if f[b"kind"] == b"fee"]
        assert [(f["ref"], f["delta"], f["balance"], f["inbound"], f["outbound"], f["campaign"])
                for f in fees] == [
            ("L1,L4", "-400000", str(w0 - 400_000), "200000", "200000", "camp"),
            ("L3", "-300000", str(w0 - 700_000), "100000", "200000", "camp2")]
        assert all(f["account"] == WALLET for f in fees)
        assert await eng.balance("wallet") == w0 - 700_000
        await eng.assert_reconciled()
        status, page = await eng.api("GET", f"/v1/accounts/{WALLET}/ledger")
        assert status == 200, page
        assert [(e["ref"], e["lead_id"]) for e in page["entries"] if e["kind"] == "fee"] == [
            ("L3", "L3"), ("L1,L4", None)]  # newest first; lead_id: when it names one


async def test_a_lead_whose_fees_cannot_be_recorded_fails_alone(redis, redis_server):
    """A lead's fee entry is written after the call's leads have committed, so a ledger
    that is not a stream fails the lead that would pay a fee, while it can be taken back
    (before, its own XADD did): nothing of it is left, and a lead without fees is decided."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        w0 = await eng.balance("wallet")
        await redis.rename(keys.ledger("t1"), "saved-ledger")
        await redis.set(keys.ledger("t1"), "not a stream")
        reply = await _decide(redis, _lead(1, fi=100_000, cs=[]), _lead(2, cs=[]))
        assert [(r["s"], r["c"]) for r in reply["r"]] == [("ERROR", 1050), ("REJECTED", 200)]
        assert "WRONGTYPE" in reply["x"][0][1] and reply["m"] == ["0", "0"]
        assert await redis.exists(keys.idem("t1", "k1")) == 0
        await redis.delete(keys.ledger("t1"))
        await redis.rename("saved-ledger", keys.ledger("t1"))
        assert await eng.balance("wallet") == w0
        again = await _decide(redis, _lead(1, fi=100_000, cs=[]))
        assert (again["r"][0]["s"], again["m"]) == ("REJECTED", ["0", "100000"])
        assert await eng.balance("wallet") == w0 - 100_000
        await eng.assert_reconciled()


async def test_bad_data_fails_its_lead_not_the_balances_of_the_call(redis, redis_server):
    """What finish() writes after every lead has committed is checked inside the leads: an
    account whose stored balance is not an integer (HINCRBY would refuse it in finish())
    and a lead without its four window ids (the cap counters' HSET would) each fail their
    own lead. Before, the call failed in finish(): the ledger entries and records of the
    call's other leads stayed and their balances were never written (a free sale)."""
    cfg = make_config(campaign(), buyer("b1"), buyer("b2", client="c2"))
    async with running(cfg, redis_server.url) as eng:
        await redis.hset(keys.acct("t1", "c2"), "bal", "100000000.0")
        reply = await _decide(redis, _lead(1), _lead(2, _cand("b2", "c2", 1_000_000)),
                              _lead(3, win=["h", "d", "w"]), _lead(4))
        assert [r["s"] for r in reply["r"]] == ["ACCEPTED", "ERROR", "ERROR", "ACCEPTED"]
        assert "not an integer" in reply["x"][0][1] and "window" in reply["x"][1][1]
        assert await eng.balance("c1") == 100_000_000 - 2_000_000
        total, _ = await eng.store.ledger_sum("t1", "c1")
        assert total == await eng.balance("c1")
        assert await redis.hget(keys.acct("t1", "c2"), "bal") == b"100000000.0"


@pytest.mark.parametrize("bad_id", [True, "L2,L9"])
async def test_a_lead_id_the_fee_entry_cannot_list_fails_its_lead(redis, redis_server, bad_id):
    """The call's fee entry lists its leads' ids after they have committed: an id that is
    not a string, or has a comma, fails its own lead while it can be taken back (review:
    the entry's ref failed after the leads, before any balance was written: a free sale)."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        w0 = await eng.balance("wallet")
        reply = await _decide(redis, _lead(1, fi=100_000), _lead(2, fi=100_000, cs=[], id=bad_id))
        assert [r["s"] for r in reply["r"]] == ["ACCEPTED", "ERROR"]
        assert "lead id" in reply["x"][0][1]
        assert await eng.balance("c1") == 100_000_000 - 1_000_000
        assert await eng.balance("wallet") == w0 - 100_000
        await eng.assert_reconciled()


async def test_a_failing_try_leaves_an_earlier_sale_records_lifetime_alone(redis, redis_server):
    """A sync try n finds the lead's sale record with try 1's field. A failure at the try's
    idempotency record (a TTL Redis refuses) takes its field back and leaves the record's
    lifetime as it was: the EXPIRE is the lead's last write."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        record = keys.lead("t1", "L1")
        await redis.hset(record, "b0", "{}")
        await redis.expire(record, 100)
        reply = await _decide(redis, _lead(1, kt=0))
        assert reply["r"][0]["s"] == "ERROR" and "invalid expire time" in reply["x"][0][1]
        assert await redis.hgetall(record) == {b"b0": b"{}"}
        assert 0 < await redis.ttl(record) <= 100
        assert await eng.balance("c1") == 100_000_000


async def test_a_lead_refused_its_first_write_fails_alone(redis, redis_server):
    """Out of memory, Redis refuses a script's first write. A lead whose first write is
    a pause (a buyer without funds) answers ERROR like any other; it used to note its
    undo first, whose own write was refused too, and the whole call failed."""
    cfg = make_config(campaign(), buyer("b1", client="c2", price="500.00"), buyer("b2"))
    async with running(cfg, redis_server.url) as eng:
        cands = (_cand("b1", "c2", 500_000_000), _cand("b2", "c1", 1_000_000))
        await redis.config_set("maxmemory", "1")  # our own server: set back below
        try:
            reply = await _decide(redis, _lead(1, *cands), _lead(2))
        finally:
            await redis.config_set("maxmemory", "0")
        assert [r["s"] for r in reply["r"]] == ["ERROR", "ERROR"]
        assert all("OOM" in why for _, why in reply["x"])
        assert (await eng.store.account("t1", "c2")).paused == ""
        again = await _decide(redis, _lead(1, *cands))
        assert again["r"][0]["sold"] == [["b2", "1000000"]]
        assert (await eng.store.account("t1", "c2")).paused == "floor"


# -- the other money scripts: each call all or nothing (atomically, _lib.lua) ----------------


async def test_a_refund_failing_half_way_credits_nothing_and_its_retry_credits_once(
        redis, redis_server):
    """refund.lua credits the buyer and the wallet's fee first and marks the sale refunded
    last; the buyer hash in between is not a hash (WRONGTYPE). The call fails with nothing
    of it left: the sale is still sold, no credit, no ledger entry, its dedupe marks kept.
    Before, the credits stayed and the worker's retry credited a second time."""
    from redis.exceptions import ResponseError

    dedupe = 'dedupe = { fields = ["email"], match = "all", days = 7 }'
    cfg = make_config(campaign(extra=dedupe), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        _, sold = await eng.lead(email="refund@example.com")
        lead_id = sold["lead_id"]
        await redis.xadd(keys.events("t1"), {"type": "other"})  # the stream exists already
        state = await _keyspace(redis)
        hash_ = await redis.hgetall(keys.buyer("t1", "b1"))
        await redis.delete(keys.buyer("t1", "b1"))
        await redis.set(keys.buyer("t1", "b1"), "not a hash")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await eng.store.refund_sale("t1", lead_id, "b1", "rejected")
        await redis.delete(keys.buyer("t1", "b1"))
        await redis.hset(keys.buyer("t1", "b1"), mapping=hash_)
        assert await _keyspace(redis) == state

        res = await eng.store.refund_sale("t1", lead_id, "b1", "rejected")
        assert res.ok and not res.replay and res.state == "refunded"
        assert (await eng.store.refund_sale("t1", lead_id, "b1", "rejected")).replay
        assert await eng.balance("c1") == 100_000_000  # refunded once
        await eng.assert_reconciled()


async def test_an_adjustment_failing_after_its_balance_change_leaves_nothing(redis, redis_server):
    """adjust.lua: the op id's record is the last write; a lifetime Redis refuses (0) fails
    it after the credit, its ledger entry and a buyer_resumed event: all taken back."""
    from redis.exceptions import ResponseError

    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        await redis.hset(keys.acct("t1", "c1"), "paused", "floor")  # a credit resumes it
        state = await _keyspace(redis)
        with pytest.raises(ResponseError, match="invalid expire time"):
            await eng.store.adjust("t1", "c1", 5_000_000, "funding", op_id="wire-1", ttl_s=0)
        assert await _keyspace(redis) == state
        res = await eng.store.adjust("t1", "c1", 5_000_000, "funding", op_id="wire-1")
        assert res.ok and not res.replay
        assert await eng.balance("c1") == 105_000_000
        assert (await eng.store.account("t1", "c1")).paused == ""
        await eng.assert_reconciled()


async def test_a_new_account_whose_opening_entry_fails_is_not_left_without_it(
        redis, redis_server):
    """account_settings.lua creates an account, then writes its opening ledger entry: with the
    tenant's ledger not a stream, the account must not stay behind at balance 0 (a later
    sync finds it existing and never writes the opening balance)."""
    from redis.exceptions import ResponseError

    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        kwargs = {"opening": 7_000_000, "floor": -20_000_000, "alert": 0,
                  "recharge_threshold": 0, "auto_recharge": False, "min_balance": None,
                  "mode": "manual"}
        ledger = await redis.xrange(keys.ledger("t1"))
        await redis.rename(keys.ledger("t1"), "saved-ledger")
        await redis.set(keys.ledger("t1"), "not a stream")
        state = await _keyspace(redis)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await eng.store.apply_account_settings("t1", "c9", **kwargs)
        assert await _keyspace(redis) == state
        await redis.delete(keys.ledger("t1"))
        await redis.rename("saved-ledger", keys.ledger("t1"))
        assert await eng.store.apply_account_settings("t1", "c9", **kwargs)  # created now
        assert await eng.balance("c9") == 7_000_000
        assert len(await redis.xrange(keys.ledger("t1"))) == len(ledger) + 1


async def test_a_refund_failing_at_its_end_sets_the_dedupe_marks_it_forgot_again(
        redis, redis_server):
    """The latest point a refund can fail: forgetting the lead's campaign fingerprints,
    after its credits, cap counters, the sale's own fingerprints (deleted) and the sale
    record's new state. The sale record is doctored so that its buyer-scope list names the
    real dedupe mark and its campaign list holds something that is not a fingerprint: the
    mark comes back with its value and lifetime, and everything else as it was."""
    import msgspec
    from redis.exceptions import ResponseError

    dedupe = 'dedupe = { fields = ["email"], match = "all", days = 7 }'
    cfg = make_config(campaign(extra=dedupe), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        _, sold = await eng.lead(email="late@example.com")
        record = keys.lead("t1", sold["lead_id"])
        sale = msgspec.json.decode(await redis.hget(record, "b1"))
        [mark] = [k for k in await redis.keys(keys.dup("t1", "*"))]
        sale["bd"], sale["cd"] = sale["cd"], [["not a fingerprint"]]
        await redis.hset(record, "b1", msgspec.json.encode(sale))
        state, ttl = await _keyspace(redis), await redis.ttl(mark)
        with pytest.raises(ResponseError, match="concatenate"):
            await eng.store.refund_sale("t1", sold["lead_id"], "b1", "rejected")
        assert await _keyspace(redis) == state
        assert ttl - 2 <= await redis.ttl(mark) <= ttl
        await eng.assert_reconciled()


async def test_a_flag_whose_event_cannot_be_written_is_not_set(redis, redis_server):
    """buyer_pause.lua and arm_recharge.lua set a flag, then write the event it implies
    (buyer_paused): with the events stream not a stream, the flag is not left set without
    its event, in either script."""
    from redis.exceptions import ResponseError

    from engine.store.scripts import scripts

    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url):
        prefix = keys.tenant_prefix("t1")
        await redis.hset(keys.acct("t1", "c1"), mapping={"minb": "500000000", "ar": "1"})
        await redis.delete(keys.events("t1"))
        await redis.set(keys.events("t1"), "not a stream")
        state = await _keyspace(redis)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await scripts().buyer_pause(redis, [prefix], ["b1", "c1", "1", "1"])
        with pytest.raises(ResponseError, match="WRONGTYPE"):  # off below the minimum: pause
            await scripts().arm_recharge(redis, [prefix], ["c1", "0", "0", "1"])
        assert await _keyspace(redis) == state


async def test_a_balance_hincrby_would_refuse_fails_its_lead_not_finish(redis, redis_server):
    """acct() reads a stored balance as HINCRBY does: a leading zero (or "-0", or one past
    the money cap) fails the lead that reads it, before its ledger entry. A looser check
    let the lead commit, then finish()'s HINCRBY refused the balance: a sale never paid."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url):
        for bad in ("0100000000", "-0", "9007199254740992"):  # 2^53: doubles stop
            await redis.hset(keys.acct("t1", "c1"), "bal", bad)
            ledger = await redis.xlen(keys.ledger("t1"))
            reply = await _decide(redis, _lead(1))
            assert reply["r"][0]["s"] == "ERROR", bad
            assert await redis.xlen(keys.ledger("t1")) == ledger
            assert await redis.get(keys.idem("t1", "k1")) is None
            assert await redis.hget(keys.acct("t1", "c1"), "bal") == bad.encode()


async def test_a_refund_undo_leaves_no_counter_it_created(redis, redis_server):
    """refund.lua takes a sale's slot off the buyer's total (HINCRBY tn -1), which creates
    the field, or the hash, when there was none; its undo removes what it created instead
    of leaving {tn: 0} behind."""
    import msgspec
    from redis.exceptions import ResponseError

    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        _, sold = await eng.lead(email="tn@example.com")
        record = keys.lead("t1", sold["lead_id"])
        sale = msgspec.json.decode(await redis.hget(record, "b1"))
        sale["cd"] = [["not a fingerprint"]]  # fails the refund at its very end
        await redis.hset(record, "b1", msgspec.json.encode(sale))
        await redis.delete(keys.buyer("t1", "b1"))
        state = await _keyspace(redis)
        with pytest.raises(ResponseError, match="concatenate"):
            await eng.store.refund_sale("t1", sold["lead_id"], "b1", "rejected")
        assert await _keyspace(redis) == state


async def test_a_balance_past_the_money_cap_still_routes(redis, redis_server):
    """Refunds credit without the adjustment's cap (1e15 micros), so a balance can pass
    it: the account must go on working (acct() refused it, and with it every lead, pause,
    refund and sync of that account; the wallet's, every lead of the tenant)."""
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        for account in ("c1", "wallet"):
            await redis.hset(keys.acct("t1", account), "bal", "1000000010000000")
        reply = await _decide(redis, _lead(1))
        assert reply["r"][0]["s"] == "ACCEPTED"
        assert await eng.balance("c1") == 1_000_000_009_000_000

"""decide.lua's wire format (engine.store.lua_protocol): the Structs' JSON keys are the short
names the script reads, they round-trip, and the script decides what they encode."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.core.constants import WALLET
from engine.ingest.batcher import Batcher
from engine.store.lua_protocol import (
    Call,
    Candidate,
    Decision,
    LeadCall,
    Reply,
    StoredDecision,
    decode_lead,
    decode_reply,
    decode_stored,
    encode_call,
    encode_decision,
    encode_lead,
    table_entry,
)
from engine.store.store import Store, now_ms

_CAPS = (-1, 5, -1, -1, -1, -1, -1)


def _wire_names(cls: Any) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(cls)]


def _lead(n: int, candidates: list[Candidate | str], **over: Any) -> LeadCall:
    lead = LeadCall(id=f"L{n}", key=f"k{n}", key_ttl=60, test=0, campaign="camp", fee_in=0,
                    sell_limit=1, round_robin=0, rotation=[], dedupe=[], dedupe_ttl=60,
                    windows=["h", "d", "w", "m"], candidates=candidates)
    return msgspec.structs.replace(lead, **over)


def test_the_wire_names_are_decide_luas() -> None:
    """The short keys decide.lua reads, in the order the engine has always sent them."""
    assert _wire_names(LeadCall) == ["id", "k", "kt", "t", "c", "fi", "n", "rr", "q", "d",
                                     "dt", "win", "k2", "k2t", "bd", "cs", "x", "pg", "sp", "mr"]
    assert _wire_names(Candidate) == ["b", "a", "p", "fo", "cap", "bd"]
    assert _wire_names(Call) == ["now", "w", "c", "leads"]
    assert _wire_names(Decision) == ["id", "s", "c", "m", "sold", "t", "rp", "b"]
    assert _wire_names(StoredDecision)[-1] == "sy"
    assert _wire_names(Reply) == ["r", "e", "m", "x"]


def test_a_lead_round_trips_and_leaves_out_only_what_is_optional() -> None:
    inline = Candidate(buyer="b1", account="c1", price=1_500_000, fee_out=50_000, caps=_CAPS,
                       dedupe=[])
    lead = _lead(1, [inline, "7.3"], key2="p:x", key2_ttl=30, buyer_dedupe=[["fp"]],
                 rotation=[2, 0, 1], round_robin=1, payload='{"email":"a@b.c"}')
    raw = encode_lead(lead)
    assert decode_lead(raw) == lead
    as_dict = msgspec.json.decode(raw)
    assert as_dict == {
        "id": "L1", "k": "k1", "kt": 60, "t": 0, "c": "camp", "fi": 0, "n": 1, "rr": 1,
        "q": [2, 0, 1], "d": [], "dt": 60, "win": ["h", "d", "w", "m"], "k2": "p:x",
        "k2t": 30, "bd": [["fp"]], "x": '{"email":"a@b.c"}',
        "cs": [{"b": "b1", "a": "c1", "p": 1_500_000, "fo": 50_000, "cap": list(_CAPS),
                "bd": []}, "7.3"]}
    # the optional fields are left out, not sent as null; an inline candidate's empty
    # fingerprints are sent (decide.lua reads their length), a table object has none
    bare = msgspec.json.decode(encode_lead(_lead(2, [inline])))
    assert not {"k2", "k2t", "bd", "x"} & bare.keys()
    assert bare["cs"][0]["bd"] == []
    entry = table_entry("7.3", msgspec.structs.replace(inline, dedupe=None))
    assert msgspec.json.decode(b"{" + entry + b"}") == {"7.3": {
        "b": "b1", "a": "c1", "p": 1_500_000, "fo": 50_000, "cap": list(_CAPS)}}


def test_a_sync_lead_reads_its_candidates_inline_only() -> None:
    inline = Candidate(buyer="b1", account="c1", price=1, fee_out=0, caps=_CAPS, dedupe=[])
    assert _lead(1, [inline]).inline() == [inline]
    try:
        _lead(1, [inline, "7.3"]).inline()
    except ValueError as exc:
        assert "by key" in str(exc)
    else:
        raise AssertionError("a table key passed for an inline candidate")


def test_a_call_joins_encoded_leads_and_sends_each_table_entry_once() -> None:
    cand = Candidate(buyer="b1", account="c1", price=1, fee_out=0, caps=_CAPS)
    entry = table_entry("a.0", cand)
    leads = [encode_lead(_lead(n, ["a.0"])) for n in range(3)]
    raw = encode_call(42, WALLET, [entry, entry, entry], leads)
    call = msgspec.json.decode(raw, type=Call)
    assert (call.now, call.wallet, call.table) == (42, WALLET, {"a.0": cand})
    assert call.leads == [_lead(n, ["a.0"]) for n in range(3)]
    assert raw.count(b'"a.0":') == 1


def test_a_reply_as_cjson_writes_it() -> None:
    """cjson encodes an empty table as {}: empty sales, events and failures decode too."""
    reply = decode_reply(
        b'{"r":[{"id":"L1","s":"REJECTED","c":200,"m":"no buyer","sold":{},"t":0},'
        b'{"id":"L2","s":"ERROR","c":1050,"sold":{},"b":"b2","t":1,"m":"x"},'
        b'{"id":"L3","s":"ACCEPTED","c":0,"m":"","sold":[["b1","1500000"]],"t":0,"rp":true}],'
        b'"e":{},"m":["1500000","0"],"x":[["L2","WRONGTYPE"]]}')
    assert isinstance(reply.decisions, list)
    rejected, failed, replayed = reply.decisions
    assert (rejected.status, rejected.code, rejected.buyers) == ("REJECTED", 200, [])
    assert (failed.status, failed.buyer, failed.test) == ("ERROR", "b2", 1)
    assert replayed.replay and replayed.buyers == [["b1", "1500000"]]
    assert (reply.events, reply.debited, reply.failed) == ({}, ["1500000", "0"],
                                                          [["L2", "WRONGTYPE"]])
    stored = StoredDecision(id="L1", status="ACCEPTED", code=1, sold=[["b1", "1"]],
                            claims_until=99)
    assert msgspec.json.decode(encode_decision(stored))["sy"] == 99
    assert decode_stored(encode_decision(stored)) == stored
    assert decode_stored(encode_decision(replayed)).claims_until == 0


async def test_decide_lua_decides_what_the_structs_encode(redis: aioredis.Redis) -> None:
    """Through the batcher, on a real redis-server: a lead whose candidate is a table key
    (with its fingerprints in the lead), one with an inline candidate and a second key,
    and a test lead; then a replay of each key."""
    store = Store(redis)
    for account in (WALLET, "c1", "c2"):
        await store.apply_account_settings("t1", account, opening=10_000_000, floor=0, alert=0,
                                           recharge_threshold=0, auto_recharge=False,
                                           min_balance=None, mode="manual")
    batcher = Batcher(store, "t1")
    b1 = Candidate(buyer="b1", account="c1", price=1_000_000, fee_out=100_000, caps=_CAPS)
    b2 = Candidate(buyer="b2", account="c2", price=2_000_000, fee_out=0, caps=_CAPS,
                   dedupe=["fp-b2"])
    by_key = _lead(1, ["p.0"], buyer_dedupe=[["fp-b1"]], fee_in=10_000)
    inline = _lead(2, [b2], key2="k2-alias", key2_ttl=60, dedupe=["fp-c"])
    test = _lead(3, ["p.0"], test=1)
    entries = [table_entry("p.0", b1)]

    async def decide(*leads: LeadCall) -> list[Decision]:
        return list(await asyncio.gather(*(
            batcher.decide(encode_lead(lead), b'{"email":"a@b.c"}', entries) for lead in leads)))

    first = await decide(by_key, inline, test)
    assert [(d.id, d.status, d.code, d.buyers, d.test, d.replay) for d in first] == [
        ("L1", "ACCEPTED", 0, [["b1", "1000000"]], 0, False),
        ("L2", "ACCEPTED", 0, [["b2", "2000000"]], 0, False),
        ("L3", "ACCEPTED", 0, [["b1", "1000000"]], 1, False)]
    assert (await store.account("t1", "c1")).balance == 9_000_000  # type: ignore[union-attr]
    assert (await store.account("t1", "c2")).balance == 8_000_000  # type: ignore[union-attr]
    # fees: the inbound fee of L1 and b1's outbound fee, nothing for the test lead
    assert (await store.account("t1", WALLET)).balance == 9_890_000  # type: ignore[union-attr]
    assert await redis.exists(keys.dup("t1", "fp-b1"), keys.dup("t1", "fp-b2"),
                              keys.dup("t1", "fp-c")) == 3
    assert await redis.get(keys.idem("t1", "k2-alias")) == b"k2"  # a pointer to the key
    stored = decode_stored(await redis.get(keys.idem("t1", "k1")))
    assert (stored.id, stored.status, stored.buyers, stored.claims_until) == (
        "L1", "ACCEPTED", [["b1", "1000000"]], 0)

    again = await decide(by_key, _lead(4, [b2], key="k2-alias"), test)
    assert [(d.id, d.replay) for d in again] == [("L1", True), ("L2", True), ("L3", True)]
    assert [d.buyers for d in again] == [d.buyers for d in first]
    await batcher.drain()


async def test_more_takes_back_the_try_and_stores_nothing(redis: aioredis.Redis) -> None:
    """A lead given the first of more candidates (``mr``) that they cannot take in full
    (here: sell limit 2, one of the two sells, the other has no funds): MORE, with the
    sale taken back, no record, mark, ledger entry, delivery job or event. Without ``mr``
    the same lead is decided and sold to the one."""
    store = Store(redis)
    for account, opening in ((WALLET, 10_000_000), ("c1", 10_000_000), ("poor", 0)):
        await store.apply_account_settings("t1", account, opening=opening, floor=0, alert=0,
                                           recharge_threshold=0, auto_recharge=False,
                                           min_balance=None, mode="manual")
    batcher = Batcher(store, "t1")
    rich = Candidate(buyer="b1", account="c1", price=1_000_000, fee_out=100_000, caps=_CAPS)
    poor = Candidate(buyer="b2", account="poor", price=1_000_000, fee_out=0, caps=_CAPS)
    entries = [table_entry("r.0", rich), table_entry("p.0", poor)]
    lead = _lead(1, ["r.0", "p.0"], sell_limit=2, fee_in=10_000, dedupe=["fp-c"],
                 buyer_dedupe=[["fp-b1"], ["fp-b2"]], more=1)
    before = {k: await redis.type(k) for k in await redis.keys("*")}
    streams = {k: await redis.xlen(k) for k, t in before.items() if t == b"stream"}
    more = await batcher.decide(encode_lead(lead), b'{"email":"a@b.c"}', entries)
    assert (more.id, more.status, more.buyers) == ("L1", "MORE", [])
    assert {k: await redis.type(k) for k in await redis.keys("*")} == before
    assert {k: await redis.xlen(k) for k in streams} == streams
    assert (await store.account("t1", "c1")).balance == 10_000_000  # type: ignore[union-attr]
    assert (await store.account("t1", "poor")).paused == ""  # type: ignore[union-attr]
    decided = await batcher.decide(encode_lead(msgspec.structs.replace(lead, more=0)),
                                   b'{"email":"a@b.c"}', entries)
    assert (decided.status, decided.buyers) == ("ACCEPTED", [["b1", "1000000"]])
    assert (await store.account("t1", "c1")).balance == 9_000_000  # type: ignore[union-attr]
    assert await redis.exists(keys.idem("t1", "k1")) == 1
    await batcher.drain()


@pytest.mark.parametrize("more_first", [False, True])
async def test_a_more_leaves_expired_holds_released_for_the_calls_next_leads(
        redis: aioredis.Redis, more_first: bool) -> None:
    """An account read by a lead releases its holds past their expiry, and stays cached
    for the call's later leads. When that lead answers MORE, the release stands: the
    next lead sees the whole balance (review: the undo put the holds back, and a later
    lead found the account without funds and paused it at its floor)."""
    store = Store(redis)
    for account, opening in ((WALLET, 10_000_000), ("A", 1_000_000)):
        await store.apply_account_settings("t1", account, opening=opening, floor=0, alert=0,
                                           recharge_threshold=0, auto_recharge=False,
                                           min_balance=None, mode="manual")
    expired = now_ms() - 10_000  # a ping-post hold of 0.90 past its expiry, not swept yet
    await redis.zadd(keys.holds("t1", "A"), {"pg1|bH|900000": expired})
    await redis.hset(keys.acct("t1", "A"), mapping={"held": 900_000, "hnext": expired})
    await redis.hset(keys.ping("t1", "pg1"), mapping={"h:bH": "A|900000", "st": "posted:x"})
    await redis.hset(keys.buyer("t1", "bX"), "paused", "manual")
    batcher = Batcher(store, "t1", max_inflight=1)
    x = Candidate(buyer="bX", account="A", price=500_000, fee_out=0, caps=_CAPS)
    y = Candidate(buyer="bY", account="A", price=500_000, fee_out=0, caps=_CAPS)
    entries = [table_entry("x.0", x), table_entry("y.0", y)]
    leads = [_lead(2, ["y.0"])]
    if more_first:  # bX is paused: its lead answers MORE, after reading A
        leads.insert(0, _lead(1, ["x.0"], more=1))
    out = await asyncio.gather(*(batcher.submit(encode_lead(lead), b"{}", entries)
                                 for lead in leads))
    await batcher.drain()
    assert [d.status for d in out] == ["MORE", "ACCEPTED"][2 - len(leads):]
    a = await store.account("t1", "A")
    assert a is not None and a.paused == "" and a.balance == 500_000
    assert await redis.zcard(keys.holds("t1", "A")) == 0

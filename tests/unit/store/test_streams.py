"""The Redis Streams consumer every worker reads with (engine/store/streams.py), against the
tests' real redis-server: claims of a dead consumer's entries, acks, dead letters after N
deliveries, one read over every stream, a group deleted under a reader, and the loop."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engine.core import keys
from engine.store.streams import Batch, Reader, StreamConsumer

G = "g"
S1, S2 = keys.events("t1"), keys.events("t2")


def consumer(redis: aioredis.Redis, name: str, streams: dict[str, str] | None = None,
             **kw: object) -> StreamConsumer:
    return StreamConsumer(redis, G, name, streams or {S1: "t1"},
                          dead_letter=lambda t: keys.dead_letter(t, "events"), **kw)


async def add(redis: aioredis.Redis, stream: str, n: int) -> list[str]:
    return [(await redis.xadd(stream, {"n": str(i)})).decode() for i in range(n)]


def ids(batches: list[Batch]) -> list[str]:
    return [i for b in batches for i, _ in b.entries]


async def pending(redis: aioredis.Redis, stream: str = S1) -> list[dict[str, object]]:
    return list(await redis.xpending_range(stream, G, "-", "+", 100))


async def test_a_dead_consumers_pending_entries_are_claimed_once_idle(
        redis: aioredis.Redis) -> None:
    dead = consumer(redis, "dead")
    await dead.ensure()
    added = await add(redis, S1, 3)
    assert ids(await dead.read(10, None)) == added  # read, never acked: the consumer died

    assert await consumer(redis, "live", claim_idle_ms=60_000).claim(10) == []  # not idle yet
    live = consumer(redis, "live", claim_idle_ms=0, held=lambda: {"t1": [added[0]]})
    claimed = await live.claim(10)
    assert [(b.tenant, b.stream) for b in claimed] == [("t1", S1)]
    assert ids(claimed) == added[1:]  # the entry held here is left out
    assert claimed[0].entries[0][1] == {b"n": b"1"}
    owners = {p["message_id"].decode(): p["consumer"].decode() for p in await pending(redis)}
    assert owners == dict.fromkeys(added, "live")  # (a held entry is this consumer's anyway)
    assert await live.deliveries(S1, added[1]) == 2  # read once, claimed once


async def test_ack_and_ack_with_delete(redis: aioredis.Redis) -> None:
    c = consumer(redis, "c")
    added = await add(redis, S1, 3)
    assert ids(await c.poll(10)) == added  # the group is made on the way (NOGROUP)
    await c.ack(S1, added[0])
    assert await redis.xlen(S1) == 3
    await c.ack(S1, added[1], added[2], delete=True)
    assert await pending(redis) == []
    assert [i.decode() for i, _ in await redis.xrange(S1)] == added[:1]
    async with redis.pipeline(transaction=True) as pipe:  # inside the caller's MULTI
        c.ack_in(pipe, S1, added[0], delete=True)
        pipe.xlen(S1)
        assert await pipe.execute() == [0, 1, 0]


async def test_an_entry_is_dead_lettered_after_max_deliveries(redis: aioredis.Redis) -> None:
    c = consumer(redis, "c", claim_idle_ms=0, max_deliveries=3)
    await c.ensure()
    [entry] = await add(redis, S1, 1)
    fields = (await c.read(10, None))[0].entries[0][1]
    assert not await c.give_up("t1", S1, entry, fields, "E: once")  # delivered once
    assert ids(await c.claim(10)) == [entry]
    assert not await c.give_up("t1", S1, entry, fields, "E: twice")
    assert ids(await c.claim(10)) == [entry]
    assert await c.give_up("t1", S1, entry, fields, "E: " + "x" * 600)  # third: dead
    [(_, dead)] = await redis.xrange(keys.dead_letter("t1", "events"))
    assert dead[b"n"] == b"0" and dead[b"source_id"] == entry.encode()
    assert dead[b"error"] == ("E: " + "x" * 600)[:500].encode() and int(dead[b"ts"]) > 0
    assert await pending(redis) == []  # acked
    assert await redis.xlen(S1) == 1  # the entry itself stays (no XDEL)
    with pytest.raises(ValueError, match="no dead-letter stream"):
        await StreamConsumer(redis, G, "c", {S1: "t1"}).dead_letter("t1", S1, entry, {}, "x")


async def test_one_read_over_every_stream_on_one_redis(redis: aioredis.Redis) -> None:
    c = consumer(redis, "c", {S1: "t1", S2: "t2"})
    assert c.readers == [(S1, S2)]
    assert consumer(redis, "c", {S1: "t1", S2: "t2"}, split=True).readers == [(S1,), (S2,)]
    await c.ensure()
    a1, a2 = await add(redis, S1, 2), await add(redis, S2, 1)
    before = (await redis.info("commandstats"))["cmdstat_xreadgroup"]["calls"]
    got = await c.read(10, 100)
    assert (await redis.info("commandstats"))["cmdstat_xreadgroup"]["calls"] == before + 1
    assert sorted((b.tenant, b.stream, [i for i, _ in b.entries]) for b in got) == [
        ("t1", S1, a1), ("t2", S2, a2)]
    assert await c.read(10, None) == []


async def test_a_stream_deleted_under_a_reader_gets_its_group_back(
        redis: aioredis.Redis) -> None:
    c = consumer(redis, "c", {S1: "t1", S2: "t2"})
    await c.ensure()
    await redis.delete(S2)
    first = await add(redis, S2, 1)  # the stream again, without the group
    assert await c.read(10, None) == []  # NOGROUP: the group is made again, nothing read
    assert await c.claim(10) == []
    second = await add(redis, S2, 1)
    assert ids(await c.read(10, None)) == first + second  # the new group reads from 0


async def test_an_entry_deleted_while_pending_is_claimed_as_gone(redis: aioredis.Redis) -> None:
    c = consumer(redis, "c", claim_idle_ms=0)
    await c.ensure()
    kept, deleted = await add(redis, S1, 2)
    await c.read(10, None)
    await redis.xdel(S1, deleted)
    [batch] = await c.claim(10)
    assert [i for i, _ in batch.entries] == [kept]
    assert batch.gone in ([deleted], [])  # Redis 6.2 claims it empty; 7 drops it itself


async def test_touch_keeps_an_entry_from_being_claimed(redis: aioredis.Redis) -> None:
    busy = consumer(redis, "busy")
    await busy.ensure()
    [entry] = await add(redis, S1, 1)
    await busy.read(10, None)
    await redis.xclaim(S1, G, "busy", 0, [entry], idle=120_000, justid=True)  # 2 min idle
    assert (await pending(redis))[0]["time_since_delivered"] >= 120_000
    await busy.touch(S1, [entry])
    assert (await pending(redis))[0]["time_since_delivered"] < 60_000
    assert await consumer(redis, "other", claim_idle_ms=60_000).claim(10) == []


async def test_run_claims_then_reads_and_hands_entries_over_until_stopped(
        redis: aioredis.Redis) -> None:
    dead = consumer(redis, "dead")
    await dead.ensure()
    stale = await add(redis, S1, 2)
    await dead.read(10, None)  # left pending by a consumer that died
    c = consumer(redis, "c", {S1: "t1", S2: "t2"}, block_ms=20, claim_idle_ms=0,
                 claim_every_ms=60_000)
    got: list[tuple[Reader, list[str]]] = []
    passes: list[Reader] = []
    stop = asyncio.Event()

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        got.append((reader, ids(batches)))
        for b in batches:
            await c.ack(b.stream, *[i for i, _ in b.entries])
        return len(ids(batches))

    async def before(reader: Reader) -> None:
        passes.append(reader)

    task = asyncio.create_task(c.run(stop, handle, before=before))
    new = await add(redis, S2, 1) + await add(redis, S1, 1)

    async def all_handled() -> None:
        while sorted(i for _, b in got for i in b) != sorted(stale + new):  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(all_handled(), 10)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert got[0] == ((S1, S2), stale)  # the first pass claims, and reads nothing more
    assert all(r == (S1, S2) for r, _ in got) and passes and set(passes) == {(S1, S2)}
    assert await pending(redis) == [] and await pending(redis, S2) == []


async def test_run_in_turn_survives_a_broken_stream_and_waits_when_idle(
        redis: aioredis.Redis) -> None:
    """Readers polled one after another (the archive's loop): a stream that fails every
    pass (not a stream: WRONGTYPE) is reported and holds no other back."""
    broken = keys.events("broken")
    await redis.set(broken, "not a stream")
    c = consumer(redis, "c", {broken: "broken", S1: "t1"}, split=True, block_ms=None,
                 claim_every_ms=0)
    errors: list[tuple[Reader, str]] = []
    got: list[str] = []
    stop = asyncio.Event()
    rounds = 0

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        nonlocal rounds
        rounds += 1
        got.extend(ids(batches))
        return len(ids(batches))

    def failed(reader: Reader, exc: Exception) -> None:
        errors.append((reader, type(exc).__name__))

    added = await add(redis, S1, 2)
    task = asyncio.create_task(c.run(stop, handle, survive=(Exception,), on_error=failed,
                                     retry_s=0, idle_s=0.01, in_turn=True))

    async def handled() -> None:
        while got != added or rounds < 3:  # noqa: ASYNC110 - polls what the loop did
            await asyncio.sleep(0.005)

    await asyncio.wait_for(handled(), 10)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert errors and set(errors) == {((broken,), "ResponseError")}


async def test_run_lets_an_error_it_does_not_survive_through(redis: aioredis.Redis) -> None:
    await redis.set(S1, "not a stream")
    c = consumer(redis, "c", block_ms=None)

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        return 0

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await asyncio.wait_for(c.run(asyncio.Event(), handle), 5)


async def test_run_stops_when_room_says_so(redis: aioredis.Redis) -> None:
    """``room`` 0: the worker stopped while waiting for room; the loop reads nothing."""
    c = consumer(redis, "c")
    stop = asyncio.Event()
    await add(redis, S1, 1)

    async def room() -> int:
        stop.set()
        return 0

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        raise AssertionError("nothing is read once stopped")

    await asyncio.wait_for(c.run(stop, handle, room=room), 5)
    assert await redis.xinfo_groups(S1) == []  # not even a claim was made


async def test_run_without_streams_waits_for_stop(redis: aioredis.Redis) -> None:
    c = StreamConsumer(redis, G, "c", {})
    assert c.readers == []
    stop = asyncio.Event()

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        raise AssertionError("no stream, nothing read")

    task = asyncio.create_task(c.run(stop, handle, in_turn=True))
    await asyncio.sleep(0)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)

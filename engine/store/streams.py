"""Redis Streams consumer groups: the one consumer every worker reads its streams with.

A worker's streams (one per tenant: ``keys.deliveries``, ``keys.events``, ``keys.ledger``)
are read through a consumer group by a :class:`StreamConsumer`, one member of the group:

* **Group**: created from id ``0`` with ``MKSTREAM`` (:meth:`~StreamConsumer.ensure`); a
  read or claim answered ``NOGROUP`` (the stream or its group was deleted under a running
  worker) creates it again and reads nothing that time.
* **Reading**: ``XREADGROUP ... >`` over a *reader*'s streams: every stream in one call on
  one Redis (one connection however many tenants), one stream per call on a Redis Cluster,
  where each tenant's keys are their own slot and a read over several slots is refused.
* **Claiming**: ``XAUTOCLAIM`` hands over entries idle longer than ``claim_idle_ms`` (a
  crashed consumer's), leaving out those ``held`` here still (in flight in this process).
* **Acking**, with ``XDEL`` if asked, directly or inside the caller's ``MULTI``.
* **Dead letters**: an entry that failed ``max_deliveries`` times (XPENDING's delivery
  count) is copied to the tenant's dead-letter stream with its error, and acked.
* **The loop** (:meth:`~StreamConsumer.run`): one task per reader (or the readers in
  turn), each pass: wait for room, the worker's own step (``before``), claim when
  ``claim_every_ms`` passed, else (or when the claim took nothing) read, and hand the
  entries to ``handle``. A pass that fails with one of ``survive`` is reported and tried
  again ``retry_s`` later; its entries stay pending, so nothing is lost.

Only low-level modules are imported (the store's client helpers): billing's workers and
the delivery worker use it alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engine.store.store import UNAVAILABLE, is_cluster, now_ms

Fields = dict[bytes, bytes]
Reader = tuple[str, ...]  # stream keys read together by one XREADGROUP


class Batch(NamedTuple):
    """Entries of one stream read or claimed together."""

    tenant: str
    stream: str
    entries: list[tuple[str, Fields]]  # (entry id, fields), in stream order
    gone: list[str]  # claimed ids of entries deleted while pending (Redis 6.2 claims those)


# (the reader, its batches) -> how many entries the worker took on
Handler = Callable[[Reader, list[Batch]], Awaitable[int]]


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


@dataclass(slots=True)
class _State:
    """One reader's loop: when it last claimed (None: never, so its first pass does)."""

    claimed_at: int | None = None


class StreamConsumer:
    """One consumer of ``group`` over ``streams`` (stream key -> its tenant). See the
    module docs. ``split``: one reader per stream (default: on a Redis Cluster only);
    ``clock``: milliseconds for ``claim_every_ms`` (any origin); ``held``: the entry ids
    this process still works on, per tenant, left out of claims (asked only when a claim
    returned entries); ``dead_letter``: a tenant's dead-letter stream key, and
    ``max_deliveries`` the deliveries after which :meth:`give_up` sends an entry there."""

    def __init__(
        self,
        redis: aioredis.Redis,
        group: str,
        consumer: str,
        streams: Mapping[str, str],
        *,
        count: int = 50,
        block_ms: int | None = 1_000,
        claim_idle_ms: int = 60_000,
        claim_every_ms: int = 5_000,
        split: bool | None = None,
        held: Callable[[], Mapping[str, Collection[str]]] | None = None,
        dead_letter: Callable[[str], str] | None = None,
        max_deliveries: int | None = None,
        clock: Callable[[], int] = _monotonic_ms,
    ) -> None:
        self.redis = redis
        self.group, self.consumer = group, consumer
        self.streams = dict(streams)
        self.count, self.block_ms = count, block_ms
        self.claim_idle_ms, self.claim_every_ms = claim_idle_ms, claim_every_ms
        self.held = held
        self.dead_letter_key = dead_letter
        self.max_deliveries = max_deliveries
        self.clock = clock
        self.readers: list[Reader] = []  # streams read by one XREADGROUP each
        if split or (split is None and is_cluster(redis)):
            self.readers = [(s,) for s in self.streams]
        elif self.streams:
            self.readers = [tuple(self.streams)]

    # -- the group -----------------------------------------------------------------------

    async def ensure(self, streams: Iterable[str] | None = None, *, start: str = "0") -> None:
        """Create the group on each stream (and the stream) unless it exists, reading from
        ``start`` (``0``: the whole stream; ``$``: what comes after now)."""
        for stream in self.streams if streams is None else streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- reading -------------------------------------------------------------------------

    async def claim(self, count: int, reader: Reader | None = None) -> list[Batch]:
        """Entries of ``reader``'s streams (default: every stream) idle longer than
        ``claim_idle_ms``, now this consumer's, except those ``held`` here."""
        out: list[Batch] = []
        held: Mapping[str, Collection[str]] | None = None
        for stream in self.streams if reader is None else reader:
            try:
                res: Any = await self.redis.xautoclaim(
                    stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=count)
            except ResponseError as exc:
                if not _nogroup(exc):
                    raise
                await self.ensure([stream])
                continue
            if not res[1]:  # [next id, entries(, deleted ids: Redis 7)]
                continue
            tenant = self.streams[stream]
            if held is None and self.held is not None:
                held = self.held()
            skip = set(held.get(tenant, ())) if held else set()
            out.append(_batch(tenant, stream, res[1], skip))
        return out

    async def read(self, count: int, block_ms: int | None,
                   reader: Reader | None = None) -> list[Batch]:
        """New entries (``>``) of ``reader``'s streams in one XREADGROUP, waiting up to
        ``block_ms`` for one (None: not at all); default: every reader, one after another."""
        out: list[Batch] = []
        for r in self.readers if reader is None else [reader]:
            try:
                rows: Any = await self.redis.xreadgroup(
                    self.group, self.consumer, dict.fromkeys(r, ">"), count=count,
                    block=block_ms)
            except ResponseError as exc:
                if not _nogroup(exc):
                    raise
                await self.ensure(r)  # a stream or its group was deleted: a new one
                continue
            for raw_stream, entries in rows or []:
                stream = raw_stream.decode() if isinstance(raw_stream, bytes) else raw_stream
                out.append(_batch(self.streams[stream], stream, entries, ()))
        return out

    async def poll(self, count: int, block_ms: int | None = None,
                   reader: Reader | None = None) -> list[Batch]:
        """One pass by hand (tests, tools, one-shot workers): the claimed entries, then the
        new ones, read after the claim."""
        claimed = await self.claim(count, reader)
        return claimed + await self.read(count, block_ms, reader)

    # -- acking, dead letters, keeping entries ---------------------------------------------

    async def ack(self, stream: str, *ids: str, delete: bool = False) -> None:
        """XACK (and XDEL) ``ids`` of ``stream``; with XDEL, in one MULTI."""
        if not delete:
            await self.redis.xack(stream, self.group, *ids)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            self.ack_in(pipe, stream, *ids, delete=True)
            await pipe.execute()

    def ack_in(self, pipe: Any, stream: str, *ids: str, delete: bool = False) -> None:
        """Queue the ack (and XDEL) of ``ids`` in the caller's pipeline or MULTI."""
        pipe.xack(stream, self.group, *ids)
        if delete:
            pipe.xdel(stream, *ids)

    async def deliveries(self, stream: str, entry_id: str) -> int:
        """How many times the entry was delivered (read or claimed); 1 when not pending."""
        rows = await self.redis.xpending_range(stream, self.group, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def dead_letter(self, tenant: str, stream: str, entry_id: str, fields: Fields,
                          error: str, *, ack: bool = True) -> None:
        """Copy the entry to the tenant's dead-letter stream (its fields, ``source_id``,
        ``error``, ``ts``) and ack it, in one MULTI (one tenant: one slot). ``ack=False``:
        the copy only, the entry stays pending (part of it failed for good, the rest is
        still to do)."""
        if self.dead_letter_key is None:
            raise ValueError(f"consumer group {self.group}: no dead-letter stream")
        dead: dict[Any, Any] = {**fields, b"source_id": entry_id, b"error": error[:500],
                                b"ts": now_ms()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter_key(tenant), dead)
            if ack:
                pipe.xack(stream, self.group, entry_id)
            await pipe.execute()

    async def give_up(self, tenant: str, stream: str, entry_id: str, fields: Fields,
                      error: str) -> bool:
        """After a failure left the entry pending: dead-letter it once it was delivered
        ``max_deliveries`` times (True); else leave it for a later claim (False)."""
        if self.max_deliveries is None:
            raise ValueError(f"consumer group {self.group}: no max_deliveries")
        if await self.deliveries(stream, entry_id) < self.max_deliveries:
            return False
        await self.dead_letter(tenant, stream, entry_id, fields, error)
        return True

    async def touch(self, stream: str, ids: Sequence[Any]) -> None:
        """Reset the idle time of entries this consumer still works on (XCLAIM JUSTID to
        itself), so no other consumer claims them meanwhile."""
        await self.redis.xclaim(stream, self.group, self.consumer, 0, list(ids), justid=True)

    # -- the loop ------------------------------------------------------------------------

    async def run(
        self,
        stop: asyncio.Event,
        handle: Handler,
        *,
        room: Callable[[], Awaitable[int]] | None = None,
        before: Callable[[Reader], Awaitable[Any]] | None = None,
        survive: tuple[type[Exception], ...] = UNAVAILABLE,
        on_error: Callable[[Reader, Exception], None] | None = None,
        retry_s: float = 1.0,
        idle_s: float = 0.0,
        in_turn: bool = False,
    ) -> None:
        """Read and hand entries over until ``stop`` is set (see the module docs).

        ``room``: how many entries the worker can take now (it may wait for room; 0: it
        stopped), else ``count``; ``before``: the worker's own step at the start of each
        pass of a reader; ``idle_s``: after a pass (with ``in_turn``: a round over every
        reader) that took nothing, wait this long (for non-blocking reads);
        ``in_turn``: one task polls the readers one after another, instead of one task
        each."""

        async def guarded(reader: Reader, state: _State) -> int:
            try:
                return await self._pass(reader, state, handle, room, before)
            except survive as exc:
                if on_error is not None:
                    on_error(reader, exc)
                if retry_s:
                    await _wait(stop, retry_s)
                return 0

        async def loop(reader: Reader) -> None:
            state = _State()
            while not stop.is_set():
                if not await guarded(reader, state) and idle_s and not stop.is_set():
                    await _wait(stop, idle_s)

        async def rounds() -> None:
            states = [(r, _State()) for r in self.readers]
            while not stop.is_set():
                taken = 0
                for reader, state in states:
                    taken += await guarded(reader, state)
                if not taken and idle_s and not stop.is_set():
                    await _wait(stop, idle_s)

        if not self.readers:  # no stream: nothing to read until stopped
            await stop.wait()
        elif in_turn:
            await rounds()
        else:
            await asyncio.gather(*(loop(r) for r in self.readers))

    async def _pass(self, reader: Reader, state: _State, handle: Handler,
                    room: Callable[[], Awaitable[int]] | None,
                    before: Callable[[Reader], Awaitable[Any]] | None) -> int:
        """Claimed entries are handed over at once; a pass that took any reads nothing new
        (the next pass does)."""
        count = self.count if room is None else await room()
        if count <= 0:
            return 0
        if before is not None:
            await before(reader)
        now = self.clock()
        if state.claimed_at is None or now - state.claimed_at >= self.claim_every_ms:
            state.claimed_at = now
            claimed = await self.claim(count, reader)
            if claimed and (taken := await handle(reader, claimed)):
                return taken
        return await handle(reader, await self.read(count, self.block_ms, reader))


def _batch(tenant: str, stream: str, raw: Iterable[Any], skip: Collection[str]) -> Batch:
    entries: list[tuple[str, Fields]] = []
    gone: list[str] = []
    for raw_id, fields in raw:
        entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        if entry_id in skip:
            continue
        if fields:
            entries.append((entry_id, fields))
        else:
            gone.append(entry_id)
    return Batch(tenant, stream, entries, gone)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Until ``stop`` is set or ``seconds`` passed."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return

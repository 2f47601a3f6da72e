"""Typed access to leadflow's state in Redis: every call is one Lua script.

This is the only module that runs the money-moving scripts; billing, delivery and the
HTTP API all go through it, so a balance can only change together with its ledger entry
and its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, NamedTuple, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.core import keys
from engine.core.constants import DEFAULT_FLOOR, WALLET
from engine.core.errors import StoreUnavailable
from engine.store.scripts import Scripts, scripts

log = logging.getLogger("leadflow.store")

USAGE_TTL_S = 32 * 86_400  # usage event ids are remembered at least 32 days
OP_TTL_S = 40 * 86_400
LEDGER_PAGE = 1_000  # ledger stream entries per XREVRANGE


class AdjustResult(msgspec.Struct, frozen=True):
    ok: bool
    balance: str = "0"
    entry: str = ""
    replay: bool = False
    error: str = ""
    events: list[str | int] | dict[str, int] = []
    delta: str = ""  # the op's delta (a replay: the first call's; "" if stored before it was)


class SaleResult(msgspec.Struct, frozen=True):
    ok: bool
    state: str = ""
    price: str = "0"
    replay: bool = False
    error: str = ""
    events: list[str | int] | dict[str, int] = []  # emitted by this call (refund.lua)


class AccountState(msgspec.Struct, frozen=True):
    id: str
    balance: int
    floor: int
    alert: int
    recharge_threshold: int
    auto_recharge: bool
    min_balance: int | None
    mode: str
    paused: str
    closed: bool
    held: int = 0  # open ping-post holds (micros); available = balance - held
    own_alert: bool = False  # the alert is the account's own (PUT /alert), not the config's

    @property
    def available(self) -> int:
        return self.balance - self.held


class PingBid(msgspec.Struct, frozen=True):
    bid_id: str
    price: str  # the price offered to the seller, decimal text


class PingHoldResult(msgspec.Struct, frozen=True):
    """ping_hold.lua's answer (see its header)."""

    s: str
    c: int
    id: str
    m: str = ""
    bids: list[PingBid] | dict[str, Any] = []
    held: list[list[str]] | dict[str, Any] = []  # [buyer, micros] in auction order
    xa: str = ""
    t: int = 0
    rp: bool = False
    e: list[str | int] | dict[str, Any] = []  # with "hold:expired" (lazy releases)

    @property
    def bid_list(self) -> list[PingBid]:
        return self.bids if isinstance(self.bids, list) else []

    @property
    def held_list(self) -> list[list[str]]:
        return self.held if isinstance(self.held, list) else []


class _Armed(msgspec.Struct, frozen=True):
    ok: bool
    events: list[str | int] | dict[str, int] = []


_arm_dec = msgspec.json.Decoder(_Armed)
_hold_dec = msgspec.json.Decoder(PingHoldResult)
_adjust_dec = msgspec.json.Decoder(AdjustResult)
_sale_dec = msgspec.json.Decoder(SaleResult)
_enc = msgspec.json.Encoder()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


CLUSTER_SCHEME = "redis+cluster://"


def connect(url: str, *, max_connections: int = 64, pool_timeout_s: float = 5.0
            ) -> aioredis.Redis:
    """A client with blind retries turned off: a timed-out script may have run, and only
    the idempotency keys (not the transport) may decide to run it again.

    A command finding every one of the ``max_connections`` connections busy waits up to
    ``pool_timeout_s`` for one (:class:`QueueingPool`): a burst over many tenants, each its
    own Lua call, queues instead of failing as if Redis were down. The service sizes the pool
    from its own concurrency limits (:func:`pool_size`), so the wait is rare.

    ``redis+cluster://host:port`` connects to a Redis Cluster through any of its nodes;
    every script touches one tenant's keys, which share a hash tag, so one slot. (redis-py's
    cluster client has no blocking pool: ``max_connections`` is per node, and sized so that
    the engine's own limits never reach it.)
    """
    if url.startswith(CLUSTER_SCHEME):
        cluster = RedisCluster.from_url(
            "redis://" + url.removeprefix(CLUSTER_SCHEME),
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
        )
        # the cluster client speaks the same command API; Store only uses that API
        return cast(aioredis.Redis, cluster)
    pool = QueueingPool.from_url(
        url,
        max_connections=max_connections,
        wait_s=pool_timeout_s,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it


class QueueingPool(aioredis.ConnectionPool):
    """redis-py's pool, waiting up to ``wait_s`` for a connection when all are in use
    instead of raising ``MaxConnectionsError`` (which the engine would have to answer as
    Redis being down). redis-py's own ``BlockingConnectionPool`` does the same through an
    ``asyncio.Condition`` on every acquire and release: measured at +8.7k instructions per
    lead posted alone (``bench ingest --instructions``: 311.6k against 302.9k), where this
    costs the fast path a ``try`` and one check of an empty deque."""

    def __init__(self, *, wait_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_s = wait_s
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except MaxConnectionsError:
            pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        first = False
        while True:
            waiter = loop.create_future()
            if first:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0.0))
            except (TimeoutError, asyncio.CancelledError) as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_next()  # woken, then timed out or cancelled: the free
                    # connection's turn passes on, or a waiter behind would wait it out
                if isinstance(exc, TimeoutError):
                    raise RedisConnectionError(
                        f"no Redis connection free within {self.wait_s:g} s") from None
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                first = True  # a newcomer took it first: wait again, at the head of the line
            except BaseException:
                self._wake_next()  # e.g. cancelled waiting for the pool's lock
                raise

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        if self._waiters:
            self._wake_next()

    def _wake_next(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


# connections beyond the HTTP server's own limit: the in-process workers' Redis calls
# (the delivery worker keeps at most 32 in flight), the monitor, the billing API's reads
WORKERS_RESERVE = 64


def pool_size(max_http_connections: int) -> int:
    """The engine's Redis pool: one connection per HTTP connection it may serve at once
    (each request waits on at most one Redis call at a time; the batcher shares a Lua call
    among many), plus the workers' reserve."""
    return max_http_connections + WORKERS_RESERVE


def is_cluster(client: object) -> bool:
    """A Redis Cluster client (typed as Redis by :func:`connect`): commands over several
    tenants' keys must then be split per tenant, one slot each."""
    return isinstance(client, RedisCluster)


UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


MoneyObserver = Callable[[str, int], None]  # (ledger kind, signed micros)


class Store:
    def __init__(
        self, client: aioredis.Redis, lua: Scripts | None = None,
        observer: MoneyObserver | None = None,
        events_observer: Callable[[Any], None] | None = None,
    ) -> None:
        self.redis = client
        self.lua = lua or scripts()
        self.observer = observer
        self.events_observer = events_observer  # adjust.lua's emitted events, for metrics

    async def _run(self, script: Any, tenant: str, args: list[Any]) -> Any:
        try:
            return await script(self.redis, [keys.tenant_prefix(tenant)], args)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc

    async def load_scripts(self) -> None:
        await self.lua.load(self.redis)

    async def adjust(
        self,
        tenant: str,
        account: str,
        delta: int,
        kind: str,
        *,
        op_id: str = "",
        ttl_s: int = OP_TTL_S,
        enforce_floor: bool = True,
        extra: dict[str, str] | None = None,
        refuse_closed: bool = False,
        event: dict[str, str] | None = None,
    ) -> AdjustResult:
        """One idempotent balance change with its ledger entry (see lua/adjust.lua).
        ``refuse_closed``: a closed account is refused (``closed``) even for a credit.
        ``event``: an event this change completes (its ``type`` and extra fields; the
        script adds ``account``, ``balance`` after the change and ``ts``), emitted in the
        same step, and not on a replay."""
        flat = [x for kv in (extra or {}).items() for x in kv]
        notice = b""
        if event is not None:
            rest = {k: v for k, v in event.items() if k != "type"}
            notice = _enc.encode([event["type"], *(x for kv in rest.items() for x in kv)])
        raw = await self._run(
            self.lua.adjust,
            tenant,
            [
                account,
                delta,
                kind,
                op_id,
                ttl_s,
                now_ms(),
                "1" if enforce_floor else "0",
                _enc.encode(flat),
                "1" if refuse_closed else "0",
                notice,
            ],
        )
        res = _adjust_dec.decode(raw)
        if not res.replay:
            if res.ok and self.observer is not None:
                self.observer(kind, delta)
            self._count_events(res.events)  # a refusal's: holds it released past expiry
        return res

    async def refund_sale(
        self, tenant: str, lead_id: str, buyer: str, reason: str, *, kind: str = "refund",
        user: str = "",
    ) -> SaleResult:
        """``user``: who asked (a buyer key's label), written as the ledger entries' user."""
        raw = await self._run(
            self.lua.refund,
            tenant,
            [lead_id, buyer, "refund", 0, reason, now_ms(), kind, WALLET, user],
        )
        res = _sale_dec.decode(raw)
        if res.ok and not res.replay:
            self._count_events(res.events)
            if self.observer is not None:
                self.observer(kind, int(res.price))
                sale, wallet = await self._sale_record(tenant, lead_id, buyer)
                fee = int(sale.get("f") or 0) if sale and wallet else 0
                if fee:  # the fee_refund ledger entry of the tenant's wallet
                    self.observer("fee_refund", fee)
        return res

    async def ping_hold(self, tenant: str, call: dict[str, Any]) -> PingHoldResult:
        """The holds and fees of one ping in one step (lua/ping_hold.lua; ``call`` is its
        ARGV[1] object)."""
        res = _hold_dec.decode(await self._run(self.lua.ping_hold, tenant, [_enc.encode(call)]))
        if not res.rp:
            self._count_events(res.e)
        return res

    async def ping_release(self, tenant: str, ping_id: str) -> int:
        """Release the open holds of a ping (lua/ping_release.lua); how many were open."""
        return int(await self._run(self.lua.ping_release, tenant, [ping_id, now_ms()]))

    async def ping_sweep(self, tenant: str, *, now: int | None = None, limit: int = 256
                         ) -> tuple[int, int]:
        """One bounded batch of the expiry sweep (lua/ping_sweep.lua): (pings, holds)
        released. ``now``: the clock (tests inject one)."""
        raw = await self._run(self.lua.ping_sweep, tenant,
                              [now_ms() if now is None else now, limit])
        return int(raw[0]), int(raw[1])

    async def arm_recharge(self, tenant: str, account: str, threshold: int, armed: bool
                           ) -> bool:
        """Set the account's auto-recharge flags and apply its minimum-balance rule in one
        step (lua/arm_recharge.lua: a min_balance pause lifted or made); False: no such
        account."""
        raw = await self._run(self.lua.arm_recharge, tenant,
                              [account, threshold, "1" if armed else "0", now_ms()])
        res = _arm_dec.decode(raw)
        self._count_events(res.events)
        return res.ok

    async def set_alert(self, tenant: str, account: str, own: int | None, default: int, *,
                        ref: str) -> bool:
        """The account's own balance alert threshold (``None``: the config's ``default`` back
        in force), applied to its balance in the same step (lua/alert_set.lua:
        ``balance_alert`` with ``ref`` when the new threshold lies above the balance). A
        reload keeps an own threshold. False: no such account."""
        raw = await self._run(self.lua.alert_set, tenant,
                              [account, "" if own is None else own, default, now_ms(), ref])
        res = _arm_dec.decode(raw)
        self._count_events(res.events)
        return res.ok

    def _count_events(self, events: Any) -> None:
        """Events a script emitted (``[type, count, ...]``), to ``events_observer``."""
        if self.events_observer is not None and events:
            self.events_observer(events)

    async def _sale_record(self, tenant: str, lead_id: str, buyer: str) -> tuple[Any, bool]:
        """For the money observer only (refund.lua returns the sale's price, neither the
        outbound fee it credits back nor a reprice's old price): the sale record (decoded;
        None if absent) and whether the tenant's wallet exists (refund.lua credits the fee
        back only then). ``(None, False)`` when Redis cannot be read: the money moved
        anyway, only its count is lost."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.lead(tenant, lead_id), buyer)
        pipe.exists(keys.acct(tenant, WALLET))
        try:
            raw, wallet = await pipe.execute()
        except UNAVAILABLE as exc:
            log.warning("sale %s/%s of tenant %s not counted in metrics: %s", lead_id, buyer,
                        tenant, type(exc).__name__)
            return None, False
        return (msgspec.json.decode(raw) if raw else None), bool(wallet)

    async def reprice_sale(
        self, tenant: str, lead_id: str, buyer: str, price: int, reason: str = "realtime price"
    ) -> SaleResult:
        before = 0
        if self.observer is not None:  # refund.lua returns the new price, not the delta
            sale, _ = await self._sale_record(tenant, lead_id, buyer)
            before = int(sale.get("p") or 0) if sale else 0
        raw = await self._run(
            self.lua.refund,
            tenant,
            [lead_id, buyer, "reprice", price, reason, now_ms(), "reprice", WALLET],
        )
        res = _sale_dec.decode(raw)
        if res.ok and not res.replay:
            self._count_events(res.events)
        # a sale is repriced once (later calls are replays); only a reprice changes its
        # price, so the price read before is the one this reprice moved from
        if self.observer is not None and res.ok and not res.replay and before:
            delta = before - int(res.price)
            if delta:
                self.observer("reprice", delta)
        return res

    async def apply_account_settings(
        self,
        tenant: str,
        account: str,
        *,
        opening: int,
        floor: int,
        alert: int,
        recharge_threshold: int,
        auto_recharge: bool,
        min_balance: int | None,
        mode: str,
    ) -> bool:
        """Create the account or update its settings, applying them to its state (see
        lua/account_settings.lua); its events go to ``events_observer``. True when created."""
        raw = await self._run(
            self.lua.account_settings,
            tenant,
            [
                account,
                opening,
                floor,
                alert,
                recharge_threshold,
                "1" if auto_recharge else "0",
                "" if min_balance is None else min_balance,
                mode,
                now_ms(),
            ],
        )
        created, events = raw
        if self.observer is not None and created and opening:
            self.observer("opening", opening)  # the opening ledger entry (once: created)
        self._count_events([e.decode() if isinstance(e, bytes) else e for e in events])
        return bool(created)

    async def stream_range(
        self, key: str, start: str = "-", end: str = "+", count: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """XRANGE with entries decoded to str (redis-py returns loosely typed bytes)."""
        rows: Any = await self.redis.xrange(key, start, end, count=count)
        return _decode_entries(rows)

    async def account(self, tenant: str, account: str) -> AccountState | None:
        v: Any = await self.redis.hmget(
            keys.acct(tenant, account),
            ["bal", "floor", "alert", "rthr", "ar", "minb", "mode", "paused", "closed", "held",
             "ualert"],
        )
        if v[0] is None:
            return None
        s = [x.decode() if x is not None else "" for x in v]
        return AccountState(
            id=account,
            balance=int(s[0]),
            floor=int(s[1]) if s[1] else DEFAULT_FLOOR,
            alert=int(s[2] or 0),
            recharge_threshold=int(s[3] or 0),
            auto_recharge=s[4] == "1",
            min_balance=int(s[5]) if s[5] else None,
            mode=s[6] or "manual",
            paused=s[7],
            closed=s[8] == "1",
            held=int(s[9] or 0),
            own_alert=bool(s[10]),
        )

    async def buyer_flags(self, tenant: str, buyers: list[str]) -> list[bool]:
        """Whether each buyer is paused by hand (buyer_pause.lua's flag), in order."""
        if not buyers:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in buyers:
                pipe.hget(keys.buyer(tenant, b), "paused")
            flags = await pipe.execute()
        return [bool(f) for f in flags]

    async def account_ids(self, tenant: str) -> list[str]:
        members: Any = await self.redis.smembers(keys.accounts(tenant))
        return sorted(m.decode() for m in members)

    async def set_account_flag(self, tenant: str, account: str, field: str, value: str) -> None:
        """Set ``paused`` or ``closed`` on an account (used for manual pause and closing)."""
        await self.redis.hset(keys.acct(tenant, account), field, value)

    async def ledger_tail(
        self, tenant: str, account: str, *, before: str = "+", limit: int | None = None,
        scan: int | None = None, kinds: Sequence[str] | None = None, page: int = LEDGER_PAGE,
    ) -> LedgerTail:
        """The account's entries still in the tenant's ledger stream (the ones the ledger
        worker has not archived and trimmed yet), newest first, older than ``before``
        (an entry id, exclusive; "+" for the newest): at most ``limit`` of them, only
        ``kinds`` if given, reading at most ``scan`` stream entries of any account.

        Every balance change is written to the tenant's one stream, so an account's entries
        are picked out of it: only each entry's account field is decoded until it matches.
        The tail also tells where the read stopped (see :class:`LedgerTail`), which is where
        the SQL archive takes over (billing.archive.history)."""
        want, want_kinds = account.encode(), None if kinds is None else {
            k.encode() for k in kinds}
        found: list[tuple[str, dict[str, str]]] = []
        oldest, read = None, 0
        start = before if before == "+" else f"({before}"
        async with contextlib.aclosing(self.ledger_pages(tenant, start, page=page,
                                                         scan=scan)) as pages:
            async for rows in pages:
                read += len(rows)
                for raw_id, f in rows:
                    oldest = raw_id.decode()
                    if f.get(b"account") == want and (
                            want_kinds is None or f.get(b"kind") in want_kinds):
                        found.append((oldest, {k.decode(): v.decode() for k, v in f.items()}))
                        if limit is not None and len(found) == limit:
                            return LedgerTail(found, oldest, complete=False)
        # the pages ended: at the stream's oldest entry, or at the scan cap
        return LedgerTail(found, oldest, complete=scan is None or read < scan)

    async def ledger_pages(self, tenant: str, end: str = "+", *, page: int = LEDGER_PAGE,
                           scan: int | None = None) -> AsyncGenerator[Any, None]:
        """The tenant's ledger stream newest first, from ``end`` (an XREVRANGE end: "+", an
        entry id, or "(id" to leave that one out), a page of raw entries at a time, at most
        ``scan`` entries in all; it ends after the stream's oldest entry (a short page)."""
        read = 0
        while scan is None or read < scan:
            count = page if scan is None else min(page, scan - read)
            rows: Any = await self.redis.xrevrange(keys.ledger(tenant), end, "-", count=count)
            if rows:
                yield rows
            read += len(rows)
            if len(rows) < count:
                return
            end = "(" + rows[-1][0].decode()

    async def ledger_page(
        self, tenant: str, account: str, *, before: str = "+", limit: int = 100
    ) -> list[tuple[str, dict[str, str]]]:
        """The account's unarchived entries, newest first; pass the last id seen as
        ``before`` (exclusive) for the next page."""
        return (await self.ledger_tail(tenant, account, before=before, limit=limit)).entries

    async def ledger_sum(self, tenant: str, account: str) -> tuple[int, int]:
        """(sum of deltas, entries) of the account's unarchived ledger entries (the whole
        ledger when nothing was archived; ``leadflow reconcile`` adds the archive's part)."""
        entries = (await self.ledger_tail(tenant, account)).entries
        return sum(int(f["delta"]) for _, f in entries), len(entries)


class LedgerTail(NamedTuple):
    """An account's entries read from its tenant's ledger stream, newest first; ``oldest``:
    the oldest stream entry read, of any account (None: none was); ``complete``: the read
    reached the stream's oldest entry, so every older entry of the account was archived
    and trimmed (the ledger worker trims only after its SQL commit)."""

    entries: list[tuple[str, dict[str, str]]]
    oldest: str | None
    complete: bool


def _decode_entries(rows: Any) -> list[tuple[str, dict[str, str]]]:
    return [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in rows]

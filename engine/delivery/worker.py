"""``leadflow worker deliver``: delivery jobs from Redis Streams to buyers' webhooks.

Reading (:class:`engine.store.streams.StreamConsumer`): every worker process joins the consumer
group ``delivery`` of each tenant's ``keys.deliveries`` stream and reads with ``XREADGROUP
COUNT n BLOCK ms`` (one read over every tenant on one Redis; one read loop per tenant on a
cluster, where each tenant is its own slot); several workers share the work. An entry
stays pending until its outcome is recorded; ``XAUTOCLAIM`` hands entries idle longer than
``claim_idle_ms`` (a crashed worker's) to a live worker, which sends them again with the
same ``webhook-id``.

Retries never block a worker: a retryable failure (timeout, network error, 5xx, 429)
moves the job, with its attempt count, into the per-tenant ZSET ``keys.retries`` (score =
due time) and acks the stream entry, in one MULTI. Every 50 ms a small Lua script moves the
jobs that are due back onto the stream (ZREM + XADD, atomically), so a retry is read,
claimed and crash-recovered like any new job. A job whose buyer's breaker is open is
deferred the same way, to the half-open time, without counting an attempt.

Giving up: after ``max_attempts`` attempts, or when the next try would be later than
``max_age_s`` after the sale, the job goes to the dead-letter stream
``keys.dead_letter(tenant, "deliveries")``, a ``delivery_failed`` event goes to
``keys.events`` and the sale is refunded (a lead the buyer never received is not paid for).

Outcome: the decision is written to ``keys.dstate`` (+ the delivery log), then the money
effect (refund for DUPLICATED/REJECTED/FAILED, reprice for an accepted real-time price),
then ``XACK`` + ``XDEL``. A job found already decided replays only the idempotent money
effect and acks. The first decision stands: one recorded meanwhile by another worker (that
took the entry over) is never overwritten, and this job's money effect is then skipped,
as are its dead letter and ``delivery_failed`` event when it was being given up on (they
are written in the same step as the decision, delivery_finish.lua).
While running, the worker refreshes the idle time of its in-flight entries (XCLAIM JUSTID
every quarter of ``claim_idle_ms``), so only a stalled worker's entries are taken over.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import redis.asyncio as aioredis

from engine.core import keys
from engine.core.config import Buyer, Config
from engine.core.constants import SOLD_MAXLEN
from engine.delivery import client, payload, record
from engine.delivery.breaker import Breaker, Breakers, BreakerState
from engine.delivery.client import Endpoint
from engine.delivery.record import DeliveryDecision, DeliveryEvent, Observer
from engine.delivery.retry import retry_delay_ms
from engine.store.store import Store, now_ms
from engine.store.streams import Batch, Reader, StreamConsumer

log = logging.getLogger("leadflow.delivery")

GROUP = "delivery"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Process-level knobs (per-buyer retry policy lives in the buyer's Delivery)."""

    group: str = GROUP
    count: int = 64  # XREADGROUP COUNT
    block_ms: int = 1_000  # XREADGROUP BLOCK (keep below the Redis socket timeout)
    max_inflight: int = 256  # jobs in flight per process
    claim_idle_ms: int = 60_000  # XAUTOCLAIM min idle: longer than any buyer timeout
    claim_every_ms: int = 5_000
    requeue_batch: int = 500  # due retries moved per pass and tenant
    requeue_every_ms: int = 50  # run loop: due retries are moved at most this often
    connector_limit: int = 512  # TCPConnector(limit=...)
    limit_per_host: int = 64  # TCPConnector(limit_per_host=...)
    excerpt_chars: int = 256  # response excerpt kept in the delivery log
    redis_concurrency: int = 32  # Redis calls in flight; keep below the client's pool size


class Job(msgspec.Struct, frozen=True, gc=False):
    tenant: str
    entry_id: str
    raw: dict[bytes, bytes]  # the stream entry's fields, as read
    lead_id: str
    buyer: str
    campaign: str
    account: str
    price: int
    ts: int
    attempt: int  # attempts already made

    @property
    def fields(self) -> dict[str, str]:
        """The entry's fields decoded (retries and dead letters copy them). Never raises:
        a byte that is not UTF-8 becomes U+FFFD instead of failing the batch's commit."""
        return {k.decode(errors="replace"): v.decode(errors="replace")
                for k, v in self.raw.items()}


class _Sale(msgspec.Struct):
    s: str = ""  # "sold" | "refunded" (decide.lua / refund.lua sale record)


_sale_dec = msgspec.json.Decoder(_Sale)


class _Target:
    """One buyer endpoint in this process: its request builder and rules, its breaker, and
    the queue of requests waiting for one of its lanes (see ``DeliveryWorker._enqueue``)."""

    __slots__ = ("breaker", "ep", "queue", "running")

    def __init__(self, ep: Endpoint, breaker: Breaker) -> None:
        self.ep, self.breaker = ep, breaker
        self.queue: collections.deque[_Send] = collections.deque()
        self.running = 0  # lanes sending the queue


class _Send(msgspec.Struct, frozen=True, gc=False):
    """A job ready for its request, waiting for a connection slot of its endpoint."""

    job: Job
    target: _Target
    lead: bytes  # the stored JSON object of the lead's fields
    expires: int
    out: _Batch


class _Batch:
    """What a batch of jobs writes: pipeline ops per tenant, then money effects.

    Its requests are counted rather than each given a future: the lanes count them down
    and wake the batch once, when the last one is in (``sent``); a batch that stopped
    waiting (``dropped``) has its queued requests skipped."""

    __slots__ = ("common", "dropped", "events", "jobs", "left", "money", "ops", "sent")

    def __init__(self, jobs: Sequence[Job] = ()) -> None:
        self.jobs = jobs
        self.ops: dict[str, list[Callable[[Any], None]]] = {}  # rare: retries, dead letters
        self.common: dict[str, dict[str, list[Any]]] = {}  # decisions, logs, acks (Lua)
        self.money: list[tuple[Job, DeliveryDecision]] = []
        self.events: list[DeliveryEvent] = []  # for the observer, told once per batch
        self.left = 0
        self.sent: asyncio.Future[None] | None = None
        self.dropped = False

    def one_sent(self) -> None:
        self.left -= 1
        if self.left == 0 and self.sent is not None and not self.sent.done():
            self.sent.set_result(None)

    async def wait_sent(self) -> None:
        if self.left > 0:
            self.sent = asyncio.get_running_loop().create_future()
            await self.sent

    def add(self, tenant: str, op: Callable[[Any], None]) -> None:
        self.ops.setdefault(tenant, []).append(op)

    def record(self, job: Job, decision: str, entry: bytes, *, ack: bool,
               dead: tuple[list[str], list[str]] | None = None) -> None:
        """A job's decision (JSON) and log entry, its dead letter and delivery_failed event
        when given up on, and its ack unless a money effect must land first
        (delivery_finish.lua writes them: a dead letter only with its decision)."""
        c = self.common.get(job.tenant)
        if c is None:
            c = self.common[job.tenant] = {"j": [], "a": [], "jobs": [], "dead": []}
        c["j"].append((job.lead_id, job.buyer, decision, entry.decode(), *(dead or ())))
        c["jobs"].append(job)  # not sent: maps delivery_finish.lua's row numbers back
        if dead is not None:
            c["dead"].append(len(c["j"]))  # its row number, as the script counts them
        if ack:
            c["a"].append(done(job))


def done(job: Job) -> tuple[str, str, str]:
    """A job to settle and ack, as delivery_finish.lua's ``a`` takes it."""
    return (job.entry_id, job.lead_id, job.buyer)


def _dead_letter(job: Job, reason: str, *, attempts: int, status: int, now: int
                 ) -> tuple[list[str], list[str]]:
    """A given-up job's dead-letter entry (the job's own fields and why) and its
    delivery_failed event, as flat field lists for delivery_finish.lua."""
    entry = {**job.fields, "attempts": str(attempts), "reason": reason,
             "last_status": str(status), "failed_ts": str(now), "entry": job.entry_id}
    event = {"type": "delivery_failed", "account": job.account, "lead_id": job.lead_id,
             "buyer": job.buyer, "campaign": job.campaign, "reason": reason,
             "attempts": str(attempts), "ts": str(now)}
    return ([x for kv in entry.items() for x in kv], [x for kv in event.items() for x in kv])


def _job(tenant: str, entry_id: str, raw: dict[bytes, bytes]) -> Job | None:
    """The job of a stream entry; None when malformed."""
    get = raw.get  # decode only what every job needs: most never retry
    try:
        # the lead goes to the buyer as these very bytes (engine.delivery.payload), so it
        # must be what the engine writes: a JSON object of strings
        payload.stored_lead.decode(get(b"lead", b"{}"))
        return Job(tenant, entry_id, raw, raw[b"lead_id"].decode(), raw[b"buyer"].decode(),
                   get(b"campaign", b"").decode(), get(b"account", b"").decode(),
                   int(get(b"price") or 0), int(get(b"ts") or 0), int(get(b"attempt") or 0))
    except (KeyError, ValueError):  # ValueError: also bad UTF-8 and msgspec.DecodeError
        return None


class DeliveryWorker:
    """One worker process's delivery loop over some tenants. See the module docs."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        *,
        tenants: Sequence[str],
        consumer: str,
        options: WorkerOptions | None = None,
        observer: Observer | None = None,
        clock: Callable[[], int] | None = None,
        session: aiohttp.ClientSession | None = None,
        config: Callable[[], Config] | None = None,
    ) -> None:
        self.store = store
        self.redis: aioredis.Redis = store.redis
        self.tenants = list(tenants)
        self.consumer = consumer
        self.opts = options or WorkerOptions()
        self.observer = observer
        self.clock = clock or now_ms
        self.breakers = Breakers(self.redis, lua=store.lua, events_observer=self._count_events)
        # the config in force (a reload swaps it): each batch resolves its buyers against
        # the latest one, also a batch read just before the reload
        self._config = config or (lambda: cfg)
        self._cfg = cfg
        self._buyers: dict[tuple[str, str], Buyer] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._use(cfg)
        self._lane_tasks: set[asyncio.Task[None]] = set()
        # the tenants' delivery streams, read by one XREADGROUP on one Redis, one per call
        # on a cluster (each tenant's keys are their own slot), each reader by its own loop
        # in run(); claims leave out the entries of the batches in flight here
        self.stream = StreamConsumer(
            self.redis, self.opts.group, consumer,
            {keys.deliveries(t): t for t in self.tenants}, count=self.opts.count,
            block_ms=self.opts.block_ms, claim_idle_ms=self.opts.claim_idle_ms,
            claim_every_ms=self.opts.claim_every_ms, held=self._inflight_entries,
            clock=self.clock)
        self._requeued: dict[Reader, int] = {}  # when each reader last moved due retries
        self._inflight = 0  # jobs read and not yet finished (run)
        # bookkeeping scripts (engine/store/lua/delivery_*.lua), from the store's registry
        self._lua = store.lua
        # the process's client session when the service shares its own (one per process);
        # otherwise start() opens one and close() closes it
        self._session: aiohttp.ClientSession | None = session
        self._own_session = False
        self._batches: set[_Batch] = set()  # in flight (their jobs are not claimed again)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rsem = asyncio.Semaphore(self.opts.redis_concurrency)
        self._room = asyncio.Event()
        self._room.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.stream.ensure()
        if self._session is None:
            self._session = client.new_session(
                limit=self.opts.connector_limit, limit_per_host=self.opts.limit_per_host)
            self._own_session = True

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._lane_tasks):  # requests of batches no one waits for
            task.cancel()
        if self._lane_tasks:
            await asyncio.gather(*self._lane_tasks, return_exceptions=True)
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session, self._own_session = None, False

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "call start() first"
        return self._session

    def _enqueue(self, send: _Send) -> None:
        """Queue one request of an endpoint; at most ``limit_per_host`` lanes per endpoint
        send its queue, each holding one connection slot, so a request's timeout starts only
        once it has a slot. Its batch counts it as sent once its outcome is in the batch."""
        target = send.target
        send.out.left += 1
        target.queue.append(send)
        if target.running < self.opts.limit_per_host:
            target.running += 1
            task = asyncio.get_running_loop().create_task(self._lane(target))
            self._lane_tasks.add(task)
            task.add_done_callback(self._lane_tasks.discard)

    async def _lane(self, target: _Target) -> None:
        """Send ``target``'s queue, one request at a time. The request is awaited right here
        and its outcome handled synchronously (``_outcome``): one coroutine frame less on
        every resumption of every request."""
        q, ep, session = target.queue, target.ep, self.session
        excerpt_chars = self.opts.excerpt_chars
        try:
            while q:
                send = q.popleft()
                job = send.job
                try:
                    if not send.out.dropped:
                        att = await client.attempt(
                            session, ep, lead=send.lead, lead_id=job.lead_id,
                            campaign=job.campaign, price=job.price, excerpt_chars=excerpt_chars)
                        breaker_write = self._outcome(send, att)
                        if breaker_write is not None:
                            await breaker_write
                except Exception:
                    log.exception("delivery of %s to %s (tenant %s) failed; left pending",
                                  job.lead_id, job.buyer, job.tenant)
                finally:
                    send.out.one_sent()
        finally:
            target.running -= 1

    def _use(self, cfg: Config) -> None:
        """Buyers and endpoints of ``cfg`` (lanes already sending finish on the old ones)."""
        self._cfg = cfg
        self._buyers = {(b.tenant, b.id): b for b in cfg.buyers if b.tenant in self.tenants}
        self._targets = {}

    def endpoint(self, tenant: str, buyer: str) -> Endpoint | Buyer | None:
        """The buyer's Endpoint; the Buyer when it has no webhook; None when unknown."""
        target = self._target(tenant, buyer)
        return target.ep if isinstance(target, _Target) else target

    def _target(self, tenant: str, buyer: str) -> _Target | Buyer | None:
        target = self._targets.get((tenant, buyer))
        if target is not None:
            return target
        b = self._buyers.get((tenant, buyer))
        if b is None or b.delivery is None:
            return b
        d = b.delivery
        br = self.breakers.get(tenant, buyer, failures=d.breaker_failures,
                               cooldown_s=d.breaker_cooldown_s)
        target = self._targets[(tenant, buyer)] = _Target(Endpoint(b), br)
        return target

    # -- reading -------------------------------------------------------------------------

    async def requeue_due(self, tenants: Iterable[str] | None = None) -> int:
        """Move due retries of every tenant (of ``tenants``) back onto its stream."""
        moved, now = 0, self.clock()
        for t in self.tenants if tenants is None else tenants:
            moved += int(await self._lua.delivery_requeue(
                self.redis, [keys.retries(t), keys.deliveries(t)], [now, self.opts.requeue_batch]))
        return moved

    async def _read(self, count: int, block_ms: int | None, reader: Reader | None = None
                    ) -> list[Job]:
        """New entries of ``reader``'s streams (default: every reader, one after another)."""
        return await self._jobs(await self.stream.read(count, block_ms, reader))

    async def _claim(self, count: int, reader: Reader | None = None) -> list[Job]:
        """Entries idle longer than claim_idle_ms (their worker died) become ours."""
        return await self._jobs(await self.stream.claim(count, reader))

    async def _jobs(self, batches: Iterable[Batch]) -> list[Job]:
        jobs: list[Job] = []
        for b in batches:
            bad = list(b.gone)  # deleted while pending (Redis 6.2 claims those)
            for entry_id, raw in b.entries:
                job = _job(b.tenant, entry_id, raw)
                if job is None:  # malformed
                    bad.append(entry_id)
                else:
                    jobs.append(job)
            if bad:
                log.warning("tenant %s: dropping %d empty/malformed delivery entries",
                            b.tenant, len(bad))
                await self.stream.ack(b.stream, *bad, delete=True)
        await self._hand_on(jobs)
        return jobs

    async def _hand_on(self, jobs: Sequence[Job]) -> None:
        """New sales (a job's first read: attempt 0) to the tenant's ``keys.sold`` stream,
        for the lead archive (billing.leads): the job is deleted once delivered. Before
        anything else is done with them, so a job is never delivered without being handed
        on; one read twice (claimed after a crash) is handed on twice, which the archive's
        upsert takes once."""
        new = [j for j in jobs if j.attempt == 0]
        if not new:
            return
        async with self._rsem, self.redis.pipeline(transaction=False) as pipe:
            for j in new:
                pipe.xadd(keys.sold(j.tenant), j.raw,  # type: ignore[arg-type]
                          maxlen=SOLD_MAXLEN, approximate=True)
            await pipe.execute()

    # -- processing ----------------------------------------------------------------------

    async def process_once(self, *, block_ms: int | None = None, claim: bool = True) -> int:
        """One pass: requeue due retries, claim idle entries, read new ones, process them
        all and wait for them. Returns the number of jobs handled. (Tests and tools.)"""
        await self.start()
        await self.requeue_due()
        jobs = await self._claim(self.opts.count) if claim else []
        jobs += await self._read(self.opts.count, block_ms)
        await self.handle_batch(jobs)
        return len(jobs)

    async def handle_batch(self, jobs: Sequence[Job]) -> None:
        """Deliver a batch: one read of the sales/decisions, the requests concurrently (in
        the endpoints' lanes), then one Lua call per tenant with every decision, log entry and
        ack of the batch (in a MULTI with its retries and dead letters, if any), the money
        effects, and one MULTI acking the jobs that had one."""
        if not jobs:
            return
        if self._session is None:  # lanes need it; run() and process_once() start first
            await self.start()
        pre = await self._prechecked(jobs)
        if (cfg := self._config()) is not self._cfg:
            self._use(cfg)
        out = _Batch(jobs)
        self._batches.add(out)
        try:
            now = self.clock()
            for j, sale, state in zip(jobs, pre[0::2], pre[1::2], strict=True):
                try:
                    send = self._handle(j, sale or None, state or None, out, now)
                except Exception:
                    log.exception("delivery of %s to %s (tenant %s) failed; left pending",
                                  j.lead_id, j.buyer, j.tenant)
                    continue
                if send is not None:
                    self._enqueue(send)
            await out.wait_sent()
            record.notify(self.observer, out.events)
            await self._commit(out)
        finally:
            out.dropped = True  # if cancelled: its lanes skip what is still queued
            self._batches.discard(out)

    def _inflight_entries(self) -> dict[str, list[Any]]:
        """Entry ids (str) of the jobs in flight here, per tenant (entry ids are unique per
        stream only). Built when a claim finds entries and for the keepalive: every few
        seconds. (``Any``: redis-py's xclaim wants a list of its wider id type.)"""
        ids: dict[str, list[Any]] = {}
        for b in self._batches:
            for j in b.jobs:
                ids.setdefault(j.tenant, []).append(j.entry_id)
        return ids

    async def _prechecked(self, jobs: Sequence[Job]) -> list[Any]:
        """Each job's sale record and recorded decision (``b""`` when absent), flat and in
        job order: one delivery_precheck.lua call per tenant (a batch rarely has two)."""
        tenants = {j.tenant for j in jobs}
        if len(tenants) > 1:  # one call per tenant, then back into job order (by position:
            out: list[Any] = [b""] * (2 * len(jobs))  # entry ids repeat across streams)
            for t in tenants:
                at = [i for i, j in enumerate(jobs) if j.tenant == t]
                flat = await self._prechecked([jobs[i] for i in at])
                for n, i in enumerate(at):
                    out[2 * i: 2 * i + 2] = flat[2 * n: 2 * n + 2]
            return out
        async with self._rsem:
            raw: list[Any] = await self._lua.delivery_precheck(
                self.redis, [keys.tenant_prefix(jobs[0].tenant)],
                [msgspec.json.encode([[j.lead_id, j.buyer] for j in jobs])])
        return raw

    async def _commit(self, out: _Batch) -> None:
        kept: set[tuple[str, str, str]] = set()  # (tenant, lead, buyer) decided elsewhere
        for tenant in out.ops.keys() | out.common.keys():
            common = out.common.get(tenant)
            if tenant not in out.ops:  # the common case: one Lua call, atomic by itself
                async with self._rsem:
                    rows = await self._finish_rows(tenant, common) if common else []
            else:
                async with self.redis.pipeline(transaction=True) as pipe, self._rsem:
                    if common:  # first: its result is the first of the MULTI's
                        await self._lua.delivery_finish.queue(
                            pipe, [keys.tenant_prefix(tenant)], [self._finish_arg(common)])
                    for op in out.ops.get(tenant, []):
                        op(pipe)
                    results = await pipe.execute()
                rows = results[0] if common else []
            jobs = common["jobs"] if common else []  # the rows delivery_finish.lua names
            if common:  # the dead letters written: those whose decision was not kept
                self._count_failed(len(set(common["dead"]) - {int(i) for i in rows}))
            for i in rows:
                job = jobs[int(i) - 1]
                kept.add((tenant, job.lead_id, job.buyer))
                log.warning("delivery of %s to %s (tenant %s) was decided by another "
                            "worker first; its decision and money effect stand",
                            job.lead_id, job.buyer, tenant)
        if kept:  # their money effect is the other decision's, already applied: only ack
            theirs = [j for j, _ in out.money if (j.tenant, j.lead_id, j.buyer) in kept]
            out.money = [(j, d) for j, d in out.money
                         if (j.tenant, j.lead_id, j.buyer) not in kept]
            await self._ack_all(theirs)
        if not out.money:
            return

        async def money(job: Job, dec: DeliveryDecision) -> Job | None:
            try:
                async with self._rsem:
                    await record.apply_money(self.store, job.tenant, job.lead_id, job.buyer,
                                             dec, sale_price=job.price)
            except Exception:  # left pending: a later claim replays it from the decision
                log.exception("money effect of %s/%s (tenant %s) failed; left pending",
                              job.lead_id, job.buyer, job.tenant)
                return None
            return job

        finished = [j for j in await asyncio.gather(*(money(j, d) for j, d in out.money)) if j]
        await self._ack_all(finished)

    async def _finish_rows(self, tenant: str, common: dict[str, list[Any]]) -> Any:
        """delivery_finish.lua for a tenant's rows. Returns the row numbers whose delivery
        another worker had decided already."""
        return await self._lua.delivery_finish(self.redis, [keys.tenant_prefix(tenant)],
                                               [self._finish_arg(common)])

    def _finish_arg(self, common: dict[str, list[Any]]) -> bytes:
        return record.finish_arg(common["j"], common["a"], self.opts.group)

    async def _ack_all(self, jobs: Sequence[Job]) -> None:
        """Jobs whose money effect is applied: settled and acked, one delivery_finish.lua
        call per tenant (no rows)."""
        for tenant in {j.tenant for j in jobs}:
            async with self._rsem:
                await self._lua.delivery_finish(
                    self.redis, [keys.tenant_prefix(tenant)],
                    [record.finish_arg((), [done(j) for j in jobs if j.tenant == tenant],
                                       self.opts.group)])

    def _handle(
        self, job: Job, sale_raw: bytes | None, state_raw: bytes | None, out: _Batch, now: int
    ) -> _Send | None:
        """Everything of a job up to its request; the request to send, if any."""
        prior = record.decode_decision(state_raw)
        if prior is not None:
            if prior.o == record.SYNC and prior.u > now:
                self._defer(out, job, prior.u, "sync attempt in progress")
                return None
            if prior.o != record.SYNC:  # decided before: replay the money effect, ack
                out.money.append((job, prior))
                return None
        if sale_raw is None:
            self._give_up(out, job, "unknown sale (expired or never recorded)", refund=False)
            return None
        if _sale_dec.decode(sale_raw).s == "refunded":
            self._finish(out, job,
                         DeliveryDecision(record.REJECTED, "sale refunded before delivery"),
                         result="skipped")
            return None
        target = self._target(job.tenant, job.buyer)
        if target is None:
            self._give_up(out, job, "buyer not configured")
            return None
        if isinstance(target, Buyer):  # no webhook: the lead is delivered by being sold
            self._finish(out, job, DeliveryDecision(record.ACCEPTED, "no webhook configured"))
            return None
        return self._deliver(out, job, target, now)

    def _deliver(self, out: _Batch, job: Job, target: _Target, now: int) -> _Send | None:
        expires = job.ts + target.ep.delivery.max_age_s * 1_000
        if now >= expires:
            self._give_up(out, job, f"expired after {job.attempt} attempts")
            return None
        wait_until = target.breaker.allow(now)
        if wait_until:
            if wait_until >= expires:
                self._give_up(out, job, f"breaker open; expired after {job.attempt} attempts")
            else:
                self._defer(out, job, wait_until, "breaker open")
            return None
        return _Send(job, target, job.raw.get(b"lead", b"{}"), expires, out)

    def _outcome(self, send: _Send, att: client.DeliveryAttempt) -> Awaitable[Any] | None:
        """Record one attempt's outcome in its batch; returns the breaker's Redis write to
        await, when the attempt changed the breaker."""
        job, out, br = send.job, send.out, send.target.breaker
        n = job.attempt + 1
        v, kind = att.verdict, att.kind
        out.events.append(DeliveryEvent(
            job.tenant, job.buyer, job.lead_id, kind, att.latency_ms, att.status, n))
        if v is not None:
            self._finish(out, job, DeliveryDecision(v.outcome, v.reason, v.price), kind,
                         n, att.status, att.latency_ms, att.excerpt)
            if br.failures or br.state is not BreakerState.CLOSED:
                return self.breakers.success(job.tenant, job.buyer, br)
            return None
        now = self.clock()
        self._retry_or_give_up(send, att, n, now)
        return self.breakers.failure(job.tenant, job.buyer, br, now, notice={
            "account": job.account, "host": _host(send.target.ep.delivery.url),
            "error": att.error, "status": str(att.status)})

    def _retry_or_give_up(self, send: _Send, att: client.DeliveryAttempt, n: int, now: int) -> None:
        job, out, d = send.job, send.out, send.target.ep.delivery
        due = now + retry_delay_ms(n, d.retry_base_ms, d.retry_max_ms, att.retry_after_ms)
        if n >= d.max_attempts or due >= send.expires:
            self._give_up(out, job, f"gave up after {n} attempts: {att.error}", attempt=n,
                          status=att.status, ms=att.latency_ms, excerpt=att.excerpt)
            return
        fields = {**job.fields, "attempt": str(n)}
        entry = record.log_entry(
            buyer=job.buyer, attempt=n, ts=now, result="retry", status=att.status,
            ms=att.latency_ms, reason=f"{att.error}; retry at {due}", excerpt=att.excerpt)

        def op(pipe: Any) -> None:
            record.write_log(pipe, job.tenant, job.lead_id, job.buyer, entry)
            self._schedule(pipe, job, fields, due)

        out.add(job.tenant, op)

    def _schedule(self, pipe: Any, job: Job, fields: dict[str, str], due: int) -> None:
        member = msgspec.json.encode([x for kv in fields.items() for x in kv])
        pipe.zadd(keys.retries(job.tenant), {member: due})
        self._ack_in(pipe, job)

    def _defer(self, out: _Batch, job: Job, until: int, why: str) -> None:
        out.events.append(DeliveryEvent(job.tenant, job.buyer, job.lead_id, record.DEFERRED,
                                        0, 0, job.attempt))
        entry = record.log_entry(buyer=job.buyer, attempt=job.attempt, ts=self.clock(),
                                 result="deferred", reason=f"{why}; retry at {until}")

        def op(pipe: Any) -> None:
            record.write_log(pipe, job.tenant, job.lead_id, job.buyer, entry)
            self._schedule(pipe, job, job.fields, until)

        out.add(job.tenant, op)

    def _finish(
        self, out: _Batch, job: Job, dec: DeliveryDecision, result: str = "",
        attempt: int | None = None, status: int = 0, ms: int = 0, excerpt: str = "",
        *, dead: bool = False,
    ) -> None:
        """Record the decision and log, then the money effect, then ack (see module docs)."""
        money = dec.o in record.REFUNDED_OUTCOMES or (
            dec.o == record.ACCEPTED and dec.p is not None and dec.p != job.price)
        now = self.clock()
        n = job.attempt if attempt is None else attempt
        entry = record.log_entry(buyer=job.buyer, attempt=n, ts=now,
                                 result=result or dec.o.lower(), status=status, ms=ms,
                                 reason=dec.r, excerpt=excerpt)

        out.record(job, _decision_json(dec), entry, ack=not money,
                   dead=_dead_letter(job, dec.r, attempts=n, status=status, now=now)
                   if dead else None)
        if money:
            out.money.append((job, dec))

    def _give_up(
        self, out: _Batch, job: Job, reason: str, *, refund: bool = True,
        attempt: int | None = None, status: int = 0, ms: int = 0, excerpt: str = "",
    ) -> None:
        n = job.attempt if attempt is None else attempt
        out.events.append(DeliveryEvent(job.tenant, job.buyer, job.lead_id, record.DEAD_LETTER,
                                        0, status, n))
        log.warning("delivery of %s to %s (tenant %s) dead-lettered: %s", job.lead_id,
                    job.buyer, job.tenant, reason)
        dec = DeliveryDecision(record.FAILED if refund else "UNKNOWN", reason)
        self._finish(out, job, dec, result="failed", attempt=n, status=status, ms=ms,
                     excerpt=excerpt, dead=True)

    def _count_events(self, events: Any) -> None:
        """Events this worker emitted (``[type, count, ...]``: the breakers'
        webhook_failing), counted like the scripts' (leadflow_events_emitted_total)."""
        if self.store.events_observer is not None:
            self.store.events_observer(events)

    def _count_failed(self, n: int) -> None:
        """``n`` delivery_failed events were just appended (by delivery_finish.lua, with
        their decisions): counted like the scripts' events
        (leadflow_events_emitted_total), once each, after the write; a call that failed
        wrote and counts none."""
        if n and self.store.events_observer is not None:
            self.store.events_observer(["delivery_failed", n])

    def _ack_in(self, pipe: Any, job: Job) -> None:
        self.stream.ack_in(pipe, keys.deliveries(job.tenant), job.entry_id, delete=True)

    # -- the long-running loop -----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Read and deliver until ``stop`` is set, then finish the jobs in flight. One read
        loop per reader of the stream consumer (one in all on a single Redis), sharing
        ``max_inflight``; each pass moves due retries first, and a batch read or claimed
        is delivered by its own task."""
        await self.start()
        try:
            await asyncio.gather(
                self.stream.run(stop, self._take, room=functools.partial(self._room_left, stop),
                                before=self._requeue_if_due, on_error=_unavailable),
                self._keepalive(stop))
        finally:
            await self.close()

    async def _keepalive(self, stop: asyncio.Event) -> None:
        """Every quarter of ``claim_idle_ms``, reset the idle time of the entries in flight
        here (XCLAIM JUSTID to ourselves), so no other worker claims a job this one is
        still on: a job may wait in its endpoint's queue and then for a slow buyer for
        longer than the claim time, and would otherwise be sent twice."""
        every_s = max(self.opts.claim_idle_ms / 4_000, 0.01)
        while not stop.is_set():
            await _wait_any(stop, within_s=every_s)
            await self._touch_logged()
        # stopping (SIGTERM, or a config reload's successor already reading): the batches
        # in hand may still wait on slow buyers; their entries stay ours until they finish
        while self._tasks:
            await asyncio.wait(self._tasks, timeout=every_s)
            if self._tasks:
                await self._touch_logged()

    async def _touch_logged(self) -> None:
        try:
            await self.touch()
        except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            log.warning("delivery worker: could not refresh in-flight jobs (%s)",
                        type(exc).__name__)

    async def touch(self) -> int:
        """Reset the idle time of every entry in flight here; returns how many."""
        ids = self._inflight_entries()
        for tenant, entry_ids in ids.items():  # one call per tenant: one slot each
            await self.stream.touch(keys.deliveries(tenant), entry_ids)
        return sum(len(v) for v in ids.values())

    def _batch_done(self, n: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= n
        if self._inflight < self.opts.max_inflight:
            self._room.set()

    async def _room_left(self, stop: asyncio.Event) -> int:
        """Jobs a read may take now (``max_inflight`` shared by the readers): waits while
        there is no room; 0 once ``stop`` is set."""
        while self._inflight >= self.opts.max_inflight:
            if stop.is_set():
                return 0
            self._room.clear()
            await _wait_any(self._room, stop)
        return 0 if stop.is_set() else min(self.opts.count,
                                           self.opts.max_inflight - self._inflight)

    async def _requeue_if_due(self, reader: Reader) -> None:
        """Every ``requeue_every_ms`` at most: due retries of the reader's tenants back
        onto their streams."""
        if self.clock() - self._requeued.get(reader, 0) >= self.opts.requeue_every_ms:
            self._requeued[reader] = self.clock()
            await self.requeue_due(self.stream.streams[s] for s in reader)

    async def _take(self, reader: Reader, batches: list[Batch]) -> int:
        """Entries read or claimed: their jobs delivered by a task of their own."""
        jobs = await self._jobs(batches)
        if jobs:
            self._inflight += len(jobs)
            task = asyncio.create_task(self.handle_batch(jobs))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._batch_done, len(jobs)))
        return len(jobs)


@functools.lru_cache(maxsize=1024)
def _host(url: str) -> str:
    """A webhook's host (and port, when given) for the tenant's webhook_failing event:
    never its path, query or credentials, which may hold a token."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


@functools.lru_cache(maxsize=1024)
def _decision_json(dec: DeliveryDecision) -> str:
    """A decision as stored; most deliveries of a buyer share one (same verdict, reason)."""
    return record.encode_decision(dec).decode()


def _unavailable(reader: Reader, exc: Exception) -> None:
    log.warning("delivery worker: redis unavailable (%s); retrying", type(exc).__name__)


async def _wait_any(*events: asyncio.Event, within_s: float | None = None) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def run_delivery_worker(
    cfg: Config,
    store: Store,
    *,
    tenants: Sequence[str],
    consumer: str,
    stop: asyncio.Event,
    options: WorkerOptions | None = None,
    observer: Observer | None = None,
    session: aiohttp.ClientSession | None = None,
    config: Callable[[], Config] | None = None,
) -> None:
    """The ``leadflow worker deliver`` entry point: one worker until ``stop`` is set.
    ``session``: the process's client session (the service's), else the worker opens one;
    ``config``: the config in force, when a reload may swap it (else ``cfg``)."""
    worker = DeliveryWorker(cfg, store, tenants=tenants, consumer=consumer, options=options,
                            observer=observer, session=session, config=config)
    await worker.run(stop)

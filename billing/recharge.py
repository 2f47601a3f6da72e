"""Auto recharge: threshold mode from ``recharge_needed`` events, and schedule mode.

The worker reads the tenant events stream through the consumer group ``recharge``
(:class:`engine.store.streams.StreamConsumer`: XREADGROUP; several workers may run; XAUTOCLAIM
takes over entries a dead worker left pending). Events other than ``recharge_needed`` are
acknowledged and ignored. An entry is acknowledged only once its recharge ended (credited,
failed, refused by a cap, skipped); one that keeps failing for transient reasons goes,
after :data:`MAX_DELIVERIES`, to the dead-letter stream ``keys.dead_letter(tenant,
"events")`` with the error -- never dropped.

One recharge per account at a time (``keys.rlock``). The attempt id derives from the
event's stream id (``rc:<entry id>``), so a redelivered event resumes the same attempt; a
second, different event for the same low balance finds the balance already above the
threshold and is skipped. Daily caps (``max_per_day`` recharges started and
``max_amount_per_day`` credited, in the tenant's time zone) stop runaway loops; results are
published on the events stream as ``recharge_succeeded`` / ``recharge_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from billing.attempts import FINAL, CardTry, ChargeAttempt, Hook
from billing.context import BillingContext, RechargeObserver
from billing.funding import card_fee, fee_basis_points
from billing.policy import CENT, effective, threshold_flags, validate
from billing.stripe_gateway import StripeGateway
from engine.core import keys, money
from engine.core.billing_errors import (
    BillingError,
    Busy,
    InvalidRequest,
    NoPaymentMethod,
    PaymentTransient,
)
from engine.core.config import AutoRecharge, Config
from engine.core.errors import StoreUnavailable
from engine.store.store import UNAVAILABLE, Store, is_cluster, now_ms
from engine.store.streams import Batch, Reader, StreamConsumer

log = logging.getLogger("leadflow.billing.recharge")

GROUP = "recharge"
MAX_DELIVERIES = 5
STALE_MS = 5 * 60_000  # an unfinished charge attempt this long untouched is resumed
_DAY_MS = 86_400_000
_ar_enc = msgspec.json.Encoder()


# -- settings ------------------------------------------------------------------------------

async def settings(ctx: BillingContext, tenant: str, account: str) -> AutoRecharge:
    """The account's auto-recharge settings: the API's override, else the config's."""
    return await effective(ctx.store, tenant, account, ctx.settings(tenant, account).auto_recharge)


async def configure(ctx: BillingContext, tenant: str, account: str,
                    ar: AutoRecharge) -> AutoRecharge:
    """Validate and store settings; arm the account's recharge threshold in Redis."""
    ctx.settings(tenant, account)
    validate(ar)
    if ar.enabled:
        await ctx.methods.require(tenant, account)  # a card on file first (seed 000)
    if await ctx.store.account(tenant, account) is None:
        raise InvalidRequest(f"unknown account {account}", code="unknown_account")
    await ctx.store.redis.set(keys.autorecharge(tenant, account), _ar_enc.encode(ar))
    armed, rthr = threshold_flags(ar)
    # with the flags, in one step: a min_balance pause lifted when turned on (the rule
    # pauses below the minimum only without auto-recharge), made when turned off below it
    await ctx.store.arm_recharge(tenant, account, rthr, armed)
    await recharge_if_below(ctx, tenant, account, why="auto_recharge_enabled")
    return ar


async def recharge_if_below(ctx: BillingContext, tenant: str, account: str, *,
                            why: str) -> bool:
    """Ask for a recharge now when threshold auto-recharge is on and the balance is already
    below the threshold. decide.lua emits ``recharge_needed`` only when a debit *crosses*
    the threshold, so an account turned on while below it, or whose last recharge failed
    (declined card, daily cap) and then got a new card, would otherwise run down to its
    floor with no recharge. Called when auto-recharge is configured and when a card is
    added or activated; the worker's usual checks (balance, daily caps) apply."""
    ar = await settings(ctx, tenant, account)
    armed, threshold = threshold_flags(ar)
    state = await ctx.store.account(tenant, account)
    if not armed or state is None or state.closed or state.balance >= threshold:
        return False
    await _emit(ctx, tenant, "recharge_needed", account, threshold=threshold, reason=why)
    return True


# -- one recharge --------------------------------------------------------------------------

def _day(ctx: BillingContext, tenant: str, ms: int) -> str:
    tz = ZoneInfo(ctx.tenant(tenant).timezone)
    return dt.datetime.fromtimestamp(ms / 1000, tz).date().isoformat()


async def _emit(ctx: BillingContext, tenant: str, etype: str, account: str,
                **fields: str | int) -> None:
    state = await ctx.store.account(tenant, account)
    entry: dict[Any, Any] = {"type": etype, "account": account,
                             "balance": state.balance if state else 0, "ts": now_ms(), **fields}
    await ctx.store.redis.xadd(
        keys.events(tenant), entry,
        maxlen=1_000_000, approximate=True,
    )
    if ctx.store.events_observer is not None:
        ctx.store.events_observer([etype, 1])
    if ctx.observer is not None and etype == "recharge_failed" and fields.get(
            "reason") in _SKIPPED:
        ctx.observer("skipped", None)


async def _finish(ctx: BillingContext, a: ChargeAttempt, now: int) -> None:
    """Publish the outcome once (``notified``) and remember the last success."""
    if a.notified:
        return
    if a.state == "credited":
        await ctx.store.redis.hset(keys.rstate(a.tenant, a.account), "last_ms", str(now))
        await _emit(ctx, a.tenant, "recharge_succeeded", a.account, ref=a.id,
                    amount=a.amount, payment_intent=a.pi)
    else:
        await _emit(ctx, a.tenant, "recharge_failed", a.account, ref=a.id,
                    reason=a.error or a.state, amount=a.amount)
    a.notified = True
    await ctx.charger.save(a)
    if ctx.observer is not None:
        _observe(ctx.observer, a, now_ms())


# recharge_failed reasons that are no attempt at a card (a cap, nothing to charge)
_SKIPPED = frozenset({"daily_cap", "no_payment_method"})


def _observe(observer: RechargeObserver, a: ChargeAttempt, now: int) -> None:
    """An attempt's outcome, once (``_finish`` runs it after ``notified``): succeeded with
    its latency from the attempt's creation (the worker reading the crossing's event),
    declined (every card declined), authentication_required, or failed."""
    if a.state == "credited":
        observer("succeeded", max(now - a.created_ms, 0) / 1_000)
    elif a.state == "needs_customer":
        observer("authentication_required", None)
    elif a.cards and all(c.state == "declined" for c in a.cards):
        observer("declined", None)
    else:
        observer("failed", None)


async def recharge(ctx: BillingContext, tenant: str, account: str, *, attempt_id: str,
                   reason: str, now: int | None = None) -> ChargeAttempt | None:
    """Run (or resume) one recharge; None when skipped or refused by a cap.

    Raises Busy when another charge of the account is in flight, PaymentTransient when
    Stripe's answer is unknown (the attempt is kept and resumed by the next call).
    """
    now = now or now_ms()
    ar = await settings(ctx, tenant, account)
    async with ctx.charger.lock(tenant, account) as lock:
        a = await ctx.charger.load(tenant, attempt_id)
        resumed = None if a is not None else await _unfinished(ctx, tenant, account)
        if resumed is not None:
            a = await _run(ctx, resumed, lock, now)
            if a.state == "credited" or a.state not in FINAL:
                return a
            # the earlier attempt failed on its cards: this event (a card added since,
            # say) gets its own attempt; _start's balance check keeps it to one credit
        if a is None or resumed is not None:
            a = await _start(ctx, tenant, account, ar=ar, attempt_id=attempt_id, reason=reason,
                             now=now)
            if a is None:
                return None
        return await _run(ctx, a, lock, now)


async def _run(ctx: BillingContext, a: ChargeAttempt, lock: Any, now: int) -> ChargeAttempt:
    a = await ctx.charger.run(a, lock=lock)
    if a.state in ("credited", "failed", "needs_customer"):
        await _finish(ctx, a, now)
    return a


async def _unfinished(ctx: BillingContext, tenant: str, account: str) -> ChargeAttempt | None:
    """The account's last recharge attempt if it is not final: one open recharge per
    account. Its worker died before Stripe answered, or Stripe was busy or down; a new
    event (a manual credit re-armed the threshold and usage crossed it again) resumes it
    rather than start a second attempt, whose own idempotency key would charge again
    once the first is resumed."""
    last = await ctx.store.redis.hget(keys.rstate(tenant, account), "attempt")
    if not last:
        return None
    a = await ctx.charger.load(tenant, last.decode() if isinstance(last, bytes) else last)
    return a if a is not None and a.state not in FINAL else None


async def _start(ctx: BillingContext, tenant: str, account: str, *, ar: AutoRecharge,
                 attempt_id: str, reason: str, now: int) -> ChargeAttempt | None:
    if not ar.enabled:
        return None
    state = await ctx.store.account(tenant, account)
    if state is None or state.closed:
        return None
    if reason == "threshold" and (ar.every_days is not None
                                  or state.balance >= money.parse(ar.threshold)):
        return None  # schedule mode, or already recharged by an earlier event
    amount = money.parse(ar.amount)
    rkey = keys.rstate(tenant, account)
    day = _day(ctx, tenant, now)
    got = await ctx.store.redis.hmget(rkey, ["day", "n", "amount"])
    n, spent = (int(got[1] or 0), int(got[2] or 0)) if got[0] == day.encode() else (0, 0)
    if n + 1 > ar.max_per_day or spent + amount > money.parse(ar.max_amount_per_day):
        await _emit(ctx, tenant, "recharge_failed", account, ref=attempt_id,
                    reason="daily_cap", amount=amount)
        await ctx.store.redis.xadd(keys.charge_audit(tenant), {
            "attempt": attempt_id, "account": account, "purpose": "recharge",
            "step": "refused_daily_cap", "state": "refused", "amount": amount, "ts": now})
        return None
    try:
        customer, cards = await ctx.methods.require(tenant, account)
    except NoPaymentMethod:
        await _emit(ctx, tenant, "recharge_failed", account, ref=attempt_id,
                    reason="no_payment_method", amount=amount)
        return None
    fee = card_fee(amount, fee_basis_points(ctx, tenant))
    a, created = await ctx.charger.create(ChargeAttempt(
        id=attempt_id, tenant=tenant, account=account, purpose="recharge", amount=amount,
        fee=fee, customer=customer, cards=[CardTry(pm=c.id) for c in cards],
        extra={"process": f"auto_recharge:{reason}", "user": "system"},
    ))
    if created:
        await ctx.store.redis.hset(rkey, mapping={"day": day, "n": n + 1,
                                                  "amount": spent + amount, "attempt": a.id})
    return a


async def run_scheduled(ctx: BillingContext, *, now: int | None = None) -> list[ChargeAttempt]:
    """Schedule mode: recharge accounts whose last recharge is ``every_days`` old or more.

    Run it periodically (the worker does, every minute); at most one attempt per account
    and day (``sched:<account>:<day>``).
    """
    now = now or now_ms()
    done: list[ChargeAttempt] = []
    for tenant in ctx.config.tenants:
        for account in ctx.account_ids(tenant.id):
            ar = await settings(ctx, tenant.id, account)
            if not ar.enabled or ar.every_days is None:
                continue
            last = await ctx.store.redis.hget(keys.rstate(tenant.id, account), "last_ms")
            if last is not None and now - int(last) < ar.every_days * _DAY_MS:
                continue
            attempt_id = f"sched:{account}:{_day(ctx, tenant.id, now)}"
            with contextlib.suppress(Busy):
                a = await recharge(ctx, tenant.id, account, attempt_id=attempt_id,
                                   reason="schedule", now=now)
                if a is not None:
                    done.append(a)
    return done


# -- the events consumer -------------------------------------------------------------------

def _events(ctx: BillingContext, tenants: list[str], consumer: str, *,
            claim_idle_ms: int = 60_000, claim_every_ms: int = 5_000) -> StreamConsumer:
    """This consumer of the tenants' events streams (group ``recharge``): 50 entries a read,
    waiting up to a second for one; entries idle a minute (a dead worker's) claimed; one
    that failed :data:`MAX_DELIVERIES` times dead-lettered to the tenant's
    ``keys.dead_letter(tenant, "events")``."""
    return StreamConsumer(
        ctx.store.redis, GROUP, consumer, {keys.events(t): t for t in tenants}, count=50,
        block_ms=1_000, claim_idle_ms=claim_idle_ms, claim_every_ms=claim_every_ms,
        dead_letter=_dead_letter_key, max_deliveries=MAX_DELIVERIES)


def _dead_letter_key(tenant: str) -> str:
    return keys.dead_letter(tenant, "events")


async def _handle(ctx: BillingContext, events: StreamConsumer, tenant: str, entry_id: str,
                  fields: dict[bytes, bytes]) -> None:
    stream = keys.events(tenant)
    if fields.get(b"type") != b"recharge_needed":
        await events.ack(stream, entry_id)
        return
    account = fields.get(b"account", b"").decode()
    try:
        await recharge(ctx, tenant, account, attempt_id=f"rc:{entry_id}", reason="threshold")
    except (Busy, PaymentTransient, StoreUnavailable) as exc:
        # left pending: a claim hands it to a worker again, up to MAX_DELIVERIES times
        error = f"{type(exc).__name__}: {exc}"
        if await events.give_up(tenant, stream, entry_id, fields, error):
            log.error("recharge event %s dead-lettered: %s", entry_id, error)
        return
    except BillingError as exc:  # permanent: unknown account, bad config, ...
        error = f"{exc.code}: {exc}"
        await events.dead_letter(tenant, stream, entry_id, fields, error)
        log.error("recharge event %s dead-lettered: %s", entry_id, error)
        return
    await events.ack(stream, entry_id)


async def _process_tenant(ctx: BillingContext, tenant: str, *, consumer: str, count: int,
                          block_ms: int | None, claim_idle_ms: int) -> int:
    """Take over stale entries of one tenant, then read (and maybe wait for) new ones."""
    events = _events(ctx, [tenant], consumer, claim_idle_ms=claim_idle_ms)
    handled = 0
    for batch in await events.poll(count, block_ms):
        for entry_id, fields in batch.entries:
            await _handle(ctx, events, tenant, entry_id, fields)
            handled += 1
    return handled


async def process_once(
    cfg: Config, store: Store, gateway: StripeGateway, *, consumer: str, count: int = 50,
    block_ms: int | None = None, claim_idle_ms: int = 60_000, hook: Hook | None = None,
    ctx: BillingContext | None = None,
) -> int:
    """One pass over every tenant: take over stale entries, then read new ones.

    Returns how many entries were handled. Blocks only with a single tenant; the worker
    (run_recharge_worker) instead waits on every tenant's stream at once.
    """
    ctx = ctx or BillingContext(cfg, store, gateway, hook=hook)
    block = block_ms if len(cfg.tenants) == 1 else None
    handled = 0
    for tenant in cfg.tenants:
        handled += await _process_tenant(ctx, tenant.id, consumer=consumer, count=count,
                                         block_ms=block, claim_idle_ms=claim_idle_ms)
    return handled


def _failed(what: str, exc: Exception) -> None:
    """A failed pass or entry: logged; the caller tries again a second later (its
    entries stay pending, so nothing is lost)."""
    if isinstance(exc, (StoreUnavailable, PaymentTransient, *UNAVAILABLE)):
        log.warning("recharge worker (%s): %s; retrying", what, type(exc).__name__)
    else:  # the worker outlives one bad pass
        log.error("recharge worker (%s): pass failed", what, exc_info=exc)


async def _guarded(what: str, stop: asyncio.Event, step: Awaitable[Any]) -> None:
    """One entry's handling; a failure is logged and the next one waits a second."""
    try:
        await step
    except Exception as exc:  # noqa: BLE001 - logged by _failed; the worker goes on
        _failed(what, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _consume(ctx: BillingContext, events: StreamConsumer, stop: asyncio.Event) -> None:
    """Read the events until ``stop`` is set. One Redis: one blocking XREADGROUP over every
    tenant's stream (one connection, however many tenants), each entry handed to its
    tenant's queue, and one task per tenant handles its queue, so a slow payment of one
    tenant delays no other. A Redis Cluster: one reader per tenant (a read over several
    slots is refused), which handles what it read before it reads again and claims on
    every pass."""
    per_tenant = is_cluster(events.redis)
    queues: dict[str, asyncio.Queue[tuple[str, dict[bytes, bytes]] | None]] = (
        {} if per_tenant else {t: asyncio.Queue() for t in events.streams.values()})
    drains = [asyncio.create_task(_drain(ctx, events, t, q, stop)) for t, q in queues.items()]

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        taken = 0
        for batch in batches:
            q = queues.get(batch.tenant)
            for entry in batch.entries:
                if q is not None:
                    q.put_nowait(entry)
                else:
                    await _guarded(batch.tenant, stop, _handle(ctx, events, batch.tenant, *entry))
            taken += len(batch.entries)
        return taken

    def failed(reader: Reader, exc: Exception) -> None:
        _failed(events.streams[reader[0]] if per_tenant else "read", exc)

    try:
        await events.run(stop, handle, survive=(Exception,), on_error=failed)
    finally:
        for q in queues.values():
            q.put_nowait(None)  # drains finish what they hold, then stop
        await asyncio.gather(*drains)


async def _drain(ctx: BillingContext, events: StreamConsumer, tenant: str,
                 q: asyncio.Queue[tuple[str, dict[bytes, bytes]] | None],
                 stop: asyncio.Event) -> None:
    while (item := await q.get()) is not None:
        await _guarded(tenant, stop, _handle(ctx, events, tenant, *item))


async def resume_stale(ctx: BillingContext, *, idle_ms: int = STALE_MS,
                       now: int | None = None) -> list[ChargeAttempt]:
    """Drive charge attempts left unfinished (not updated for ``idle_ms``) to an end: a
    worker killed mid-charge, an event dead-lettered after repeated Stripe outages, a
    payment still ``processing`` at Stripe when its event was handled, a funding request
    whose client never came back. Each is resumed under its account's lock: its
    PaymentIntent is looked up (never charged again when one exists) and a succeeded
    charge is credited once (the credit is idempotent on the PaymentIntent id)."""
    now = now or now_ms()
    done: list[ChargeAttempt] = []
    for tenant in ctx.config.tenants:
        for attempt_id in await ctx.charger.stale(tenant.id, idle_ms=idle_ms, now=now):
            a = await ctx.charger.load(tenant.id, attempt_id)
            if a is None or a.state in FINAL:  # expired, or finished meanwhile
                await ctx.charger.forget(tenant.id, attempt_id)
                if a is None:
                    continue
            try:
                async with ctx.charger.lock(a.tenant, a.account) as lock:
                    a = await ctx.charger.run(a, lock=lock)
            except (Busy, PaymentTransient) as exc:  # someone is on it, or Stripe still down
                log.info("charge attempt %s not resumed yet: %s", attempt_id,
                         type(exc).__name__)
                continue
            except BillingError as exc:  # e.g. the credit refused: money taken, needs a human
                log.warning("charge attempt %s of %s/%s cannot finish: %s", attempt_id,
                            a.tenant, a.account, exc)
                continue
            if a.purpose == "recharge" and a.state in FINAL:
                await _finish(ctx, a, now)
            done.append(a)
    return done


async def _schedule_loop(ctx: BillingContext, stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        try:
            await run_scheduled(ctx)
            await resume_stale(ctx)
        except Exception:  # a failed pass is retried next period
            log.exception("scheduled recharge pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def run_recharge_worker(cfg: Config, store: Store, gateway: StripeGateway, *,
                              consumer: str, stop: asyncio.Event,
                              schedule_every_s: float = 60.0, hook: Hook | None = None,
                              ctx: BillingContext | None = None) -> None:
    """Consume recharge events until ``stop`` is set and run schedule mode every minute.
    Events are read by one blocking reader for every tenant on a single Redis, by one per
    tenant on a Redis Cluster (a read over several slots is refused there). ``ctx``: the
    service's billing context, whose config a reload swaps (so an event read just before
    a reload is handled on the new settings); else one of its own."""
    ctx = ctx or BillingContext(cfg, store, gateway, hook=hook)
    tenants = [t.id for t in cfg.tenants]
    # a cluster's per-tenant readers claim on every pass (their reads wait on the handling)
    events = _events(ctx, tenants, consumer,
                     claim_every_ms=0 if is_cluster(store.redis) else 5_000)
    await asyncio.gather(_schedule_loop(ctx, stop, schedule_every_s),
                         _consume(ctx, events, stop))


__all__ = ["CENT", "configure", "process_once", "recharge", "recharge_if_below", "resume_stale",
           "run_recharge_worker", "run_scheduled", "settings", "validate"]

"""The bridge from engine events to Prometheus metrics (engine/obs/metrics.py).

The hot path calls small observer callbacks with plain values; this module turns them into
metric updates, so ingest, batching, Store and the workers stay free of metric objects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engine.core import keys
from engine.delivery.record import NO_REQUEST, DeliveryEvent
from engine.obs.metrics import METRICS, count, observe, observe_all
from engine.store.store import UNAVAILABLE

log = logging.getLogger("leadflow.telemetry")

_UNKNOWN = "unknown"
_kind = operator.attrgetter("kind")
# streams with consumer groups whose lag/pending SREs watch: (logical name, key builder)
_STREAMS = (("deliveries", keys.deliveries), ("events", keys.events), ("ledger", keys.ledger))
LAG_SCAN_MAX = 10_000  # entries counted for a lag Redis cannot tell (_lag)


class _Tally:
    """The per-request and per-lead metrics, counted in plain dicts and lists on the event
    loop and folded into the Prometheus metrics in bulk (:func:`fold`): prometheus-client
    takes a lock and a few Python calls per increment, and these updates were 35k of the
    engine's 335k instructions per lead (docs/benchmarks.md)."""

    __slots__ = ("http", "http_seconds", "lead_seconds", "leads", "n", "sold")

    def __init__(self) -> None:
        self.http: dict[tuple[str, int], int] = {}  # (route, status) -> requests
        self.http_seconds: dict[str, list[float]] = {}  # route -> durations
        self.leads: dict[tuple[str, str, str], int] = {}  # (campaign, supplier, status)
        self.lead_seconds: list[float] = []  # decision durations (not of ERRORs)
        self.sold: dict[tuple[str, str], int] = {}  # (campaign, buyer) -> sales
        self.n = 0  # observations since the last fold


FOLD_EVERY = 4_096  # requests + leads: bounds the tally's memory when nobody scrapes
_tally = _Tally()


def http_observer(route: str, status: int, seconds: float) -> None:
    t, key = _tally, (route, status)
    t.http[key] = t.http.get(key, 0) + 1
    durations = t.http_seconds.get(route)
    if durations is None:
        durations = t.http_seconds[route] = []
    durations.append(seconds)
    _counted(t)


def lead_observer(
    campaign: str, supplier: str, status: str, seconds: float, sold: list[list[str]]
) -> None:
    """One decided lead: status count, decision latency, sales. (The money a decision moved
    is counted once per Lua call, see script_observer's caller.)"""
    t, key = _tally, (campaign, supplier, status)
    t.leads[key] = t.leads.get(key, 0) + 1
    if status != "ERROR":
        t.lead_seconds.append(seconds)
    for buyer, _ in sold:
        sale = (campaign, buyer)
        t.sold[sale] = t.sold.get(sale, 0) + 1
    _counted(t)  # a batch request brings up to 10,000 leads: each counts, not the request


def _counted(t: _Tally) -> None:
    """One more observation in ``t``: folded once there are FOLD_EVERY of them."""
    t.n += 1
    if t.n >= FOLD_EVERY:
        fold()


def fold() -> None:
    """Everything tallied so far into the Prometheus metrics. On the event loop thread,
    which is the only one that tallies: the /metrics endpoint folds before it renders, and
    the observers fold every FOLD_EVERY observations (requests and leads alike)."""
    global _tally  # swapped whole: nothing tallied meanwhile is lost
    t, _tally = _tally, _Tally()
    for (route, code), n in t.http.items():
        count(METRICS.http_requests(route, str(code)), n)
    for route, durations in t.http_seconds.items():
        observe_all(METRICS.http_request_duration(route), durations)
    for (campaign, supplier, status), n in t.leads.items():
        count(METRICS.leads_received(campaign or _UNKNOWN, supplier or _UNKNOWN,
                                     status.lower()), n)
    observe_all(METRICS.decision_duration, t.lead_seconds)
    for (campaign, buyer), n in t.sold.items():
        count(METRICS.leads_sold(campaign, buyer), n)


def script_observer(script: str, seconds: float, events: Iterable[Any]) -> None:
    """One Lua call: its latency and the events it emitted (``[type, count, ...]``)."""
    observe(METRICS.redis_script_duration(script), seconds)
    events_observer(events)


def events_observer(events: Iterable[Any]) -> None:
    """Events a Lua script emitted (``[type, count, ...]``): counted by type; pauses
    (``paused:<reason>``) by reason; ``hold:expired``, the ping-post holds a script released
    past their expiry as it read an account, in ``leadflow_holds_total``."""
    flat = list(events) if not isinstance(events, dict) else []
    for etype, n in zip(flat[::2], flat[1::2], strict=False):
        name = str(etype)
        if name.startswith("paused:"):
            METRICS.buyers_paused(name.removeprefix("paused:")).inc(int(n))
        elif name.startswith("hold:"):  # ping-post holds released lazily past expiry
            count(METRICS.holds(name.removeprefix("hold:")), int(n))
        else:
            METRICS.events_emitted(name).inc(int(n))


def recharge_observer(outcome: str, seconds: float | None) -> None:
    """A recharge attempt's outcome (billing.recharge), with its latency when it succeeded."""
    METRICS.recharge_attempts(outcome).inc()
    if seconds is not None:
        observe(METRICS.recharge_latency, seconds)


def money_observer(kind: str, delta: int) -> None:
    if delta > 0:
        METRICS.money_credited(kind).inc(delta)
    elif delta < 0:
        METRICS.money_debited(kind).inc(-delta)


def delivery_observer(events: Sequence[DeliveryEvent]) -> None:
    """A batch of delivery events: a few metric updates per batch, not three locked
    increments per attempt."""
    METRICS.delivery(collections.Counter(map(_kind, events)),
                     [e.latency_ms / 1000 for e in events if e.kind not in NO_REQUEST])


def notify_observer(outcome: str, channel: str, kind: str) -> None:
    """One notification send (engine.notify.worker): ``sent``, ``failed`` (tried again) or
    ``dead_lettered``, by the transport's channel and the message kind."""
    METRICS.notify(outcome, channel, kind)


def hooks_observer(tenant: str, etype: str, outcome: str) -> None:
    """One tenant-webhook request (engine.delivery.tenant_hooks), counted as a
    notification of channel ``webhook`` whose kind is the event type; an event type the
    tenant did not ask for (``skipped``) is not a send."""
    if outcome != "skipped":
        METRICS.notify(outcome, "webhook", etype)


async def monitor(client: aioredis.Redis, tenants: Sequence[str], stop: asyncio.Event,
                  *, every_s: float = 5.0) -> None:
    """Redis liveness and consumer-group lag/pending, every few seconds until ``stop``."""
    while not stop.is_set():
        try:
            await client.ping()
            METRICS.redis_up.set(1)
            await _stream_gauges(client, tenants)
        except (*UNAVAILABLE, TimeoutError) as exc:  # redis-py's errors are not OSError's
            METRICS.redis_up.set(0)
            log.warning("redis unreachable", extra={"reason": type(exc).__name__})
        except Exception as exc:  # noqa: BLE001 - metrics must never take the engine down
            METRICS.redis_up.set(0)
            log.warning("monitor failed", extra={"reason": type(exc).__name__})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def _lag(client: aioredis.Redis, key: str, group: dict[Any, Any]) -> int:
    """A group's lag: XINFO GROUPS' ``lag``, or, where Redis cannot tell it (nil: entries
    deleted past the group's position, as decide.lua's taken-back tries and the delivery
    worker's acks leave), the entries after its last-delivered id, counted up to
    :data:`LAG_SCAN_MAX`."""
    lag = group.get("lag")
    if lag is not None or "lag" not in group:  # Redis 6.2 has no lag field: 0 as before
        return int(lag or 0)
    last = group.get("last-delivered-id") or b"0-0"
    last = last.decode() if isinstance(last, bytes) else str(last)
    return len(await client.xrange(key, min="(" + last, max="+", count=LAG_SCAN_MAX) or ())


async def _stream_gauges(client: aioredis.Redis, tenants: Sequence[str]) -> None:
    totals: dict[tuple[str, str], tuple[int, int]] = {}
    for tenant in tenants:
        for name, key_of in _STREAMS:
            try:
                groups: Any = await client.xinfo_groups(key_of(tenant))
            except ResponseError:  # no such stream yet
                continue
            for g in groups:
                group = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
                lag, pending = totals.get((name, group), (0, 0))
                totals[(name, group)] = (lag + await _lag(client, key_of(tenant), g),
                                         pending + int(g.get("pending") or 0))
    for (name, group), (lag, pending) in totals.items():
        METRICS.stream_lag(name, group).set(lag)
        METRICS.stream_pending(name, group).set(pending)


def ping_observer(event: str, campaign: str, label: str, n: int) -> None:
    """engine.ingest.pingpost's counts: pings, posts, bids, holds (see PingObserver)."""
    if event == "ping":
        count(METRICS.pings(campaign, label), n)
    elif event == "post":
        count(METRICS.ping_posts(campaign, label), n)
    elif event == "bid":
        count(METRICS.ping_bids(campaign, label), n)
    else:
        count(METRICS.holds(label), n)


def bid_observer(campaign: str, buyer: str, outcome: str, seconds: float) -> None:
    """One bid request sent to a ping buyer: its outcome and latency, by buyer (the
    timeout-rate alert's numerator and denominator)."""
    count(METRICS.ping_bid_requests(buyer, outcome))
    observe(METRICS.bid_duration(buyer), seconds)


def holds_expired(n: int) -> None:
    """Holds the ping sweep released past their expiry."""
    count(METRICS.holds("expired"), n)

"""Every Prometheus metric leadflow exports, defined here and nowhere else.

Conventions (see ``docs/metrics.md`` for the full list):

* names are ``leadflow_<what>_<unit>[_total]``; durations are in **seconds**;
* **money is in micros** (millionths of the currency unit, ``$1.00 == 1_000_000``, the same
  integer unit as :mod:`engine.core.money`) and money counters end in ``_micros_total``;
* labels are bounded: enums, route templates, script names, or ids that come from the
  config (campaign, supplier, buyer). Never a lead id, e-mail, phone, IP or raw URL path.
  Account balances (one series per account) are exported only by :class:`BalanceCollector`,
  at scrape time, for a bounded set of accounts.

Hot path: labelled metrics are wrapped in :class:`Children`, a dict cache of bound
``.labels()`` children, so recording is a tuple-keyed dict lookup plus ``inc()``::

    from engine.obs.metrics import METRICS as M, observe
    M.leads_received("c1", "s1", "accepted").inc()
    observe(M.decision_duration, elapsed_s)  # = M.decision_duration.observe, cheaper

Serving: :func:`render` for our own ASGI app (or :func:`metrics_asgi_app`),
:func:`start_worker_metrics_server` for worker processes, and :func:`registry_for_process`
to pick the registry to expose (multiprocess mode aware).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import math
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from importlib import metadata
from threading import Lock, Thread
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.core import keys
from engine.core.constants import DEFAULT_FLOOR
from engine.notify.templates import KINDS as NOTIFY_KINDS
from engine.notify.transport import CHANNELS as NOTIFY_CHANNELS
from engine.store.store import CLUSTER_SCHEME

log = logging.getLogger(__name__)

# ``*_created`` samples double the series count for a timestamp Prometheus does not use
# (counter resets are detected from the values). This module owns every leadflow metric.
disable_created_metrics()  # type: ignore[no-untyped-call]

NAMESPACE = "leadflow"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "__other__"  # label value that replaces label sets beyond a Children limit

# -- bounded label values known up front (pre-created so rate() sees a 0 before the first
#    event, which keeps alerts like "recharge failures > 0" from missing the first one) ----
# lead statuses are the API's, lower-cased; money kinds are the ledger's `kind` values
LEAD_STATUSES = ("accepted", "duplicated", "rejected", "error")
DEBIT_KINDS = ("lead", "fee", "usage", "reprice", "refund", "adjustment")
CREDIT_KINDS = (
    "funding", "recharge", "refund", "fee_refund", "return", "reprice", "opening", "adjustment",
)  # fmt: skip
EVENT_TYPES = (
    "balance_alert",
    "recharge_needed",
    "recharge_succeeded",
    "recharge_failed",
    "buyer_paused",
    "buyer_resumed",
    "delivery_failed",
    "balance_negative",
    "funding_received",
    "refund_processed",
    "lead_returned",
    "cap_reached",
    "webhook_failing",
)
PAUSE_REASONS = ("floor", "min_balance", "manual")
RECHARGE_OUTCOMES = ("succeeded", "failed", "declined", "authentication_required", "skipped")
DELIVERY_OUTCOMES = (
    "accepted", "duplicated", "rejected", "error", "timeout", "dead_letter", "deferred",
)
# a notification send's outcome (engine.notify.worker's observer) -> the counter it counts
NOTIFY_OUTCOMES = ("sent", "failed", "dead_lettered")

# -- buckets (seconds) -------------------------------------------------------------------
# decision: one Lua script round trip plus Python routing; sub-millisecond to 100 ms.
DECISION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip
# one EVALSHA: tens of microseconds to tens of milliseconds.
SCRIPT_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
# one HTTP request served by the engine (sync campaigns wait for delivery: up to seconds).
HTTP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# one outbound webhook delivery to a buyer.
PING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# threshold crossed -> wallet credited (payment provider round trip, retries).
RECHARGE_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """Cache of bound ``.labels()`` children of one metric, with a cardinality cap.

    ``children(*values)`` returns the child for that label set; after the first call it is
    one dict lookup (``Metric.labels`` takes a lock and re-validates every time). ``known``
    label sets are created up front (so they export 0 before their first event). Beyond
    ``limit`` further label sets, new ones are folded into a single ``__other__`` child and
    counted in ``leadflow_metric_label_overflow_total{metric}``: a misconfigured or abused
    label can cost at most ``limit`` extra series, never an unbounded number.
    """

    __slots__ = ("_cache", "_limit", "_lock", "_metric", "_name", "_on_overflow", "_other")

    def __init__(
        self,
        metric: M,
        *,
        name: str,
        limit: int = 1000,
        on_overflow: Callable[[str], None] | None = None,
        known: Iterable[Sequence[str]] = (),
    ) -> None:
        self._metric: M = metric
        self._name = name
        self._limit = limit
        self._on_overflow = on_overflow
        self._cache: dict[tuple[str, ...], M] = {}
        self._other: M | None = None
        self._lock = Lock()
        for values in known:  # pre-created, and not counted against ``limit``
            key = tuple(values)
            self._cache[key] = metric.labels(*key)
        self._limit = limit + len(self._cache)

    @property
    def metric(self) -> M:
        """The underlying prometheus-client metric (for tests and unusual calls)."""
        return self._metric

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(self, *values: str) -> M:
        child = self._cache.get(values)
        if child is not None:
            return child
        return self._add(values)

    def _add(self, values: tuple[str, ...]) -> M:
        with self._lock:
            child = self._cache.get(values)
            if child is not None:
                return child
            if len(self._cache) >= self._limit:
                if self._on_overflow is not None:
                    self._on_overflow(self._name)
                if self._other is None:
                    self._other = self._metric.labels(*([OTHER] * len(values)))
                return self._other
            child = self._metric.labels(*values)
            self._cache[values] = child
            return child


def _version() -> str:
    try:
        return metadata.version("leadflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Metrics:
    """All leadflow metrics, registered in ``registry``.

    The process-wide instance is :data:`METRICS` (default registry). Tests build their own
    with a fresh :class:`~prometheus_client.CollectorRegistry`. Attributes are either a
    metric (no labels) or a :class:`Children` cache (call it with the label values, in the
    order given in the comment).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        label_limit: int = 1000,
        version: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.registry = registry
        self._label_limit = label_limit
        self._meta(version, revision)
        self._lead_metrics()
        self._money_metrics()
        self._billing_metrics()
        self._delivery_metrics()
        self._ping_metrics()
        self._notify_metrics()
        self._stream_metrics()
        self._http_metrics()
        self._redis_metrics()

    # -- builders -------------------------------------------------------------------------
    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def _hist(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(name, doc, labels, namespace=NAMESPACE, registry=self.registry,
                         buckets=buckets)

    def _children(
        self, metric: M, name: str, known: Iterable[Sequence[str]] = ()
    ) -> Children[M]:
        return Children(metric, name=name, limit=self._label_limit,
                        on_overflow=self._overflow, known=known)

    def _overflow(self, name: str) -> None:
        self.label_overflow(name).inc()

    def _meta(self, version: str | None, revision: str | None) -> None:
        # (metric,)
        self.label_overflow = Children(
            self._counter(
                "metric_label_overflow_total",
                "Label sets folded into __other__ because a metric hit its label limit.",
                ["metric"],
            ),
            name="metric_label_overflow",
        )
        self.build_info = Gauge(
            "build_info",
            "Always 1; labels carry the running leadflow version.",
            ["version", "revision", "python"],
            namespace=NAMESPACE,
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(
            version or _version(),
            revision or os.environ.get("LEADFLOW_REVISION", "unknown"),
            platform.python_version(),
        ).set(1)

    def _lead_metrics(self) -> None:
        # (campaign, supplier, status)
        self.leads_received = self._children(
            self._counter(
                "leads_received_total",
                "Leads posted by suppliers, by final decision status.",
                ["campaign", "supplier", "status"],
            ),
            "leads_received",
        )
        # (campaign, buyer)
        self.leads_sold = self._children(
            self._counter(
                "leads_sold_total",
                "Lead sales (one per buyer a lead is sold to).",
                ["campaign", "buyer"],
            ),
            "leads_sold",
        )
        self.decision_duration = self._hist(
            "decision_duration_seconds",
            "Time to decide one lead (validation, routing, atomic metering script).",
            DECISION_BUCKETS,
        )
        # (script,)
        self.redis_script_duration = self._children(
            self._hist(
                "redis_script_duration_seconds",
                "Round-trip time of one Lua script call (EVALSHA), by script name.",
                SCRIPT_BUCKETS,
                ["script"],
            ),
            "redis_script_duration",
        )

    def _money_metrics(self) -> None:
        # (kind,)
        self.money_debited = self._children(
            self._counter(
                "money_debited_micros_total",
                "Money debited from accounts, in micros (1e-6 currency units).",
                ["kind"],
            ),
            "money_debited",
            [(k,) for k in DEBIT_KINDS],
        )
        # (kind,)
        self.money_credited = self._children(
            self._counter(
                "money_credited_micros_total",
                "Money credited to accounts, in micros (1e-6 currency units).",
                ["kind"],
            ),
            "money_credited",
            [(k,) for k in CREDIT_KINDS],
        )

    def _billing_metrics(self) -> None:
        # (type,)
        self.events_emitted = self._children(
            self._counter(
                "events_emitted_total",
                "Events appended to the events stream, by type.",
                ["type"],
            ),
            "events_emitted",
            [(t,) for t in EVENT_TYPES],
        )
        # (reason,)
        self.buyers_paused = self._children(
            self._counter(
                "buyers_paused_total",
                "Buyers paused, by reason.",
                ["reason"],
            ),
            "buyers_paused",
            [(x,) for x in PAUSE_REASONS],
        )
        # (outcome,)
        self.recharge_attempts = self._children(
            self._counter(
                "recharge_attempts_total",
                "Automatic wallet recharge attempts, by outcome.",
                ["outcome"],
            ),
            "recharge_attempts",
            [(o,) for o in RECHARGE_OUTCOMES],
        )
        self.recharge_latency = self._hist(
            "recharge_latency_seconds",
            "Time from a balance crossing its recharge threshold to the wallet being credited.",
            RECHARGE_BUCKETS,
        )

    def _delivery_metrics(self) -> None:
        # (outcome,)
        self.deliveries = self._children(
            self._counter(
                "deliveries_total",
                "Webhook delivery attempts to buyers, by outcome.",
                ["outcome"],
            ),
            "deliveries",
            [(o,) for o in DELIVERY_OUTCOMES],
        )
        self.delivery_duration = self._hist(
            "delivery_duration_seconds",
            "Duration of one webhook delivery attempt (request sent to response read).",
            DELIVERY_BUCKETS,
        )

    def _ping_metrics(self) -> None:
        # (campaign, status): status lower-cased, as leads_received's
        self.pings = self._children(self._counter(
            "pings_total", "Pings answered (ping-post), by campaign and status.",
            ["campaign", "status"]), "pings")
        # (campaign, status): the posts of pings (replays not counted); with pings_total,
        # the ping-to-post ratio
        self.ping_posts = self._children(self._counter(
            "ping_posts_total", "Posts of pings answered (ping-post), by campaign and status.",
            ["campaign", "status"]), "ping_posts")
        # (campaign, outcome): bid | no_bid | timeout | error | ineligible
        self.ping_bids = self._children(self._counter(
            "ping_bids_total", "Ping buyers asked for a bid, by campaign and outcome.",
            ["campaign", "outcome"]), "ping_bids")
        # (buyer, outcome): bid | no_bid | timeout | error, one per request sent
        self.ping_bid_requests = self._children(self._counter(
            "ping_bid_requests_total",
            "Bid requests sent to ping buyers, by buyer and outcome (timeout: the buyer's "
            "timeout or the ping's deadline).", ["buyer", "outcome"]), "ping_bid_requests")
        # (event,): placed | settled | released | expired
        self.holds = self._children(self._counter(
            "holds_total", "Ping-post holds of buyers' funds, by event.", ["event"]),
            "holds", [(e,) for e in ("placed", "settled", "released", "expired")])
        # (buyer,)
        self.bid_duration = self._children(Histogram(
            "ping_bid_duration_seconds", "Duration of one bid request to a ping buyer.",
            ["buyer"], namespace=NAMESPACE, registry=self.registry,
            buckets=PING_BUCKETS), "ping_bid_duration")

    def _notify_metrics(self) -> None:
        # (channel, kind): the transport's channel ("smtp", "sendgrid") and the message
        # kind (engine.notify.templates.KINDS), every pair pre-created at 0
        known = [(c, k) for c in NOTIFY_CHANNELS for k in NOTIFY_KINDS]
        self.notify_sent = self._children(
            self._counter(
                "notify_sent_total",
                "Notification e-mails the channel accepted, by channel and message kind.",
                ["channel", "kind"],
            ),
            "notify_sent",
            known,
        )
        self.notify_failed = self._children(
            self._counter(
                "notify_failed_total",
                "Notification sends that failed and will be tried again.",
                ["channel", "kind"],
            ),
            "notify_failed",
            known,
        )
        self.notify_dead_lettered = self._children(
            self._counter(
                "notify_dead_lettered_total",
                "Notification sends given up: refused for good, or their event's last try.",
                ["channel", "kind"],
            ),
            "notify_dead_lettered",
            known,
        )

    def _stream_metrics(self) -> None:
        # (stream, group): logical stream name ("deliveries", "events", "ledger"), summed
        # over tenants; never the full key.
        self.stream_lag = self._children(
            Gauge(
                "stream_lag_entries",
                "Entries of a stream not yet delivered to a consumer group (XINFO GROUPS lag).",
                ["stream", "group"],
                namespace=NAMESPACE,
                registry=self.registry,
                multiprocess_mode="livemostrecent",
            ),
            "stream_lag",
        )
        self.stream_pending = self._children(
            Gauge(
                "stream_pending_entries",
                "Entries delivered to a consumer group but not acknowledged (XPENDING).",
                ["stream", "group"],
                namespace=NAMESPACE,
                registry=self.registry,
                multiprocess_mode="livemostrecent",
            ),
            "stream_pending",
        )

    def _http_metrics(self) -> None:
        # (route, code): route is the route *template* ("/v1/leads", "/v1/accounts/{id}"),
        # or "unmatched" for 404s and 405s; code is the status as a string.
        self.http_requests = self._children(
            self._counter(
                "http_requests_total",
                "HTTP requests served, by route template and status code.",
                ["route", "code"],
            ),
            "http_requests",
        )
        # (route,)
        self.http_request_duration = self._children(
            self._hist(
                "http_request_duration_seconds",
                "HTTP request duration, by route template.",
                HTTP_BUCKETS,
                ["route"],
            ),
            "http_request_duration",
        )

    def _redis_metrics(self) -> None:
        self.redis_up = Gauge(
            "redis_up",
            "1 if the last Redis health check (PING) succeeded, else 0.",
            namespace=NAMESPACE,
            registry=self.registry,
            multiprocess_mode="livemin",
        )

    # -- convenience for call sites that record several metrics at once -------------------
    def http_request(self, route: str, code: int, seconds: float) -> None:
        count(self.http_requests(route, str(code)))
        observe(self.http_request_duration(route), seconds)

    def notify(self, outcome: str, channel: str, kind: str) -> None:
        """One notification send: ``sent``, ``failed`` (tried again) or ``dead_lettered``."""
        counters = {"sent": self.notify_sent, "failed": self.notify_failed,
                    "dead_lettered": self.notify_dead_lettered}
        count(counters[outcome](channel, kind))

    def delivery(self, outcomes: Mapping[str, int], seconds: Sequence[float]) -> None:
        """Delivery events counted by outcome, and the durations of those that made a
        request (deferred and dead_letter events made none)."""
        for outcome, n in outcomes.items():
            self.deliveries(outcome).inc(n)
        observe_all(self.delivery_duration, seconds)


def count(counter: Counter, amount: float = 1) -> None:
    """``counter.inc(amount)`` for a counter without labels or a bound child, without the
    observability checks prometheus-client repeats on every call (hot path: a few counters
    per lead). Private like :func:`_parts`, with the same fallback."""
    if amount < 0:
        raise ValueError("counters can only be incremented by non-negative amounts")
    try:
        value = counter._value
    except AttributeError:  # a labelled parent (raises like inc) or another client
        counter.inc(amount)
        return
    value.inc(amount)


def _parts(hist: Histogram) -> tuple[Any, Any, Any] | None:
    """(upper bounds, bucket values, sum value) of a histogram without labels or a bound
    child: private to prometheus-client (unchanged since 0.4, the same in multiprocess
    mode); None for a labelled parent or a client without them (callers then use the
    public ``observe``). tests/integration/test_metrics.py checks the exposition against
    ``observe``."""
    try:
        return hist._upper_bounds, hist._buckets, hist._sum
    except AttributeError:
        return None


def observe(hist: Histogram, amount: float) -> None:
    """``hist.observe(amount)``, with a bisect where prometheus-client walks the bucket list
    in Python: the hot path observes two histograms per lead, and that walk was most of the
    metrics' cost per lead."""
    parts = _parts(hist)
    if parts is None:  # a labelled parent (raises like observe) or another client
        hist.observe(amount)
        return
    bounds, buckets, total = parts
    total.inc(amount)
    buckets[bisect.bisect_left(bounds, amount)].inc(1)  # the first bound >= amount


def observe_all(hist: Histogram, amounts: Sequence[float]) -> None:
    """``hist.observe(a)`` for every ``a`` of ``amounts``, as one update of the sum and one
    per bucket hit.

    prometheus-client has no bulk observation, and ``observe`` takes a lock per value; the
    delivery worker reports a whole batch of attempts at once."""
    if not amounts:
        return
    parts = _parts(hist)
    if parts is None:
        for a in amounts:
            hist.observe(a)
        return
    bounds, buckets, total = parts
    ordered = sorted(amounts)
    total.inc(math.fsum(ordered))
    done = 0
    for i, bound in enumerate(bounds):  # the last bound is +Inf
        upto = bisect.bisect_right(ordered, bound)  # amounts <= bound, as observe() counts
        if upto > done:
            buckets[i].inc(upto - done)
            done = upto
        if done == len(ordered):
            break


# -- account balances, read at scrape time -------------------------------------------------

BalanceRow = tuple[str, str, int, int | None]
"""``(tenant, account, balance_micros, floor_micros)``; the floor is None for an account
without one (billing ``none``: never refused, never paused)."""
BalanceSource = Callable[[], Iterable[BalanceRow]]


def _headroom(row: BalanceRow) -> tuple[bool, int]:
    """Sort key of the top-N selection: accounts with a floor first, by headroom (``balance
    - floor``), then accounts without one, by balance."""
    _, _, bal, flo = row
    return (flo is None, bal if flo is None else bal - flo)


class BalanceCollector:
    """Exports account balances and floors, reading them only when Prometheus scrapes.

    ``source`` is called once per scrape (never on the write path) and returns rows
    ``(tenant, account, balance_micros, floor_micros)`` for a bounded, configured set of
    accounts; ``floor_micros`` is None for an account without a floor (billing ``none``),
    which is exported with its balance and no floor series, so no floor alert can match it.
    If the source returns more than ``max_accounts`` rows, only the ``max_accounts`` with
    the least headroom (``balance - floor``) are exported, accounts without a floor last:
    those are the ones an alert cares about. ``enabled=False`` exports nothing (opt-out).

    Exports ``leadflow_account_balance_micros{tenant,account}``,
    ``leadflow_account_floor_micros{tenant,account}``, and, for the collector itself,
    ``leadflow_account_balance_source_up`` (0 if ``source`` raised: the scrape still
    succeeds), ``leadflow_account_balance_source_accounts`` (rows before the limit) and
    ``leadflow_account_balance_source_duration_seconds``.

    ``source`` runs in the scraping thread: with :func:`metrics_asgi_app` that is a worker
    thread (``asyncio.to_thread``), so a synchronous Redis client is fine there, as long as
    it gives up quickly (:func:`blocking_redis_client`): the scrape waits for it.
    """

    BALANCE = f"{NAMESPACE}_account_balance_micros"
    FLOOR = f"{NAMESPACE}_account_floor_micros"
    UP = f"{NAMESPACE}_account_balance_source_up"
    ROWS = f"{NAMESPACE}_account_balance_source_accounts"
    DURATION = f"{NAMESPACE}_account_balance_source_duration_seconds"

    def __init__(
        self, source: BalanceSource, *, max_accounts: int = 500, enabled: bool = True
    ) -> None:
        if max_accounts < 0:
            raise ValueError("max_accounts must be >= 0")
        self._source = source
        self.max_accounts = max_accounts
        self.enabled = enabled

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        labels = ["tenant", "account"]
        return (
            GaugeMetricFamily(self.BALANCE, "Account balance in micros.", labels=labels),
            GaugeMetricFamily(
                self.FLOOR, "Account floor (lowest allowed balance) in micros.", labels=labels
            ),
            GaugeMetricFamily(self.UP, "1 if the last balance read succeeded, else 0."),
            GaugeMetricFamily(self.ROWS, "Accounts the balance source returned (before limit)."),
            GaugeMetricFamily(self.DURATION, "Time the last balance read took."),
        )

    def describe(self) -> Iterable[Metric]:
        # Registering must not call the source (the default registry auto-describes).
        return self._families() if self.enabled else ()

    def collect(self) -> Iterable[Metric]:
        if not self.enabled:
            return ()
        balance, floor, up, count, duration = self._families()
        start = time.perf_counter()
        try:
            rows = list(self._source())
        except Exception:  # a failing source must not fail the whole scrape
            log.exception("balance source failed")
            up.add_metric([], 0)
            return (up,)
        elapsed = time.perf_counter() - start
        returned = len(rows)
        if returned > self.max_accounts:
            rows = heapq.nsmallest(self.max_accounts, rows, key=_headroom)
        up.add_metric([], 1)
        count.add_metric([], returned)
        duration.add_metric([], elapsed)
        for tenant, account, bal, flo in rows:
            balance.add_metric([tenant, account], bal)
            if flo is not None:
                floor.add_metric([tenant, account], flo)
        return (balance, floor, up, count, duration)


BALANCE_TIMEOUT_S = 1.0


def blocking_redis_client(url: str, *, timeout_s: float = BALANCE_TIMEOUT_S) -> Any:
    """A synchronous client for the balance export, from the engine's Redis URL.

    The URL is read as :func:`engine.store.store.connect` reads it: ``redis+cluster://host:port``
    is a Redis Cluster (:class:`redis.RedisCluster`, any node), anything else goes to
    :meth:`redis.Redis.from_url`, which keeps the ACL username, the password, the database
    and TLS (``rediss://`` and its ``ssl_*`` query parameters). A scrape waits for this
    client, so it gives up quickly: ``timeout_s`` to connect and to read a reply, and no
    retries (redis-py's default retries with back-off made a scrape take seconds when
    Redis refused connections, and without a socket timeout a stopped Redis held the scrape
    for as long as Prometheus waited).

    A cluster client reads the cluster's slot map when built, so this raises (a
    :class:`redis.exceptions.RedisError`) when no node answers at that moment.
    """
    quick: dict[str, Any] = {"socket_connect_timeout": timeout_s,
                             "socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}
    if url.startswith(CLUSTER_SCHEME):
        return redis.RedisCluster.from_url("redis://" + url.removeprefix(CLUSTER_SCHEME),
                                           **quick)
    return redis.Redis.from_url(url, health_check_interval=0, **quick)


def redis_balance_source(
    client: Any, accounts: Iterable[tuple[str, str]] | Callable[[], Iterable[tuple[str, str]]]
) -> BalanceSource:
    """A :data:`BalanceSource` reading the ``keys.acct()`` hashes with a blocking client.

    ``client`` is a synchronous ``redis.Redis`` or ``redis.RedisCluster`` (build it with
    :func:`blocking_redis_client`); ``accounts`` a fixed list of ``(tenant, account)`` or a
    callable returning one (e.g. from the loaded config). One ``HMGET bal floor mode`` per
    account in a non-transactional pipeline: one round trip on one Redis; on a cluster,
    each key's command goes to its own node (one round trip per node). Accounts whose hash
    does not exist are skipped. A missing floor is ``DEFAULT_FLOOR``, as in the scripts;
    billing ``none`` accounts have no floor (None).
    """
    def source() -> list[BalanceRow]:
        wanted = list(accounts() if callable(accounts) else accounts)
        if not wanted:
            return []
        pipe = client.pipeline(transaction=False)
        for tenant, account in wanted:
            pipe.hmget(keys.acct(tenant, account), "bal", "floor", "mode")
        rows: list[BalanceRow] = []
        for (tenant, account), (bal, flo, mode) in zip(wanted, pipe.execute(), strict=True):
            if bal is None:
                continue
            floor: int | None = int(flo) if flo else DEFAULT_FLOOR
            if mode in (b"none", "none"):  # (a client may decode replies)
                floor = None
            rows.append((tenant, account, int(bal), floor))
        return rows

    return source


# -- exposition ------------------------------------------------------------------------------


def registry_for_process() -> CollectorRegistry:
    """The registry this process should expose on ``/metrics``.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes): a fresh registry with a
    :class:`~prometheus_client.multiprocess.MultiProcessCollector` that merges the values
    every process wrote to that directory. Otherwise the default registry. Register
    process-local collectors (:class:`BalanceCollector`) on the returned registry.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """Exposition of ``registry``: ``(body, content_type)``.

    Without ``accept``: the classic Prometheus text format (0.0.4). With the request's
    ``Accept`` header, OpenMetrics is returned when the scraper asks for it.
    """
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def start_worker_metrics_server(
    port: int, registry: CollectorRegistry | None = None, addr: str = "0.0.0.0"
) -> tuple[WSGIServer, Thread]:
    """Serve ``/metrics`` from a daemon thread (for worker processes without an HTTP app).

    ``registry`` defaults to :func:`registry_for_process`. Returns the server (call
    ``shutdown()`` then ``server_close()`` to stop it) and its thread. ``port=0`` picks a
    free port: read it from ``server.server_port``.
    """
    return start_http_server(port, addr=addr, registry=registry or registry_for_process())


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """A tiny ASGI app serving :func:`render` (mount it on ``GET /metrics``).

    Rendering runs in a worker thread so that scrape-time collectors (balances) never block
    the event loop.
    """
    reg = registry or registry_for_process()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        accept = ""
        for name, value in scope.get("headers", ()):
            if name == b"accept":
                accept = value.decode("latin-1")
        body, content_type = await asyncio.to_thread(render, reg, accept or None)
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


METRICS = Metrics()
"""The process-wide metrics, registered in the default registry."""

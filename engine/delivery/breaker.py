"""A circuit breaker per buyer endpoint, mirrored to Redis for the router.

States: *closed* (requests flow; consecutive failures are counted) -> *open* after
``breaker_failures`` consecutive failures (no requests for ``breaker_cooldown_s``) ->
*half-open* once the cool-down has passed (one probe request at a time) -> *closed* when
the probe succeeds, *open* again when it fails. A failure is a timeout, a network error,
a 5xx or a 429; a rejection is a healthy answer and resets the count.

Each worker process keeps its own breakers. While a breaker is open the worker writes

* ``keys.breaker(tenant, buyer)``: a STRING (the half-open time, epoch ms) with a TTL of
  the cool-down, so the router can skip the buyer with one ``EXISTS`` (the Lua helper
  ``K.breaker(p, buyer)`` names the same key inside scripts), and
* ``keys.breakers(tenant)``: a ZSET buyer -> half-open time, read by :func:`open_buyers`.

Both are removed when the breaker closes; the TTL/score ends an open state that no worker
closes (e.g. the worker stopped).

A breaker that opens from *closed* (a new outage, not a failed probe re-opening it) also
emits the tenant's ``webhook_failing`` event (:meth:`Breakers.failure` with ``notice``), in
the same step as the mirror (``breaker_open.lua``): at most one per buyer in
:data:`WEBHOOK_FAILING_EVERY_MS`, whichever worker process opens its breaker first
(``keys.breaker_told``). Fields: ``type``, ``account`` (the client paying for the buyer's
leads), ``buyer``, ``host`` (the webhook's host, and port when one is given: never its
path or query, which may hold a token), ``failures`` (consecutive failures that opened
it), ``error`` (the last one: ``timeout``, ``network: <exception class>`` or ``http
<status>``), ``status`` (0 without an HTTP answer), ``ts``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from engine.core import keys
from engine.store.scripts import Scripts, scripts
from engine.store.store import now_ms

_PROBE_WAIT_MS = 1_000  # jobs that find a probe in flight come back after this
# one webhook_failing event per buyer in this time, across worker processes and a webhook
# that recovers and fails again (each opening would be an e-mail to the tenant)
WEBHOOK_FAILING_EVERY_MS: Final = 3_600_000


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    failures_to_open: int
    cooldown_ms: int
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    open_until: int = 0
    probing: bool = False

    def allow(self, now: int) -> int:
        """0 when a request may go now, else the epoch ms to try again at."""
        if self.state is BreakerState.CLOSED:
            return 0
        if self.state is BreakerState.OPEN:
            if now < self.open_until:
                return self.open_until
            self.state = BreakerState.HALF_OPEN
        if self.probing:
            return now + min(_PROBE_WAIT_MS, self.cooldown_ms)
        self.probing = True
        return 0

    def success(self) -> bool:
        """Record a success; True when this closed an open/half-open breaker."""
        was_open = self.state is not BreakerState.CLOSED
        self.state, self.failures, self.probing = BreakerState.CLOSED, 0, False
        return was_open

    def failure(self, now: int) -> bool:
        """Record a failure; True when this opened the breaker."""
        self.failures += 1
        self.probing = False
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.failures_to_open
        ):
            self.state, self.open_until = BreakerState.OPEN, now + self.cooldown_ms
            return True
        return False


class Breakers:
    """The breakers of one worker process, keyed by (tenant, buyer)."""

    def __init__(self, redis: aioredis.Redis, *, lua: Scripts | None = None,
                 events_observer: Callable[[Any], None] | None = None) -> None:
        self._redis = redis
        self._lua = lua or scripts()
        self._events_observer = events_observer  # told ["webhook_failing", 1] per event
        self._by_buyer: dict[tuple[str, str], Breaker] = {}

    def get(self, tenant: str, buyer: str, *, failures: int, cooldown_s: int) -> Breaker:
        b = self._by_buyer.get((tenant, buyer))
        if b is None:
            b = Breaker(max(1, failures), max(1, cooldown_s) * 1_000)
            self._by_buyer[(tenant, buyer)] = b
        return b

    async def success(self, tenant: str, buyer: str, b: Breaker) -> None:
        if b.success():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.breaker(tenant, buyer))
                pipe.zrem(keys.breakers(tenant), buyer)
                await pipe.execute()

    async def failure(self, tenant: str, buyer: str, b: Breaker, now: int, *,
                      notice: Mapping[str, str] | None = None) -> bool:
        """Record a failure; True when this opened the breaker. ``notice``: the
        ``webhook_failing`` event's ``account``, ``host``, ``error`` and ``status``, emitted
        (see the module docs) when this opened a closed breaker."""
        fresh = b.state is BreakerState.CLOSED
        if not b.failure(now):
            return False
        event = b""
        if fresh and notice is not None:
            fields = {"type": "webhook_failing", "account": notice.get("account", ""),
                      "buyer": buyer, "host": notice.get("host", ""),
                      "failures": str(b.failures), "error": notice.get("error", ""),
                      "status": notice.get("status", "0"), "ts": str(now)}
            event = msgspec.json.encode([x for kv in fields.items() for x in kv])
        told = await self._lua.breaker_open(
            self._redis, [keys.tenant_prefix(tenant)],
            [buyer, b.open_until, b.cooldown_ms, now, WEBHOOK_FAILING_EVERY_MS, event])
        if told and self._events_observer is not None:
            self._events_observer(["webhook_failing", 1])
        return True


async def open_buyers(redis: aioredis.Redis, tenant: str, *, now: int | None = None) -> set[str]:
    """Buyers of ``tenant`` whose breaker is open now (the router may skip them)."""
    t = now_ms() if now is None else now
    members = await redis.zrangebyscore(keys.breakers(tenant), f"({t}", "+inf")
    return {m.decode() if isinstance(m, bytes) else str(m) for m in members}


async def is_open(redis: aioredis.Redis, tenant: str, buyer: str) -> bool:
    """One buyer's breaker is open (one EXISTS; what the router checks per candidate)."""
    return bool(await redis.exists(keys.breaker(tenant, buyer)))

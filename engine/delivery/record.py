"""Recording a delivery: its decision, its log, its money effect, and observers.

* ``keys.dstate(tenant, lead)``: HASH buyer -> JSON :class:`DeliveryDecision`, written once a
  delivery is decided (``ACCEPTED``/``DUPLICATED``/``REJECTED``/``FAILED``) or while a
  sync-mode attempt holds it (``SYNC`` until ``u``). It is written *before* the money
  effect, so a worker that dies between the two replays the (idempotent) refund/reprice
  from it instead of sending the lead again.
* ``keys.dlog(tenant, lead, buyer)``: LIST of JSON entries, one per attempt or decision:
  buyer, attempt, ts, status, ms, result, reason, a truncated response excerpt. No headers,
  no secrets, no request body. It lives while the delivery is open: settling a job done
  (delivery_finish.lua's ``a``) hands the decision and the log to the lead archive
  (``keys.sold``) and deletes the log; the decision stays (docs/delivery.md, "Recording an
  outcome").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from engine.core import keys
from engine.core.constants import SOLD_MAXLEN
from engine.store.store import Store

log = logging.getLogger("leadflow.delivery")

ACCEPTED, DUPLICATED, REJECTED, FAILED, SYNC = (
    "ACCEPTED", "DUPLICATED", "REJECTED", "FAILED", "SYNC")
REFUNDED_OUTCOMES = frozenset({DUPLICATED, REJECTED, FAILED})
STATE_TTL_S = 14 * 86_400  # as long as the sale record (decide.lua)
LOG_MAX = 100  # entries kept per delivery


class DeliveryDecision(msgspec.Struct, omit_defaults=True, frozen=True):
    o: str  # ACCEPTED | DUPLICATED | REJECTED | FAILED | SYNC
    r: str = ""  # reason
    p: int | None = None  # real-time price (micros) of an accepted lead
    u: int = 0  # SYNC: the claim holds until this epoch ms


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(DeliveryDecision)


def encode_decision(d: DeliveryDecision) -> bytes:
    return _enc.encode(d)


def decode_decision(raw: bytes | str | None) -> DeliveryDecision | None:
    if raw is None:
        return None
    try:
        return _dec.decode(raw)
    except msgspec.DecodeError:
        return None


class DeliveryEvent(msgspec.Struct, frozen=True, gc=False):
    """What an observer (metrics) is told of each attempt or decision.

    ``kind``: accepted | duplicated | rejected | timeout | error (an attempt), dead_letter
    (given up), deferred (breaker open / sync claim); ``latency_ms`` is 0 without a request.
    """

    tenant: str
    buyer: str
    lead_id: str
    kind: str
    latency_ms: int
    status: int
    attempt: int


DEFERRED, DEAD_LETTER = "deferred", "dead_letter"
NO_REQUEST = frozenset({DEFERRED, DEAD_LETTER})  # event kinds without an HTTP request

Observer = Callable[[Sequence[DeliveryEvent]], None]
"""Told events in bulk: the delivery worker reports each batch's events once, when the
batch's requests are done (metrics then cost a few updates per batch, not per attempt)."""


def notify(observer: Observer | None, events: Sequence[DeliveryEvent]) -> None:
    if observer is None or not events:
        return
    try:
        observer(events)
    except Exception:  # an observer must never break a delivery
        log.exception("delivery observer failed")


class _LogEntry(msgspec.Struct, omit_defaults=True):
    buyer: str
    attempt: int
    ts: int
    result: str
    status: int
    ms: int
    reason: str = ""
    excerpt: str = ""


def finish_arg(rows: Sequence[Sequence[Any]], done: Sequence[Sequence[Any]] = (),
               group: str = "") -> bytes:
    """delivery_finish.lua's ARGV[1]: ``rows`` of (lead, buyer, decision JSON, log entry
    JSON, the job's stream entry id or "" for a sync try), a dead letter's also its
    entry's and its event's fields (flat lists of strings); and the jobs ``done``, as
    (entry id, lead, buyer, keep 0/1), to settle and ack (with the consumer ``group``)."""
    return _enc.encode({"g": group, "ttl": STATE_TTL_S, "lmax": LOG_MAX, "m": SOLD_MAXLEN,
                        "j": rows, "a": done})


def log_entry(
    *, buyer: str, attempt: int, ts: int, result: str, status: int = 0, ms: int = 0,
    reason: str = "", excerpt: str = "",
) -> bytes:
    return _enc.encode(_LogEntry(buyer, attempt, ts, result, status, ms, reason, excerpt))


def write_log(pipe: Any, tenant: str, lead_id: str, buyer: str, entry: bytes) -> None:
    k = keys.dlog(tenant, lead_id, buyer)
    pipe.rpush(k, entry)
    pipe.ltrim(k, -LOG_MAX, -1)
    pipe.expire(k, STATE_TTL_S)


def write_decision(pipe: Any, tenant: str, lead_id: str, buyer: str, d: DeliveryDecision) -> None:
    k = keys.dstate(tenant, lead_id)
    pipe.hset(k, buyer, encode_decision(d))
    pipe.expire(k, STATE_TTL_S)


async def apply_money(
    store: Store, tenant: str, lead_id: str, buyer: str, d: DeliveryDecision, *, sale_price: int
) -> None:
    """The money effect of a decision; idempotent (refund.lua), so safe to replay."""
    if d.o in REFUNDED_OUTCOMES:
        res = await store.refund_sale(tenant, lead_id, buyer, d.r[:200] or d.o.lower())
    elif d.o == ACCEPTED and d.p is not None and d.p != sale_price:
        res = await store.reprice_sale(tenant, lead_id, buyer, d.p)
    else:
        return
    if not res.ok:
        log.warning("sale %s/%s of tenant %s: %s", lead_id, buyer, tenant, res.error)


async def read_decision(store: Store, tenant: str, lead_id: str,
                        buyer: str) -> DeliveryDecision | None:
    return decode_decision(await store.redis.hget(keys.dstate(tenant, lead_id), buyer))

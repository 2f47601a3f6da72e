"""Sync mode: ONE delivery attempt while the ingest request waits for the buyer's verdict.

For campaigns with ``mode = "sync"`` the ingest handler calls :func:`deliver_sync` for a
sale it just made, with the absolute deadline of the ingest response. The attempt:

1. claims the delivery: ``HSETNX keys.dstate(lead) buyer {"o":"SYNC","u":deadline+grace}``.
   The stream worker defers the same sale's job until the claim ends, so the lead is not
   sent twice at once. An existing decision is returned as is (a replayed ingest).
2. sends once, with ``timeout = min(delivery.timeout_ms, deadline - now)``.
3. a verdict is recorded exactly as the worker records it (decision, log, refund on
   DUPLICATED/REJECTED, reprice on an accepted real-time price) and returned; the caller
   may then try the next buyer, whose money has been freed.
4. no verdict (timeout, network error, 5xx, 429, deadline passed): no sale. The try is
   recorded ``FAILED`` in place of the claim and refunded like a rejection, and ``None``
   is returned; the stream worker, finding the job decided, acks it without sending.

Breakers are not consulted here: the router already skips buyers whose breaker is open
(``breaker.is_open`` / ``open_buyers``).
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from engine.core import keys
from engine.delivery import client, record
from engine.delivery.client import Endpoint
from engine.delivery.record import DeliveryDecision, DeliveryEvent, Observer
from engine.delivery.verdict import BuyerVerdict, Verdict
from engine.store.store import Store, now_ms

CLAIM_GRACE_MS = 2_000  # the claim outlives the deadline by this much


async def deliver_sync(
    store: Store,
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    *,
    lead_id: str,
    lead: Mapping[str, str],
    price: int,
    deadline_ms: int,
    campaign: str = "",
    observer: Observer | None = None,
    claimed: bool = False,
) -> Verdict | None:
    """One attempt to deliver the sale (lead_id, endpoint.buyer) before ``deadline_ms``
    (epoch ms). The buyer's verdict, or None when it gave none in time (timeout, 5xx, 429,
    network error, or no time left to send): that is no sale, so the attempt is recorded
    ``FAILED`` and refunded here, and the stream worker will not send the job again.

    ``claimed``: the caller already holds the SYNC claim of this (lead, buyer) (written
    before the sale, as :mod:`engine.ingest.waterfall` does, so the stream worker can never see
    the job unclaimed); step 1 is skipped."""
    tenant, buyer = endpoint.tenant, endpoint.buyer
    state_key = keys.dstate(tenant, lead_id)
    if not claimed:
        claim = DeliveryDecision(record.SYNC, "sync attempt", u=deadline_ms + CLAIM_GRACE_MS)
        if not await store.redis.hsetnx(state_key, buyer, record.encode_decision(claim)):
            prior = record.decode_decision(await store.redis.hget(state_key, buyer))
            # None: another sync attempt holds it, or it failed for good
            return None if prior is None else _verdict(prior)
        await store.redis.expire(state_key, record.STATE_TTL_S)
    left = deadline_ms - now_ms()
    if left <= 0:
        await _no_verdict(store, tenant, lead_id, buyer, "deadline passed before sending")
        return None
    att = await client.attempt(session, endpoint, lead=lead, lead_id=lead_id,
                               campaign=campaign, price=price,
                               timeout_ms=min(endpoint.delivery.timeout_ms, left))
    record.notify(observer, [DeliveryEvent(tenant, buyer, lead_id, att.kind, att.latency_ms,
                                           att.status, 1)])
    if att.verdict is None:
        return await _no_verdict(store, tenant, lead_id, buyer,
                                 f"no verdict in time ({att.error})", status=att.status,
                                 ms=att.latency_ms, excerpt=att.excerpt)
    v = att.verdict
    dec = DeliveryDecision(v.outcome.value, v.reason, v.price)
    stands = await _record(store, tenant, lead_id, buyer, dec, record.log_entry(
        buyer=buyer, attempt=1, ts=now_ms(), result=v.outcome.lower(), status=att.status,
        ms=att.latency_ms, reason=f"sync: {v.reason}", excerpt=att.excerpt))
    if stands is not dec:
        return _verdict(stands)
    await record.apply_money(store, tenant, lead_id, buyer, dec, sale_price=price)
    return v


async def _no_verdict(store: Store, tenant: str, lead_id: str, buyer: str, why: str, *,
                      status: int = 0, ms: int = 0, excerpt: str = "") -> Verdict | None:
    """A sync try without the buyer's verdict is not a sale: FAILED, refunded (price,
    outbound fee, cap slot), and, being decided, never sent again by the stream worker.
    Returns None, or the verdict of a decision recorded first by someone else."""
    dec = DeliveryDecision(record.FAILED, f"sync: {why}")
    stands = await _record(store, tenant, lead_id, buyer, dec, record.log_entry(
        buyer=buyer, attempt=1, ts=now_ms(), result="failed", status=status, ms=ms,
        reason=dec.r, excerpt=excerpt))
    if stands is not dec:
        return _verdict(stands)
    await record.apply_money(store, tenant, lead_id, buyer, dec, sale_price=0)
    return None


async def _record(store: Store, tenant: str, lead_id: str, buyer: str, dec: DeliveryDecision,
                  entry: bytes) -> DeliveryDecision:
    """The decision (replacing this try's SYNC claim) and its log entry, through
    delivery_finish.lua as the worker records them: a decision someone else recorded first
    (the stream worker, if this try outlived its claim) is kept. Returns the decision that
    stands: ``dec``, or that other one, whose money effect is already applied."""
    row = (lead_id, buyer, record.encode_decision(dec).decode(), entry.decode())
    kept = await store.lua.delivery_finish(store.redis, [keys.tenant_prefix(tenant)],
                                           [record.finish_arg([row])])
    if not kept:
        return dec
    return await record.read_decision(store, tenant, lead_id, buyer) or dec


def _verdict(d: DeliveryDecision) -> Verdict | None:
    """The verdict of a recorded decision (None for FAILED: no verdict, no sale)."""
    if d.o not in BuyerVerdict.__members__:
        return None
    return Verdict(BuyerVerdict(d.o), d.r, d.p)

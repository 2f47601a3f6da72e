"""A delivery's decision and a lead's delivery log, wherever they are now: in Redis while
the delivery is open, in the tenant's ``sold`` stream (its ``settled`` entry, for the lead
archive) once settled (engine.delivery: delivery_finish.lua forgets them in Redis)."""

from __future__ import annotations

from typing import Any

import msgspec

from engine.core import keys
from engine.delivery.record import DeliveryDecision, decode_decision, read_decision
from engine.store.store import Store


async def _settled(store: Store, tenant: str, lead_id: str,
                   buyer: str | None = None) -> dict[bytes, bytes] | None:
    """The last settled entry of the lead (of ``buyer``, when given)."""
    for _, f in reversed(await store.redis.xrange(keys.sold(tenant))):
        if (b"settled" in f and f[b"lead_id"] == lead_id.encode()
                and (buyer is None or f[b"buyer"] == buyer.encode())):
            return dict(f)
    return None


async def decision(store: Store, tenant: str, lead_id: str,
                   buyer: str) -> DeliveryDecision | None:
    d = await read_decision(store, tenant, lead_id, buyer)
    if d is not None:
        return d
    f = await _settled(store, tenant, lead_id, buyer)
    return decode_decision(f[b"decision"]) if f else None


async def delivery_log(store: Store, tenant: str, lead_id: str) -> list[dict[str, Any]]:
    """The lead's delivery log, oldest first."""
    rows = await store.redis.lrange(keys.dlog(tenant, lead_id), 0, -1)
    if rows:
        return [msgspec.json.decode(r) for r in rows]
    f = await _settled(store, tenant, lead_id)
    return list(msgspec.json.decode(f[b"log"])) if f else []

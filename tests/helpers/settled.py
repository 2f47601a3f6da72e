"""A lead's delivery log as tests read it, wherever it is now: in Redis while a delivery
is open (``keys.dlog``), in the tenant's ``sold`` stream (its ``settled`` entries, for the
lead archive) once settled, when Redis forgets it (delivery_finish.lua). The decision stays
in ``keys.dstate`` (engine.delivery.record.read_decision)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from engine.core import keys
from engine.store.store import Store


async def delivery_log(store: Store, tenant: str, lead_id: str,
                       buyers: Sequence[str] = ("b1", "b2")) -> list[dict[str, Any]]:
    """The lead's delivery log to ``buyers``: what was settled, then what is still in
    Redis, by time (stable)."""
    out: list[dict[str, Any]] = []
    settled = [f for _, f in await store.redis.xrange(keys.sold(tenant))
               if b"settled" in f and f[b"lead_id"] == lead_id.encode()]
    for buyer in buyers:
        for f in settled:
            if f[b"buyer"] == buyer.encode():
                out += msgspec.json.decode(f[b"log"])
        out += [msgspec.json.decode(r)
                for r in await store.redis.lrange(keys.dlog(tenant, lead_id, buyer), 0, -1)]
    return sorted(out, key=lambda e: int(e["ts"]))

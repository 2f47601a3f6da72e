"""The peer: a lead-posting endpoint as a team's first version would be (issue #16, ``peer_ratio``).

FastAPI + pydantic + redis-py (``redis.asyncio`` with hiredis) under uvicorn (httptools,
uvloop), one process, as ``bench.nullapp.serve("bench.peer:app", env={PEER_REDIS_URL: ...})``
starts it. ``POST /v1/leads`` does far less than leadflow does:

1. the body decoded into a pydantic model (the ids, ``lp_key``, an e-mail checked by a
   pattern, the rest of the fields kept as they come);
2. the supplier's ``lp_key`` compared with the config's (config/example.toml, read once);
3. dedupe on e-mail: ``SET peer:dup:<campaign>:<email> 1 NX EX 30d`` (a duplicate: 200
   ``DUPLICATED``);
4. the campaign's first buyer, from a table built at start-up (no filters, caps,
   schedules, round robin, fees, idempotency, sale record, delivery job, events);
5. one ``EVALSHA`` that debits the buyer's account with a floor check and writes one
   ledger ``XADD`` (:data:`DEBIT`);
6. a pydantic response model.

Invalid bodies get FastAPI's own 422. ``bench ingest --open-loop`` drives it with the same
load generator, bodies and concurrency as leadflow, pinned to the same CPU, in the same run.
"""

from __future__ import annotations

import os
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

CONFIG = Path(__file__).resolve().parent.parent / "config" / "example.toml"
DEDUPE_TTL_S = 30 * 86_400
OPENING_MICROS = 10_000_000 * 1_000_000  # funded like the leadflow run
FLOOR_MICROS = -20_000_000

# KEYS: account hash, ledger stream; ARGV: price (micros), lead id, buyer, ts
DEBIT = """
local bal = tonumber(redis.call('HGET', KEYS[1], 'bal') or '0')
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '0')
local price = tonumber(ARGV[1])
if bal - price < floor then return false end
bal = redis.call('HINCRBY', KEYS[1], 'bal', -price)
redis.call('XADD', KEYS[2], '*', 'account', KEYS[1], 'delta', -price, 'balance', bal,
           'lead', ARGV[2], 'buyer', ARGV[3], 'ts', ARGV[4])
return bal
"""


class LeadIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    lp_campaign_id: str | int
    lp_supplier_id: str | int
    lp_key: str
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)
    first_name: str | None = Field(default=None, max_length=50)
    last_name: str | None = Field(default=None, max_length=50)
    phone: str | None = Field(default=None, max_length=32)
    state: str | None = Field(default=None, min_length=2, max_length=2)
    zip: str | None = Field(default=None, max_length=10)


class LeadOut(BaseModel):
    status: str
    code: int
    lead_id: str | None = None
    message: str = ""


class Peer:
    def __init__(self) -> None:
        cfg: dict[str, Any] = tomllib.loads(CONFIG.read_text())
        self.keys = {s["id"]: s["key"] for s in cfg["suppliers"]}
        buyers: dict[str, dict[str, Any]] = {}
        for b in sorted(cfg["buyers"], key=lambda b: b.get("priority", 1)):
            buyers.setdefault(b["campaign"], b)
        # campaign -> (buyer id, account key, price in micros)
        self.route = {c: (b["id"], f"peer:acct:{b['client']}",
                          round(float(b["price"]) * 1_000_000))
                      for c, b in buyers.items()}
        self.redis = aioredis.from_url(os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1"))
        self.sha = ""

    async def start(self) -> None:
        self.sha = await self.redis.script_load(DEBIT)
        for _, account, _ in self.route.values():
            await self.redis.hset(account, mapping={"bal": OPENING_MICROS,
                                                    "floor": FLOOR_MICROS})


peer = Peer()


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await peer.start()
    yield
    await peer.redis.aclose()


app = FastAPI(lifespan=_lifespan)


@app.post("/v1/leads", response_model=LeadOut)
async def post_lead(lead: LeadIn) -> LeadOut:
    campaign, supplier = str(lead.lp_campaign_id), str(lead.lp_supplier_id)
    if peer.keys.get(supplier) != lead.lp_key:
        raise HTTPException(status_code=401, detail="unknown supplier or wrong lp_key")
    route = peer.route.get(campaign)
    if route is None:
        raise HTTPException(status_code=404, detail="unknown campaign")
    fresh = await peer.redis.set(f"peer:dup:{campaign}:{lead.email.lower()}", 1, nx=True,
                                 ex=DEDUPE_TTL_S)
    if not fresh:
        return LeadOut(status="DUPLICATED", code=100, message="duplicate")
    buyer, account, price = route
    lead_id = uuid.uuid4().hex
    bal = await peer.redis.evalsha(peer.sha, 2, account, "peer:ledger", price, lead_id, buyer,
                                   int(time.time() * 1000))
    if bal is None:  # below the floor: nothing written
        return LeadOut(status="REJECTED", code=202, lead_id=lead_id, message="no funds")
    return LeadOut(status="ACCEPTED", code=0, lead_id=lead_id)

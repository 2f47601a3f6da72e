"""Sync mode (``mode = "sync"``): the seller's response waits for a buyer's verdict.

Only :class:`~engine.ingest.ingest.Ingest` calls this, and only for sync campaigns (one
``plan.sync`` test on the async path, which never runs any of this). For one lead, within
``now + campaign.sync_deadline_ms``:

1. **Claims** (one Lua call): a ``SYNC`` claim in ``keys.dstate(lead)`` for every candidate
   buyer with a webhook, written *before* the sale, so the stream worker, which may read
   the delivery job the moment decide.lua adds it, defers it instead of sending it too.
   Nothing is claimed when the lead's idempotency record exists (a replay).
2. **Try n**: decide.lua sells the lead to the next eligible buyer (its own atomic debit,
   caps, floor, ledger entries and delivery job), then :func:`deliver_sync` sends it once.
   Try 1 is the lead as ingest built it; try n > 1 uses a derived idempotency key
   (``k:lead_id:n``), ``fi = 0`` (the inbound fee is charged once per lead, by try 1),
   the campaign-dedupe check again (the previous try's refund forgot the fingerprints it
   had marked: only a duplicate sold meanwhile stops it) and the candidates minus every
   buyer already tried (round-robin positions remapped). The lead
   id is the same in every try; sale records are per (lead, buyer). A try n > 1 that
   fails inside decide.lua (ERROR 1050, taken back whole) skips the buyer it was on.
3. **Verdict**: ACCEPTED ends the waterfall (code 0, with a real-time price if any).
   REJECTED or DUPLICATED was already refunded by :func:`deliver_sync` (price and outbound
   fee back, cap slot freed), and so was a try without a verdict (timeout, 5xx, 429,
   network error): it is recorded FAILED, so the stream worker never sends it again. Then
   try n + 1 follows, while at least ``MIN_TRY_MS`` (250 ms) are left before the deadline.
4. **No buyer accepted**: REJECTED code 204 when no buyer is left to try, 205 when the
   deadline passed first. Buyers pay nothing; the inbound fee stays charged, as for any
   valid lead no buyer took; the campaign-dedupe fingerprints of the lead are forgotten
   (only sold leads count as duplicates). The seller gets ACCEPTED only when a buyer
   accepted.
5. **Final record** (one Lua call): the final result overwrites the lead's idempotency
   record ``keys.idem(k)``, so a replay returns it; the derived keys are deleted and the
   claims of buyers never sold are released.

While the waterfall runs, the idempotency record holds a *pending* result (ACCEPTED code 1
with a ``sy`` field = the claim's end). A replay that finds it waits (polling) until the
final result is written or the claim ends, then returns what is stored. An engine that
dies mid-waterfall thus leaves "ACCEPTED, verdict pending": the sale standing then is
delivered by the worker (its claim expires at the deadline + 2 s). Known gaps: if it died
between a refund and the next try's sale, no sale stands although the record says pending;
the pending record names the buyer of the first try, so after a crash later in the
waterfall a replay can name a buyer that was refunded while another holds the sale. (A try
that outlives its claim, which takes a Redis stall longer than the 2 s grace, finds the
worker's decision recorded first and keeps it: delivery_finish.lua never overwrites one.)
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from engine.core import keys
from engine.core.config import Buyer, Config
from engine.delivery import client
from engine.delivery.client import Endpoint
from engine.delivery.record import (
    STATE_TTL_S,
    SYNC,
    DeliveryDecision,
    Observer,
    decode_decision,
)
from engine.delivery.record import encode_decision as encode_claim
from engine.delivery.sync import CLAIM_GRACE_MS, deliver_sync
from engine.delivery.verdict import BuyerVerdict
from engine.ingest.batcher import Batcher
from engine.ingest.codes import Codes
from engine.routing.plans import CampaignPlan
from engine.store.lua_protocol import (
    Decision,
    LeadCall,
    StoredDecision,
    decode_lead,
    decode_stored,
    encode_decision,
    encode_lead,
)
from engine.store.store import Store, now_ms

ACCEPTED_PENDING = Codes.ACCEPTED_PENDING  # 1: the waterfall is still running (stored only)
ALL_REJECTED = Codes.ALL_REJECTED  # 204: every buyer the lead was sent to rejected it
NO_VERDICT = Codes.NO_VERDICT  # 205: the deadline passed before a buyer accepted
PENDING_MESSAGE = "lead accepted; buyer verdict pending (delivery continues asynchronously)"
_REPLAY_POLL_S = 0.02
# the least time left before the deadline for which a next try is sold and sent: less
# would send the lead to a buyer with no chance to answer (and refund it at once)
MIN_TRY_MS = 250

_payload_dec = msgspec.json.Decoder(dict[str, str])
_enc = msgspec.json.Encoder()


@dataclass(slots=True)
class _Waterfall:
    tried: list[str] = field(default_factory=list)  # buyers sold to, in order
    # idempotency keys of tries 2..n, in order: try n's is derived[n - 2], so every try,
    # skipped ones included, numbers its key len(derived) + 2 (never one a try used)
    derived: list[str] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)  # buyers whose try failed (ERROR 1050)
    marked: bool = False  # the pending record was written


class SyncRouter:
    """Sync-mode routing of one engine process: the buyers' endpoints (rebuilt when the
    config changes) and the process's one client session, which the service owns (it
    opens it at start and closes it at stop) and shares with the delivery worker."""

    def __init__(
        self, store: Store, *, session: aiohttp.ClientSession | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self.observer = observer
        self._session = session
        self._own_session = False  # True once start() opened one itself (tests)
        self._cfg: Config | None = None
        self._buyers: dict[tuple[str, str], Buyer] = {}
        self._endpoints: dict[tuple[str, str], Endpoint] = {}

    async def start(self) -> None:
        if self._session is None:
            self._session = client.new_session()
            self._own_session = True

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session, self._own_session = None, False

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The process's client session (ping-post bid requests share it)."""
        return self._session

    def endpoint(self, cfg: Config, tenant: str, buyer: str) -> Endpoint | None:
        """The buyer's webhook endpoint, or None when it has none (sold = delivered)."""
        if cfg is not self._cfg:
            self._cfg = cfg
            self._buyers = {(b.tenant, b.id): b for b in cfg.buyers}
            self._endpoints = {}
        ep = self._endpoints.get((tenant, buyer))
        if ep is None:
            b = self._buyers.get((tenant, buyer))
            if b is None or b.delivery is None:
                return None
            ep = self._endpoints[(tenant, buyer)] = Endpoint(b)
        return ep

    async def decide(
        self, batcher: Batcher, cfg: Config, plan: CampaignPlan, encoded: bytes,
        payload: bytes,
    ) -> Decision:
        """The final decision of one lead of a sync campaign (see the module docs).

        ``encoded`` is decide.lua's lead JSON (a :class:`LeadCall`, candidates inline) as
        the async path sends it; the waterfall derives its later tries from the decoded
        form (not the hot path)."""
        if self._session is None:
            await self.start()
        lead = decode_lead(encoded)
        if lead.test == 1:  # test leads: a decision, no sale, no delivery
            return await batcher.decide(encoded, payload)
        assert self._session is not None
        tenant, lead_id = plan.tenant, lead.id
        prefix = keys.tenant_prefix(tenant)
        deadline = now_ms() + plan.campaign.sync_deadline_ms
        hold = deadline + CLAIM_GRACE_MS
        hooked = [c.buyer for c in lead.inline()
                  if self.endpoint(cfg, tenant, c.buyer) is not None]
        mine: list[str] = []
        if hooked:
            claim = encode_claim(DeliveryDecision(SYNC, "sync waterfall", u=hold))
            got = await self.store.lua.sync_claim(self.store.redis, [prefix], [
                lead_id, lead.key, claim, STATE_TTL_S, lead.key2 or "", *hooked])
            mine = [b.decode() if isinstance(b, bytes) else str(b) for b in got]
        d = await batcher.decide(encoded, payload)
        if d.replay:
            # A concurrent twin decided first, and its waterfall may be delivering to a buyer
            # we claimed: releasing our claims could let the stream worker send that lead as
            # well. They are left to expire (``hold``): on buyers the twin never sells to
            # there is no job to hold back, and the twin's deliver_sync settles the others.
            return await self._replayed(tenant, lead, d)
        w = _Waterfall()
        try:
            final = await self._waterfall(w, batcher, cfg, plan, lead, payload, d, deadline,
                                          hold)
        except BaseException:  # e.g. Redis gone: free the buyers never sold, then fail
            release = [b for b in mine if b not in w.tried]
            if release:
                with contextlib.suppress(Exception):
                    await self._finish(prefix, lead, "", release, w.derived, [])
            raise
        forget = list(lead.dedupe) if final.code in (ALL_REJECTED, NO_VERDICT) else []
        record = encode_decision(_plain(final)).decode() if w.marked else ""
        release = [b for b in mine if b not in w.tried]
        if record or release or w.derived or forget:
            await self._finish(prefix, lead, record, release, w.derived, forget)
        return final

    async def _waterfall(
        self, w: _Waterfall, batcher: Batcher, cfg: Config, plan: CampaignPlan,
        lead: LeadCall, payload: bytes, d: Decision, deadline: int, hold: int,
    ) -> Decision:
        """Steps 2-4: deliver each sale, sell to the next buyer on a rejection."""
        assert self._session is not None
        tenant, lead_id = plan.tenant, lead.id
        values = _payload_dec.decode(payload)
        while True:
            if d.status == "ERROR" and w.tried and d.buyer:
                # try n failed inside decide.lua and was taken back whole (the batcher
                # logged why): the buyer it was on is skipped, as a paused one would be
                w.skipped.add(d.buyer)
                d, final = await _next(w, batcher, lead, payload, deadline)
                if final:
                    return d
                continue
            if d.status != "ACCEPTED" or not d.buyers:
                return d if not w.tried else _all_rejected(lead_id, len(w.tried))
            buyer, price_s = d.buyers[0]
            price = int(price_s)
            w.tried.append(buyer)
            ep = self.endpoint(cfg, tenant, buyer)
            if ep is None:  # no webhook: the lead is delivered by being sold
                return _accepted(lead_id, buyer, price)
            if not w.marked:  # from now on a replay waits for the final result
                w.marked = True
                await self.store.redis.set(
                    keys.idem(tenant, lead.key),
                    encode_decision(_pending(lead_id, buyer, price, hold)), ex=lead.key_ttl)
            v = await deliver_sync(self.store, self._session, ep, lead_id=lead_id,
                                   lead=values, price=price, deadline_ms=deadline,
                                   campaign=plan.id, observer=self.observer, claimed=True)
            if v is not None and v.outcome is BuyerVerdict.ACCEPTED:
                return _accepted(lead_id, buyer, price if v.price is None else v.price)
            # rejected, duplicate or no verdict: refunded by deliver_sync; the next buyer
            d, final = await _next(w, batcher, lead, payload, deadline)
            if final:
                return d

    async def _finish(self, prefix: str, lead: LeadCall, record: str, release: list[str],
                      derived: list[str], forget: list[str]) -> None:
        arg = {"k": lead.key, "r": record, "kt": lead.key_ttl, "lead": lead.id,
               "rel": release, "del": derived, "fp": forget}
        await self.store.lua.sync_final(self.store.redis, [prefix], [_enc.encode(arg)])

    async def _replayed(self, tenant: str, lead: LeadCall, d: Decision) -> Decision:
        """A replay: the stored result, once the waterfall that writes it has finished.

        It is running while the record is marked pending (``sy`` in the future) or, before
        the mark is written, while the lead still has live SYNC claims (released in the same
        Lua call that writes the final record)."""
        while True:
            raw = await self._record(tenant, lead)
            if raw is None:
                return d
            stored = decode_stored(raw)
            now = now_ms()
            running = (now < stored.claims_until if stored.claims_until
                       else await self._claimed(tenant, stored.id))
            if not running:
                return Decision(id=stored.id, status=stored.status, code=stored.code,
                                message=stored.message, sold=stored.sold, test=stored.test,
                                replay=True)
            await asyncio.sleep(_REPLAY_POLL_S)

    async def _record(self, tenant: str, lead: LeadCall) -> bytes | None:
        """The lead's idempotency record, by its key or else its payload's (decide.lua: a
        value that is not a JSON object points to the key holding the record)."""
        for key in (lead.key, lead.key2):
            if not key:
                continue
            raw: Any = await self.store.redis.get(keys.idem(tenant, key))
            if raw is not None and not raw.startswith(b"{"):
                raw = await self.store.redis.get(keys.idem(tenant, raw.decode()))
            if raw is not None:
                return bytes(raw)
        return None

    async def _claimed(self, tenant: str, lead_id: str) -> bool:
        now = now_ms()
        for raw in await self.store.redis.hvals(keys.dstate(tenant, lead_id)):
            claim = decode_decision(raw)
            if claim is not None and claim.o == SYNC and claim.u > now:
                return True
        return False


def _all_rejected(lead_id: str, tried: int) -> Decision:
    return Decision(id=lead_id, status="REJECTED", code=ALL_REJECTED,
                    message=f"every buyer rejected the lead ({tried} tried)")


def _no_verdict(lead_id: str, tried: int) -> Decision:
    return Decision(id=lead_id, status="REJECTED", code=NO_VERDICT,
                    message=f"no buyer accepted the lead before the deadline ({tried} tried)")


def _accepted(lead_id: str, buyer: str, price: int) -> Decision:
    return Decision(id=lead_id, status="ACCEPTED", code=0, sold=[[buyer, str(price)]])


def _pending(lead_id: str, buyer: str, price: int, until: int) -> StoredDecision:
    return StoredDecision(id=lead_id, status="ACCEPTED", code=ACCEPTED_PENDING,
                          message=PENDING_MESSAGE, sold=[[buyer, str(price)]],
                          claims_until=until)


def _plain(d: Decision) -> Decision:
    """The final record: decide.lua's shape, without a pending marker."""
    return Decision(id=d.id, status=d.status, code=d.code, message=d.message, sold=d.buyers,
                    test=d.test)


async def _next(w: _Waterfall, batcher: Batcher, lead: LeadCall, payload: bytes,
                deadline: int) -> tuple[Decision, bool]:
    """The next try's decision (without the buyers tried or skipped, under a key of its
    own), or (True) the final answer when no candidate is left, or no time for a try
    (a lead sold then would only be refunded)."""
    nxt = _next_try(lead, set(w.tried) | w.skipped, len(w.derived) + 2)
    if not nxt.candidates:
        return _all_rejected(lead.id, len(w.tried)), True
    if deadline - now_ms() < MIN_TRY_MS:
        return _no_verdict(lead.id, len(w.tried)), True
    w.derived.append(nxt.key)
    return await batcher.decide(encode_lead(nxt), payload), False


def _next_try(lead: LeadCall, tried: set[str], n: int) -> LeadCall:
    """Try n of a lead: the candidates not tried yet, no second inbound fee, a derived
    idempotency key. The campaign fingerprints are checked and marked again: the refund
    of the previous try forgot them (no sale of the lead stood), so only a real duplicate
    sold meanwhile stops the waterfall, and a sale now marks them for this lead."""
    cs = lead.inline()
    keep = [i for i, c in enumerate(cs) if c.buyer not in tried]
    pos = {old + 1: new + 1 for new, old in enumerate(keep)}
    return msgspec.structs.replace(
        lead, key=f"{lead.key}:{lead.id}:{n}", fee_in=0, more=0,
        candidates=[cs[i] for i in keep], rotation=[pos.get(x, 0) for x in lead.rotation],
        # the payload's pointer leads to try 1's key, which holds the result
        key2=None, key2_ttl=None)

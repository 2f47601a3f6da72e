"""Ping-post (docs/pingpost.md): ``POST /v1/ping`` collects bids and holds the bidders'
funds; ``POST /v1/post`` sells the full lead to the held bidder(s).

Ping: the seller's credentials and the campaign's ping fields are checked as a direct
post's fields are; the buyers eligible now (filters on the ping fields, schedule, status,
pause, breaker, caps, funds: available balance at or above floor + the least bid it
could place) are asked in parallel on the process's one client session, each within its
own ``ping.timeout_ms`` and all within the campaign's ``ping_deadline_ms`` (a fixed-price
buyer bids its price, no request). Bids under ``min_bid`` are dropped; the rest are ranked
(bid high to low, then buyer priority, then buyer id) and go to ping_hold.lua, which holds
each one iff the buyer's available balance stays at or above its floor, charges the ping's
fees and records the ping, in one step. The seller is offered the first held bid
(exclusive) or the first ``sell_limit`` (shared), each at the bid less the margin.

Post: the full lead is validated as a direct post (the same idempotency rules), must agree
with the ping's values of the ping fields, and is decided by decide.lua as a lead whose
candidates are the held bidders at their bids, in auction order (shared: the bids the
seller accepts). decide.lua releases each candidate's hold just before it tries it, so the
sale debits money that was kept available. An exclusive post to buyers with webhooks goes
through the sync waterfall: a winner that rejects is refunded and the next held bidder is
tried. At the end the ping's other holds are released (ping_release.lua).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from engine.core import keys, money
from engine.core.config import Buyer, Config, Margin
from engine.core.constants import WALLET
from engine.core.errors import StoreUnavailable
from engine.delivery.bid import BidReader, ask
from engine.delivery.client import new_session
from engine.ingest.batcher import Batcher
from engine.ingest.codes import Codes, LeadResponse, error
from engine.ingest.ingest import (
    MAX_FIELDS,
    Answer,
    Ingest,
    Pending,
    authenticate,
    digest,
    id_text,
    lead_response,
    new_lead_id,
    refused,
    subid_errors,
    window_ids,
)
from engine.routing.fields import CampaignSchema, FieldError
from engine.routing.plans import HASH_HEX, BuyerPlan, CampaignPlan
from engine.routing.runtime import Runtime, SupplierPlan
from engine.routing.schedule import WindowClock
from engine.store.lua_protocol import Candidate, Decision, decode_lead, encode_lead
from engine.store.store import UNAVAILABLE, Store, now_ms

if TYPE_CHECKING:
    from engine.ingest.waterfall import SyncRouter

PING_KEEP_S = 86_400  # a ping's record outlives its expiry by this (a late post: 1064)
CONTROL = ("lp_campaign_id", "lp_supplier_id", "lp_key", "lp_action", "lp_subid1",
           "lp_subid2", "lp_ping_id", "bid_ids")
# (event, campaign, label, count): "ping" and "post" (label: the answer's status, lower
# case; replays are not counted), "bid" (bid | no_bid | timeout | error | ineligible),
# "hold" (placed | settled | released; expired: the sweep and the scripts' events)
PingObserver = Callable[[str, str, str, int], None]
# (campaign, buyer, outcome, seconds): one bid request sent to a ping buyer, its outcome
# (bid | no_bid | timeout | error; cut off at the ping's deadline: timeout) and latency
BidObserver = Callable[[str, str, str, float], None]
_enc = msgspec.json.Encoder()
_meta_dec = msgspec.json.Decoder(dict[str, Any])
_BUYER_FIELDS = ("paused", "hid", "hn", "did", "dn", "wid", "wn", "mid", "mn", "tn",
                 "sdid", "sdv", "smid", "smv")
_PAUSED = _BUYER_FIELDS[:1]  # a buyer without a cap today: its counters are not read
_ACCT_FIELDS = ("bal", "floor", "mode", "paused", "closed", "held")


class PingResponse(msgspec.Struct, omit_defaults=True):
    status: str  # ACCEPTED | REJECTED | DUPLICATED | ERROR
    code: int
    message: str = ""
    ping_id: str | None = None
    bids: list[dict[str, str]] = []
    expires_at: str | None = None
    test: bool = False
    errors: list[FieldError] = []


def ping_error(code: int, message: str, errors: list[FieldError] | None = None
               ) -> PingResponse:
    return PingResponse(status="ERROR", code=code, message=message, errors=errors or [])


def offer(bid: int, margin: Margin | None) -> int:
    """The price offered to the seller: the bid less the margin (percent rounded so that
    the tenant's cut is never more than the percent; integer micros only)."""
    if margin is None:
        return bid
    if margin.percent is not None:
        return bid - bid * money.parse_percent(margin.percent) // 10_000
    if margin.fixed is not None:
        return bid - money.parse(margin.fixed)
    return bid


def rank(bids: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Auction order of (bid, priority, buyer id): the higher bid, then the buyer's
    priority (lower first), then the buyer id (lexical): deterministic."""
    return sorted(bids, key=lambda b: (-b[0], b[1], b[2]))


def _over_cap(caps: tuple[int, ...], state: list[str], win: list[str], price: int) -> bool:
    """decide.lua's over_cap on a buyer hash read (``_BUYER_FIELDS`` order)."""
    def used(idf: int, nf: int, w: str) -> int:
        return int(state[nf] or 0) if state[idf] == w else 0

    def over(limit: int, n: int) -> bool:
        return limit >= 0 and n >= limit

    def spend(limit: int, n: int) -> bool:
        return limit >= 0 and n + price > limit

    return (over(caps[0], used(1, 2, win[0])) or over(caps[1], used(3, 4, win[1]))
            or over(caps[2], used(5, 6, win[2])) or over(caps[3], used(7, 8, win[3]))
            or over(caps[4], int(state[9] or 0)) or spend(caps[5], used(10, 11, win[1]))
            or spend(caps[6], used(12, 13, win[3])))


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


class _Bidder:
    __slots__ = ("acct_key", "breaker_key", "buyer", "buyer_key", "config", "plan", "reader")

    def __init__(self, plan: BuyerPlan, config: Buyer) -> None:
        self.plan, self.config, self.buyer = plan, config, plan.id
        assert config.ping is not None
        self.reader = BidReader(config.ping) if config.ping.url else None
        # the keys its eligibility reads, built once (not per ping)
        self.buyer_key = keys.buyer(config.tenant, plan.id)
        self.breaker_key = keys.breaker(config.tenant, plan.id)
        self.acct_key = keys.acct(config.tenant, plan.account)


class PingPost:
    """The ping and post handlers of one engine process."""

    def __init__(self, runtime: Callable[[], Runtime], store: Store,
                 batcher: Callable[[str], Batcher], ingest: Ingest,
                 sync: SyncRouter | None = None, *,
                 observer: PingObserver | None = None,
                 bids: BidObserver | None = None) -> None:
        self._runtime, self.store, self._batcher = runtime, store, batcher
        self.ingest, self.sync = ingest, sync
        self.observer, self.bids = observer, bids
        self._clock = WindowClock()
        self._cfg: Config | None = None
        self._bidders: dict[str, list[_Bidder]] = {}  # campaign -> ping buyers
        self._schemas: dict[str, CampaignSchema] = {}
        self._own_session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None

    def _session(self) -> aiohttp.ClientSession:
        if self.sync is not None and self.sync.session is not None:
            return self.sync.session
        if self._own_session is None:
            self._own_session = new_session()
        return self._own_session

    def _count(self, event: str, campaign: str, label: str, n: int = 1) -> None:
        if self.observer is not None and n:
            self.observer(event, campaign, label, n)

    def _compiled(self, rt: Runtime, plan: CampaignPlan) -> tuple[list[_Bidder], CampaignSchema]:
        if rt.cfg is not self._cfg:
            self._cfg, self._bidders, self._schemas = rt.cfg, {}, {}
        bidders = self._bidders.get(plan.id)
        if bidders is None:
            by_id = {b.id: b for b in rt.cfg.buyers
                     if b.tenant == plan.tenant and b.campaign == plan.id}
            bidders = self._bidders[plan.id] = [
                _Bidder(bp, by_id[bp.id]) for bp in plan.buyers
                if by_id[bp.id].ping is not None]
            pp = plan.campaign.ping_post
            assert pp is not None
            fields = [f for f in plan.campaign.fields if f.name in pp.ping_fields]
            self._schemas[plan.id] = CampaignSchema(fields, source=rt.cfg.source)
        return bidders, self._schemas[plan.id]

    # ---- the seller's credentials, as a direct post's ---------------------------------

    def _seller(self, data: object, rt: Runtime
                ) -> tuple[CampaignPlan, SupplierPlan] | Answer:
        """The seller's credentials, checked as a direct post's (ingest.authenticate), and
        a campaign that takes pings."""
        if not isinstance(data, dict):
            return refused(400, Codes.MALFORMED, "the body must be a JSON object or form fields")
        if len(data) > MAX_FIELDS:
            return refused(400, Codes.TOO_MANY_FIELDS, f"at most {MAX_FIELDS} fields")
        seller = authenticate(data, rt)
        if isinstance(seller, Answer):
            return seller
        plan = seller[0]
        if plan.campaign.ping_post is None:
            return refused(400, Codes.NOT_PING_POST, f"campaign {plan.id!r} takes no pings")
        return seller

    # ---- POST /v1/ping -----------------------------------------------------------------

    async def ping(self, data: object, raw: bytes, idempotency_key: str | None = None
                   ) -> tuple[int, PingResponse]:
        rt = self._runtime()
        seller = self._seller(data, rt)
        if isinstance(seller, Answer):
            return seller.http_status, ping_error(seller.response.code, seller.response.message)
        plan, supplier = seller
        assert isinstance(data, dict)
        pp = plan.campaign.ping_post
        assert pp is not None
        bidders, schema = self._compiled(rt, plan)
        windows, local = self._clock.get(plan.tz, time.time())
        values, errors = schema.validate(data, today=local.date())
        errors += subid_errors(data)
        hashed = _hashed_values(plan, data, errors)
        if errors:
            names = ", ".join(sorted({e.field for e in errors}))
            return 422, ping_error(Codes.INVALID_FIELDS, f"invalid fields: {names}", errors)
        action = data.get("lp_action")
        test = supplier.test_mode or (isinstance(action, str) and action.lower() == "test")
        tenant = plan.tenant
        ikey = ("q:" + digest(supplier.id, idempotency_key.encode())
                if idempotency_key else "")
        if ikey:  # a replay asks no buyer again
            prior: Any = await self._get(keys.idem(tenant, ikey))
            if prior is not None:
                return self._ping_answer(msgspec.json.decode(prior), plan.id, replay=True)
        if hashed and await self._exists(tenant, plan.hashed_prints(hashed)):
            return self._ping_answer({"s": "DUPLICATED", "c": Codes.DUPLICATED, "t": test,
                                      "m": "duplicate of a lead sold in this campaign"},
                                     plan.id, replay=False)
        ping_id = new_lead_id()
        win = window_ids(windows)
        eligible, dups = await self._eligible(plan, bidders, values, local, win,
                                              windows.weekday, money.parse(pp.min_bid), hashed)
        self._count("bid", plan.id, "ineligible", len(bidders) - len(eligible))
        if dups and not eligible:  # buyer-scope dedupe: every matching buyer bought it
            return self._ping_answer({"s": "DUPLICATED", "c": Codes.ALL_DUPLICATED, "t": test,
                                      "m": "every matching buyer already bought this lead"},
                                     plan.id, replay=False)
        fields = {**values, "ping_id": ping_id, "campaign_id": plan.id}
        if test:
            fields["test"] = "true"
        deadline = time.monotonic() + pp.ping_deadline_ms / 1_000
        got = await self._collect(plan.id, eligible, ping_id, fields, deadline)
        min_bid = money.parse(pp.min_bid)
        ranked = rank([(bid, b.plan.priority, b.buyer) for b, bid in got if bid >= min_bid])
        by_id = {b.buyer: b for b in eligible}
        bids: list[list[Any]] = []
        for n, (bid, _, buyer) in enumerate(ranked):
            b = by_id[buyer]
            price = offer(bid, b.config.ping.margin if b.config.ping and b.config.ping.margin
                          else pp.margin)
            if price < 0:
                continue
            bids.append([buyer, b.plan.account, bid, money.format(price), f"{ping_id}.{n}"])
        fees = rt.tenants[tenant].fees
        sent = sum(1 for b in eligible if b.reader is not None)
        ttl_ms = pp.ping_ttl_s * 1_000
        expires = now_ms() + ttl_ms
        meta = {"s": supplier.id, "c": plan.id, "v": values, "b": bids, "t": 1 if test else 0,
                "sub": {k: str(data[k]) for k in ("lp_subid1", "lp_subid2") if data.get(k)}}
        call = {
            "now": now_ms(), "id": ping_id, "ex": expires, "kt": pp.ping_ttl_s + PING_KEEP_S,
            "w": WALLET, "fi": money.parse(fees.inbound_ping),
            "fo": money.parse(fees.outbound_ping) * sent, "c": plan.id,
            "t": 1 if test else 0, "k": ikey, "kt2": self.ingest.idempotency_ttl_s,
            "n": pp.sell_limit if pp.auction == "shared" else 1,
            "m": _enc.encode(meta).decode(), "xa": _iso(expires),
            "bids": bids,
        }
        res = await self.store.ping_hold(tenant, call)
        if not res.rp and not test:  # (its lazy releases are counted from res.e)
            self._count("hold", plan.id, "placed", len(res.held_list))
        return self._ping_answer(msgspec.to_builtins(res), plan.id, replay=res.rp)

    def _ping_answer(self, r: Mapping[str, Any], campaign: str, *, replay: bool
                     ) -> tuple[int, PingResponse]:
        bids = r.get("bids") or []
        resp = PingResponse(
            status=r["s"], code=int(r["c"]), message=r.get("m") or "",
            ping_id=r.get("id"), bids=[{"bid_id": b["bid_id"], "price": b["price"]}
                                       for b in (bids if isinstance(bids, list) else [])],
            expires_at=r.get("xa") or None, test=int(r.get("t") or 0) == 1)
        if not replay:
            self._count("ping", campaign, resp.status.lower())
        return 200, resp

    async def _get(self, key: str) -> Any:
        try:
            return await self.store.redis.get(key)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc

    async def _exists(self, tenant: str, prints: list[str]) -> bool:
        """Whether any of these dedupe marks exists (a lead sold with those values)."""
        if not prints:
            return False
        try:
            n: Any = await self.store.redis.exists(*(keys.dup(tenant, fp) for fp in prints))
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
        return bool(n)

    async def _eligible(self, plan: CampaignPlan, bidders: list[_Bidder],
                        values: Mapping[str, str], local: Any, win: list[str], weekday: int,
                        min_bid: int, hashed: Mapping[str, Mapping[str, str]]
                        ) -> tuple[list[_Bidder], int]:
        """The ping buyers that may bid now: filters (on the ping fields), schedule and
        status here; pause, breaker, caps, funds and (buyer-scope dedupe, hashed values at
        ping) duplicates from one pipelined read. With the number of buyers left out as
        duplicates."""
        first = [b for b in bidders if b.plan.active and b.plan.schedule.is_open(local)
                 and b.plan.filter.matches(values)]
        if not first:
            return [], 0
        tenant = plan.tenant
        pipe = self.store.redis.pipeline(transaction=False)
        # in order: per buyer its hash (the cap counters only when it has a cap today) and
        # breaker; each account once (buyers often share one); per buyer its dedupe marks
        caps = [b.plan.cap_array(weekday) for b in first]
        for b, limits in zip(first, caps, strict=True):
            pipe.hmget(b.buyer_key, _BUYER_FIELDS if max(limits) >= 0 else _PAUSED)
            pipe.exists(b.breaker_key)
        accounts = list(dict.fromkeys(b.acct_key for b in first))
        for key in accounts:
            pipe.hmget(key, _ACCT_FIELDS)
        if hashed:  # buyer-scope marks of the hashed values (none: EXISTS of none)
            for b in first:
                prints = plan.hashed_prints(hashed, b.plan)
                pipe.exists(*(keys.dup(tenant, fp) for fp in prints or ["-"]))
        try:
            got: list[Any] = await pipe.execute()
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
        n = 2 * len(first)
        read = {key: [_s(x) for x in got[n + j]] for j, key in enumerate(accounts)}
        marks = got[n + len(accounts):]
        out, dups = [], 0
        for i, b in enumerate(first):
            state = [_s(x) for x in got[2 * i]]
            acct = read[b.acct_key]
            least = max(min_bid, b.plan.price if b.reader is None else 1)
            if hashed and marks[i]:
                dups += 1
                continue
            if state[0] or got[2 * i + 1] or not acct[0]:
                continue
            if max(caps[i]) >= 0 and _over_cap(caps[i], state, win, least):
                continue
            if acct[2] != "none":
                floor = int(acct[1]) if acct[1] else -20_000_000
                if acct[3] or acct[4] == "1" or int(acct[0]) - int(acct[5] or 0) - least < floor:
                    continue
            out.append(b)
        return out, dups

    async def _collect(self, campaign: str, eligible: list[_Bidder], ping_id: str,
                       fields: Mapping[str, Any], deadline: float
                       ) -> list[tuple[_Bidder, int]]:
        """Every eligible buyer's bid, asked in parallel within the deadline."""
        out: list[tuple[_Bidder, int]] = []
        tasks: dict[asyncio.Task[tuple[int | None, str, float]], _Bidder] = {}
        outcomes: dict[str, int] = {}  # counted once per outcome, not once per buyer
        pending: set[asyncio.Task[tuple[int | None, str, float]]] = set()
        session = None
        for b in eligible:
            if b.reader is None:
                out.append((b, b.plan.price))
                outcomes["bid"] = outcomes.get("bid", 0) + 1
                continue
            session = session or self._session()
            left_ms = int((deadline - time.monotonic()) * 1_000)
            timeout = min(b.reader.timeout_ms, max(left_ms, 1))
            tasks[asyncio.create_task(ask(session, b.reader, ping_id=ping_id, buyer=b.buyer,
                                          fields=fields, timeout_ms=timeout))] = b
        if tasks:
            sent = time.perf_counter()
            done, pending = await asyncio.wait(
                tasks, timeout=max(deadline - time.monotonic(), 0) + 0.05)
            for t in pending:  # past the deadline: no bid
                t.cancel()
                outcomes["timeout"] = outcomes.get("timeout", 0) + 1
                if self.bids is not None:
                    self.bids(campaign, tasks[t].buyer, "timeout", time.perf_counter() - sent)
            for t in done:
                b = tasks[t]
                bid, outcome, seconds = t.result()
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if self.bids is not None:
                    self.bids(campaign, b.buyer, outcome, seconds)
                if bid is not None:
                    out.append((b, bid))
        for outcome, n in outcomes.items():
            self._count("bid", campaign, outcome, n)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return out

    # ---- POST /v1/post -----------------------------------------------------------------

    async def post(self, data: object, raw: bytes, idempotency_key: str | None = None
                   ) -> tuple[int, LeadResponse]:
        """A post, counted (``post``, by campaign and status) unless its seller was not
        recognised or it is a replay: with the pings, the ping-to-post ratio."""
        status, resp, campaign = await self._post(data, raw, idempotency_key)
        if campaign:
            self._count("post", campaign, resp.status.lower())
        return status, resp

    async def _post(self, data: object, raw: bytes, idempotency_key: str | None
                    ) -> tuple[int, LeadResponse, str]:
        """The post's answer and its campaign ("" when it is not counted)."""
        rt = self._runtime()
        seller = self._seller(data, rt)
        if isinstance(seller, Answer):
            return seller.http_status, seller.response, ""
        plan, supplier = seller
        assert isinstance(data, dict)
        parsed = _post_ids(data)
        if isinstance(parsed[0], int):
            return parsed[0], parsed[1], plan.id
        ping_id, accepted = parsed
        lead_data = {k: v for k, v in data.items() if k not in ("lp_ping_id", "bid_ids")}
        step = self.ingest.prepare(lead_data, raw, idempotency_key)
        if isinstance(step, Answer):
            return step.http_status, step.response, plan.id
        tenant = plan.tenant
        pk = keys.ping(tenant, ping_id)
        try:
            got: Any = await self.store.redis.hmget(pk, ["m", "st", "ex", "a"])
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
        if got[0] is None:
            return 404, error(Codes.UNKNOWN_PING, f"unknown ping {ping_id!r}"), plan.id
        meta = _meta_dec.decode(got[0])
        if meta["c"] != plan.id:
            return (404, error(Codes.UNKNOWN_PING, f"unknown ping {ping_id!r} of this campaign"),
                    plan.id)
        if meta["s"] != supplier.id:
            return (403, error(Codes.PING_SUPPLIER, "the ping was made by another supplier"),
                    plan.id)
        lead = decode_lead(step.lead.json)
        replay = await self._recorded(tenant, lead.key, lead.key2)
        if not replay:
            refusal = _refusal(_s(got[1]), int(got[2] or 0), meta, step.lead.payload)
            if refusal is not None:
                return refusal[0], refusal[1], plan.id
        answer = _meta_dec.decode(got[3]) if got[3] else {}
        offered = [b["bid_id"] for b in answer.get("bids") or []
                   if isinstance(answer.get("bids"), list)]
        shared = plan.campaign.ping_post is not None and (
            plan.campaign.ping_post.auction == "shared")
        if shared and accepted is not None and not replay:
            unknown = [x for x in accepted if x not in offered]
            if unknown:
                return 422, error(Codes.UNKNOWN_BID, "not bids of this ping: "
                                  + ", ".join(unknown)), plan.id
        wanted = set(accepted if shared and accepted is not None else offered)
        holding = {_s(f)[2:] for f in await self._fields(pk) if _s(f).startswith("h:")}
        # a test ping holds nothing: its post is decided (nothing sold) on every bid
        bids = [b for b in meta["b"] if b[0] in holding or replay or meta.get("t") == 1]
        cands = self._candidates(plan, step, bids, wanted, shared)
        test = 1 if meta.get("t") == 1 else lead.test
        lead = msgspec.structs.replace(
            lead, candidates=cands, rotation=[], round_robin=0, test=test,
            sell_limit=max(len(wanted), 1) if shared else 1, ping=ping_id, more=0)
        encoded = encode_lead(lead)
        batcher = self._batcher(tenant)
        hooked = any(self.sync is not None and self.sync.endpoint(rt.cfg, tenant, c.buyer)
                     for c in lead.inline())
        d: Decision = await (
            self.sync.decide(batcher, rt.cfg, plan, encoded, step.lead.payload)
            if not shared and hooked and self.sync is not None
            else batcher.decide(encoded, step.lead.payload))
        if d.status != "ERROR" and not d.replay:
            released = await self.store.ping_release(tenant, ping_id)
            if test != 1:
                self._count("hold", plan.id, "settled", len(d.buyers))
                self._count("hold", plan.id, "released", released)
        return ({Codes.UNKNOWN_PING: 404, Codes.PING_POSTED: 409, Codes.PING_EXPIRED: 410}
                .get(d.code, Pending(plan, supplier, step.lead).outcome(d).http_status),
                lead_response(d, supplier), "" if d.replay else plan.id)

    def _candidates(self, plan: CampaignPlan, step: Pending, bids: list[list[Any]],
                    wanted: set[str], shared: bool) -> list[Candidate | str]:
        """The held bidders (``bids``: those still holding), in auction order, at their
        bids (shared: the accepted ones; exclusive: the winner, then the other held bidders
        as the cascade's)."""
        windows, _ = self._clock.get(plan.tz, time.time())
        plans = {b.id: b for b in plan.buyers}
        offered = [b for b in bids if b[4] in wanted]
        rest = [] if shared else [b for b in bids if b[4] not in wanted]
        out: list[Candidate | str] = []
        for buyer, _, bid, _, _ in [*offered, *rest]:
            bp = plans.get(buyer)
            if bp is None:  # the buyer left the config since the ping: not sold
                continue
            out.append(msgspec.structs.replace(
                bp.candidates[windows.weekday], price=int(bid),
                dedupe=plan.buyer_prints(bp, _payload_values(step.lead.payload))))
        return out

    async def _fields(self, key: str) -> list[Any]:
        try:
            out: list[Any] = await self.store.redis.hkeys(key)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
        return out

    async def _recorded(self, tenant: str, *names: str | None) -> bool:
        for name in names:
            if name and await self._get(keys.idem(tenant, name)) is not None:
                return True
        return False


def _hashed_values(plan: CampaignPlan, data: Mapping[str, Any], errors: list[FieldError]
                   ) -> dict[str, dict[str, str]]:
    """The hashed dedupe values of a ping (``<field>_<alg>``: hex, lower-cased here), by
    algorithm then field; a malformed one is an error. Empty without a campaign dedupe."""
    out: dict[str, dict[str, str]] = {}
    if plan.dedupe is None:
        return out
    for alg in plan.dedupe_hashes:
        for name in plan.dedupe.fields:
            value = data.get(f"{name}_{alg}")
            if value is None or value == "":
                continue
            text = value.strip().lower() if isinstance(value, str) else ""
            if len(text) != HASH_HEX[alg] or text.strip("0123456789abcdef"):
                errors.append(FieldError(f"{name}_{alg}", "invalid_hash",
                                         f"must be the {alg} of the value, "
                                         f"{HASH_HEX[alg]} hex digits"))
                continue
            out.setdefault(alg, {})[name] = text
    return out


def _post_ids(data: Mapping[str, Any]
              ) -> tuple[str, list[str] | None] | tuple[int, LeadResponse]:
    """The post's ping id and accepted bid ids (form: comma-separated), or its refusal."""
    ping_id = id_text(data.get("lp_ping_id"))
    if not ping_id:
        return 422, error(Codes.INVALID_FIELDS, "invalid fields: lp_ping_id", [
            FieldError("lp_ping_id", "required", "is required")])
    accepted = data.get("bid_ids")
    if isinstance(accepted, str):
        accepted = [x for x in accepted.split(",") if x]
    if accepted is not None and not (isinstance(accepted, list) and all(
            isinstance(x, str) for x in accepted)):
        return 422, error(Codes.INVALID_FIELDS, "invalid fields: bid_ids", [
            FieldError("bid_ids", "invalid_type", "a list of bid ids")])
    return ping_id, accepted


def _refusal(st: str, ex: int, meta: Mapping[str, Any], payload: bytes
             ) -> tuple[int, LeadResponse] | None:
    """Why a post (not a replay) of this ping is refused, or None."""
    if st.startswith("posted:"):
        return 409, error(Codes.PING_POSTED, "the ping was already posted")
    if st != "open" or ex <= now_ms():
        return 410, error(Codes.PING_EXPIRED, "the ping expired; ping again")
    values: dict[str, str] = meta["v"]
    new = _payload_values(payload)
    changed = [FieldError(name, "changed", "differs from the ping's value")
               for name in sorted(values) if new.get(name) != values[name]]
    if changed:
        return 422, error(Codes.PING_FIELD_CHANGED, "the post changes ping fields: "
                          + ", ".join(e.field for e in changed), changed)
    return None


def _payload_values(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = msgspec.json.decode(payload, type=dict[str, str])
    return out


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1_000)) + f".{ms % 1000:03d}Z"


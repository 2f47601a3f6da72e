"""Lead ingest: authenticate the seller, validate, route, decide; one lead at a time.

Transport-free: the HTTP layer hands in the decoded body and gets back an HTTP status and
a :class:`LeadResponse`. The request/response shape follows the Lead Prosper direct-post
habit (``lp_campaign_id``, ``lp_supplier_id``, ``lp_key``, ``lp_action=test``, subids).
Response codes are documented in the README ("Response codes").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import itertools
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from engine.ingest.batcher import Batcher
from engine.ingest.codes import Codes, LeadResponse, error
from engine.routing.fields import CONTROL_CHARS, FieldError
from engine.routing.plans import CampaignPlan
from engine.routing.runtime import Runtime, SupplierPlan
from engine.routing.schedule import WindowClock, Windows
from engine.store.lua_protocol import MORE, Candidate, Decision, LeadCall, encode_lead

if TYPE_CHECKING:
    from engine.ingest.waterfall import SyncRouter

MAX_FIELDS = 200
MAX_SUBID = 75
_DUMMY_KEY = secrets.token_bytes(32)  # compared against when the supplier is unknown
# (campaign, supplier, status, seconds, sold [(buyer, price)]), for metrics
LeadObserver = Callable[[str, str, str, float, list[list[str]]], None]
_enc = msgspec.json.Encoder()


class LuaLead(NamedTuple):
    """One lead for the batcher: decide.lua's lead object (an encoded
    :class:`~engine.store.lua_protocol.LeadCall`), its delivery payload, and the entries of the
    call's candidate table its candidates refer to (``"key":{...}``)."""

    json: bytes
    payload: bytes
    candidates: list[bytes]


class Answer(NamedTuple):
    """A request answered without a decision (a refusal), or a decided lead's outcome."""

    http_status: int
    response: LeadResponse
    campaign: str = ""
    supplier: str = ""
    decision: Decision | None = None
    plan: CampaignPlan | None = None


class Pending(NamedTuple):
    """A valid lead, routed, waiting for its decision; ``more``: the lead with every
    eligible buyer, when ``lead`` has only the first of them (decide.lua's MORE)."""

    plan: CampaignPlan
    supplier: SupplierPlan
    lead: LuaLead
    more: Callable[[], LuaLead] | None = None

    def outcome(self, decision: Decision) -> Answer:
        status = 500 if decision.status == "ERROR" else 200
        return Answer(status, lead_response(decision, self.supplier), self.plan.id,
                       self.supplier.id, decision, self.plan)


def _stamp(done: list[float], i: int, _fut: object) -> None:
    done[i] = time.perf_counter()


def refused(
    status: int,
    code: int,
    message: str,
    errors: list[FieldError] | None = None,
    *,
    campaign: str = "",
    supplier: str = "",
) -> Answer:
    return Answer(status, error(code, message, errors), campaign, supplier)


_PROCESS_TAG = secrets.token_hex(4)  # distinguishes engine processes
_sequence = itertools.count()


_stamp_ms: list[Any] = [-1, ""]  # the last epoch ms and its id prefix (leads share it)


def new_lead_id() -> str:
    """Unique and time-ordered: 12 hex digits of epoch ms, a random per-process tag and a
    per-process sequence number (no syscall per lead)."""
    ms = time.time_ns() // 1_000_000
    if ms != _stamp_ms[0]:
        _stamp_ms[0], _stamp_ms[1] = ms, f"{ms:012x}{_PROCESS_TAG}"
    return f"{_stamp_ms[1]}{next(_sequence) & 0xFFFFFF:06x}"


def id_text(value: object) -> str | None:
    """A string, or a JSON integer as its decimal digits (ids and subids); None for
    anything else (a float, a boolean, null, a list, an object)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def authentic(supplier: SupplierPlan | None, key: str) -> bool:
    """``key`` is the supplier's ``lp_key``, compared in constant time (also for an unknown
    supplier, against a dummy key)."""
    expected = supplier.key if supplier is not None else _DUMMY_KEY
    return hmac.compare_digest(key.encode(), expected)  # constant time


def authenticate(data: Mapping[str, Any], rt: Runtime
                 ) -> tuple[CampaignPlan, SupplierPlan] | Answer:
    """The seller's credentials of a post or a ping: its campaign and supplier, or the
    refusal. Lead Prosper's supplier specs type the two ids Numeric and the key Text: an
    id may come as a JSON integer (13424 reaches campaign "13424"), the key only as text."""
    camp_id, sup_id = id_text(data.get("lp_campaign_id")), id_text(data.get("lp_supplier_id"))
    key = data.get("lp_key")
    if not camp_id or not sup_id or not isinstance(key, str):
        return refused(
            400,
            Codes.MISSING_CREDENTIALS,
            "lp_campaign_id and lp_supplier_id (text or an integer) and lp_key (text) "
            "are required",
        )
    plan = rt.campaigns.get(camp_id)
    supplier = rt.suppliers.get(sup_id)
    if not authentic(supplier, key) or supplier is None:
        return refused(401, Codes.UNAUTHORIZED, "unknown supplier or wrong lp_key")
    if plan is None or plan.tenant != supplier.tenant:
        return refused(
            404, Codes.UNKNOWN_CAMPAIGN, f"unknown campaign {camp_id!r}", supplier=sup_id
        )
    if supplier.campaigns and plan.id not in supplier.campaigns:
        return refused(
            403,
            Codes.FORBIDDEN,
            "supplier may not post to this campaign",
            campaign=plan.id,
            supplier=sup_id,
        )
    return plan, supplier


class Ingest:
    def __init__(
        self,
        runtime: Callable[[], Runtime],
        batcher: Callable[[str], Batcher],
        *,
        replay_window_s: int = 60,
        idempotency_ttl_s: int = 86_400,
        observer: LeadObserver | None = None,
        sync: SyncRouter | None = None,
    ) -> None:
        self._runtime, self._batcher = runtime, batcher
        self.sync = sync  # sync-mode campaigns (None: they are routed like async ones)
        self.replay_window_s, self.idempotency_ttl_s = replay_window_s, idempotency_ttl_s
        self._clock = WindowClock()
        self._rng = random.Random()
        self._observer = observer

    async def handle(
        self, data: object, raw: bytes, idempotency_key: str | None = None
    ) -> tuple[int, LeadResponse]:
        started = time.perf_counter()
        step = self.prepare(data, raw, idempotency_key)
        out = step if isinstance(step, Answer) else step.outcome(await self._decision(step))
        if self._observer is not None:
            self._observe(out, time.perf_counter() - started)
        return out.http_status, out.response

    async def handle_many(
        self, leads: Sequence[tuple[object, bytes, str | None]]
    ) -> list[tuple[int, LeadResponse] | Exception]:
        """Each lead decided on its own, as :meth:`handle` decides it, in order; a lead
        whose decision failed (StoreUnavailable, ...) has the exception in its place. The
        batch endpoint's path: every lead is validated and routed first, then all their
        decisions are awaited together, on the batcher's futures, not on a task per lead."""
        started = time.perf_counter()
        steps: list[Answer | Pending] = []
        done: list[float] = []  # when each lead was refused or its decision arrived
        for lead in leads:
            steps.append(self.prepare(*lead))
            done.append(time.perf_counter())
        waits: list[asyncio.Future[Decision]] = []
        for i, step in enumerate(steps):
            if isinstance(step, Pending):
                fut = asyncio.ensure_future(self._decision(step))
                fut.add_done_callback(functools.partial(_stamp, done, i))
                waits.append(fut)
        decided = iter(await asyncio.gather(*waits, return_exceptions=True))
        out: list[tuple[int, LeadResponse] | Exception] = []
        for step, finished in zip(steps, done, strict=True):
            if isinstance(step, Answer):
                outcome = step
            else:
                decision = next(decided)
                if isinstance(decision, Exception):
                    out.append(decision)
                    continue
                if isinstance(decision, BaseException):  # CancelledError: not ours to keep
                    raise decision
                outcome = step.outcome(decision)
            if self._observer is not None:
                self._observe(outcome, finished - started)
            out.append((outcome.http_status, outcome.response))
        return out

    def _observe(self, out: Answer, seconds: float) -> None:
        assert self._observer is not None
        d = out.decision
        sold = d.buyers if d is not None and not d.replay and d.test != 1 else []
        self._observer(out.campaign, out.supplier, out.response.status, seconds, sold)

    def _decision(self, step: Pending) -> Awaitable[Decision]:
        """The lead's decision: the batcher's future, or the sync waterfall."""
        plan, lead = step.plan, step.lead
        batcher = self._batcher(plan.tenant)
        if plan.sync and self.sync is not None:  # waits for the buyers' verdicts
            return self.sync.decide(batcher, self._runtime().cfg, plan, lead.json, lead.payload)
        if step.more is not None:
            return _decided(batcher, plan, lead, step.more)
        return batcher.submit(*lead)

    def prepare(self, data: object, raw: bytes, idempotency_key: str | None
                ) -> Answer | Pending:
        """Everything before the decision: a refusal, or the lead ready for decide.lua
        (the ping-post post, engine.ingest.pingpost, starts from it too)."""
        if not isinstance(data, dict):
            return refused(400, Codes.MALFORMED, "the body must be a JSON object or form fields")
        if len(data) > MAX_FIELDS:
            return refused(400, Codes.TOO_MANY_FIELDS, f"at most {MAX_FIELDS} fields")
        seller = authenticate(data, self._runtime())
        if isinstance(seller, Answer):
            return seller
        return self._route(data, raw, idempotency_key, *seller)

    def _route(
        self,
        data: dict[str, Any],
        raw: bytes,
        idempotency_key: str | None,
        plan: CampaignPlan,
        supplier: SupplierPlan,
    ) -> Answer | Pending:
        windows, local = self._clock.get(plan.tz, time.time())
        values, errors = plan.schema.validate(data, today=local.date())
        if "lp_subid1" in data or "lp_subid2" in data or "lp_action" in data:
            errors += subid_errors(data)  # the fields it reads: most leads have none
        if errors:
            names = ", ".join(sorted({e.field for e in errors}))
            return refused(
                422,
                Codes.INVALID_FIELDS,
                f"invalid fields: {names}",
                errors,
                campaign=plan.id,
                supplier=supplier.id,
            )
        action = data.get("lp_action")  # checked above: absent, "" or test in any case
        test = supplier.test_mode or (isinstance(action, str) and action.lower() == "test")
        lead_id = new_lead_id()
        return Pending(plan, supplier, *self._lua_lead(
            plan, values, data, lead_id, test, windows, local, raw, supplier, idempotency_key
        ))

    def _lua_lead(
        self,
        plan: CampaignPlan,
        values: dict[str, str],
        data: Mapping[str, Any],
        lead_id: str,
        test: bool,
        windows: Windows,
        local: Any,
        raw: bytes,
        supplier: SupplierPlan,
        idempotency_key: str | None,
    ) -> tuple[LuaLead, Callable[[], LuaLead] | None]:
        """The lead as decide.lua's JSON (a :class:`LeadCall`), already encoded, its
        delivery payload and its candidates for the call's table: per-buyer parts that only
        change with the weekday are pre-encoded on the plan, so a lead costs two small
        encodes. A sync campaign's candidates are inline: its waterfall edits them
        (engine.ingest.waterfall). A lead routed with the first of more eligible buyers
        (:meth:`CampaignPlan.route_first`) comes with how to make it with all of them."""
        order, rest = plan.route_first(values, local, self._rng)
        payload = {**values, "lead_id": lead_id, "campaign_id": plan.id}
        for sub in ("lp_subid1", "lp_subid2"):
            if data.get(sub):
                payload[sub] = str(data[sub])
        table: list[bytes] = []
        bd: list[list[str]] | None = None
        cs: list[Candidate | str]
        if plan.sync:
            cs = plan.inline_candidates(order, values, windows.weekday)
        else:
            cs, bd, table = plan.candidate_refs(order, values, windows.weekday)
        pkey = "p:" + digest(supplier.id, raw)
        # at most 15 keywords: more and CPython calls through a dict (**kwargs), which
        # costs a msgspec Struct about 0.5 us; the optional fields are set after
        lead = LeadCall(
            id=lead_id,
            key=pkey,
            key_ttl=self.replay_window_s,
            test=1 if test else 0,
            campaign=plan.id,
            fee_in=plan.fee_in,
            sell_limit=plan.sell_limit,
            round_robin=1 if plan.rotating else 0,
            rotation=plan.rotation(order) if plan.rotating else [],
            dedupe=plan.campaign_prints(values),
            dedupe_ttl=plan.dedupe_ttl_s,
            windows=window_ids(windows),
            candidates=cs,
            supplier=supplier.id,
        )
        if idempotency_key:  # both rules: the same key, or the same payload in the window
            lead.key = "h:" + digest(supplier.id, idempotency_key.encode())
            lead.key_ttl, lead.key2, lead.key2_ttl = (
                self.idempotency_ttl_s, pkey, self.replay_window_s)
        if bd is not None:
            lead.buyer_dedupe = bd
        encoded = _enc.encode(payload)
        if rest is None:
            return LuaLead(encode_lead(lead), encoded, table), None
        lead.more = 1

        def every_buyer() -> LuaLead:  # the same lead, every eligible buyer in order
            plan.needed_more(len(order))
            cs, lead.buyer_dedupe, table = plan.candidate_refs(
                order + list(rest), values, windows.weekday)
            lead.candidates, lead.more = cs, 0
            return LuaLead(encode_lead(lead), encoded, table)

        return LuaLead(encode_lead(lead), encoded, table), every_buyer


async def _decided(batcher: Batcher, plan: CampaignPlan, lead: LuaLead,
                   more: Callable[[], LuaLead]) -> Decision:
    """The decision of a lead routed with the first of its eligible buyers: when they
    could not take it (MORE: decide.lua wrote and stored nothing), of the lead with every
    one of them (``more`` also widens the campaign's next leads). The second try is a
    new call: leads of the first call after this one were decided before it (the order
    the README's batch endpoint documents)."""
    decision = await batcher.submit(*lead)
    if decision.status == MORE:
        decision = await batcher.submit(*more())
    return decision


@functools.lru_cache(maxsize=64)
def window_ids(w: Windows) -> list[str]:
    return [str(w.hour), str(w.day), str(w.week), str(w.month)]


def digest(scope: str, data: bytes) -> str:
    """Idempotency key of ``data`` within ``scope`` (a supplier): the scope comes first and
    ends with a NUL, which ids cannot contain, so ("1", "15...") never meets ("11", "5...").
    The hash of the scope is made once per scope and copied."""
    h = _scope_hash(scope).copy()
    h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=1024)
def _scope_hash(scope: str) -> hashlib.blake2b:
    return hashlib.blake2b(scope.encode() + b"\x00", digest_size=16, person=b"leadflow-idem")


def subid_errors(data: Mapping[str, Any]) -> list[FieldError]:
    """Subids (text up to 75 characters, no control characters: they go to buyers) and
    ``lp_action`` (absent, or ``test``: a mistyped test flag must not become a sale)."""
    out = []
    for name in ("lp_subid1", "lp_subid2"):
        value = data.get(name)
        if value is None:
            continue
        text = id_text(value)
        if text is None or len(text) > MAX_SUBID:
            out.append(
                FieldError(
                    field=name,
                    code="too_long" if text else "invalid_type",
                    message=f"{name} must be text of at most {MAX_SUBID} characters",
                )
            )
        elif CONTROL_CHARS.search(text):
            out.append(FieldError(name, "invalid_text", "must not contain control characters"))
    action = data.get("lp_action")
    if action is not None and not (isinstance(action, str) and action.lower() in ("", "test")):
        out.append(FieldError("lp_action", "invalid_value",
                              'lp_action must be "test" or absent'))
    return out


_MESSAGES = {"ACCEPTED": "lead accepted"}


def lead_response(d: Decision, supplier: SupplierPlan) -> LeadResponse:
    if d.status == "ERROR":  # nothing stored under the lead id: a retry gets a new one
        return LeadResponse(status="ERROR", code=d.code, message=d.message, test=d.test == 1)
    return LeadResponse(
        status=d.status,
        code=d.code,
        message=d.message or _MESSAGES.get(d.status, ""),
        lead_id=d.id,
        payout=supplier.payout if d.status == "ACCEPTED" else None,
        test=d.test == 1,
    )

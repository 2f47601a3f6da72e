"""decide.lua's wire format: what the engine sends it and what it answers, defined once.

decide.lua (``engine/store/lua/decide.lua``) decides, meters and records a micro-batch of leads
of one tenant in one call. Its KEYS and ARGV are:

* ``KEYS[1]``: the tenant key prefix (``keys.tenant_prefix``); every key it touches
  derives from it (one Redis Cluster slot).
* ``ARGV[1]``: a :class:`Call`, as JSON; ``ARGV[1 + i]``: lead ``i``'s delivery payload
  (its :attr:`LeadCall.payload`) when the lead does not carry it inline (the engine never
  inlines it: no JSON-in-JSON to escape in Python nor to scan in cjson).

It answers a :class:`Reply`, as JSON. Each lead's :class:`Decision` is also stored under
the lead's idempotency key, so a replay returns it verbatim (with ``rp`` set) and changes
nothing; the sync waterfall (``engine.ingest.waterfall``) overwrites that record with a
:class:`StoredDecision` while it runs and with its final :class:`Decision` at the end.

Every object is a msgspec Struct whose attributes have readable names and whose JSON
keys are the short ones the script reads (``msgspec.field(name=...)``): a new field is
one attribute here and its use in Lua. This module imports nothing of the engine, so it
can sit below every layer that builds or reads the format.

The hot path keeps its pre-encoded parts behind this module: a buyer's candidate object
is encoded once per plan and weekday (:func:`table_entry`), and a call joins its leads'
JSON, each encoded when the lead was routed (:func:`encode_lead`), into the envelope
(:func:`encode_call`) without decoding them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from msgspec import field

__all__ = [
    "MORE",
    "Call",
    "Candidate",
    "CapLimits",
    "Decision",
    "LeadCall",
    "Reply",
    "StoredDecision",
    "decode_lead",
    "decode_reply",
    "decode_stored",
    "encode_call",
    "encode_decision",
    "encode_lead",
    "table_entry",
]

MORE = "MORE"
"""A :class:`Decision`'s status for a lead given :attr:`LeadCall.more`: decided again."""

NO_CAP = -1
"""A :attr:`Candidate.caps` limit that is not set (decide.lua: a negative limit is none)."""

CapLimits = tuple[int, int, int, int, int, int, int]
"""A candidate's caps: leads per hour, day, week, month and in total, then spend per day
and per month (micros); :data:`NO_CAP` for none. Hour, day, week and month count within
the lead's :attr:`LeadCall.windows` (decide.lua keeps a window id beside each count)."""


class Candidate(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A buyer a lead may be sold to: one item of a lead's ``cs`` (inline), or one
    object of the call's candidate table (``c``), referred to by its key from ``cs``.

    A table object is shared by the call's leads, so it never carries a lead's own parts:
    its buyer-scope fingerprints travel in the lead's :attr:`LeadCall.buyer_dedupe`.
    """

    buyer: str = field(name="b")  # buyer id (its cap counters, pause flag, breaker)
    account: str = field(name="a")  # the buyer's client account id, debited the price
    price: int = field(name="p")  # micros debited from the account on a sale
    fee_out: int = field(name="fo")  # outbound fee (micros) debited from the tenant wallet
    caps: CapLimits = field(name="cap")  # see CapLimits
    # buyer-scope dedupe fingerprints of the lead for this buyer: inline candidates only,
    # and always there ([] for none; decide.lua reads its length); None in the table
    dedupe: list[str] | None = field(default=None, name="bd")


class LeadCall(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One lead of a :class:`Call`: what decide.lua needs to decide it.

    Candidates are tried in :attr:`candidates` order, or from the campaign's round-robin
    cursor over :attr:`rotation` when :attr:`round_robin` is 1. The sync waterfall derives
    its later tries from the decoded lead with ``msgspec.structs.replace``.
    """

    id: str  # lead id (the sale records, ledger references, delivery jobs)
    key: str = field(name="k")  # idempotency key: the decision is stored under it
    key_ttl: int = field(name="kt")  # lifetime of that record, seconds
    test: int = field(name="t")  # 1 = test lead: decided in full, nothing sold or charged
    campaign: str = field(name="c")  # campaign id (round-robin cursor, ledger notes)
    fee_in: int = field(name="fi")  # inbound fee (micros) debited from the tenant wallet
    sell_limit: int = field(name="n")  # the most buyers the lead is sold to
    round_robin: int = field(name="rr")  # 1 = rotate the candidates with the campaign cursor
    # the campaign's rotation sequence: 1-based positions in candidates, 0 = not eligible
    rotation: list[int] = field(name="q")
    dedupe: list[str] = field(name="d")  # campaign-scope dedupe fingerprints
    dedupe_ttl: int = field(name="dt")  # dedupe look-back, seconds (a sale marks for it)
    # [hour id, day id, week id, month id] in the campaign's time zone, as strings
    windows: list[str] = field(name="win")
    # a second idempotency key, the payload's, when key is the seller's Idempotency-Key
    # (both rules hold: the same key, or the same payload within the replay window): it
    # stores a pointer to key, not a copy, so the sync waterfall's later writes to key
    # are what a replay through key2 finds
    key2: str | None = field(default=None, name="k2")
    key2_ttl: int | None = field(default=None, name="k2t")  # its lifetime, seconds
    # per candidate given by its table key: its buyer-scope fingerprints (None: no
    # buyer-scope dedupe; an inline candidate carries its own, Candidate.dedupe)
    buyer_dedupe: list[list[str]] | None = field(default=None, name="bd")
    # in the order they are tried: Candidate objects (inline), or keys of the call's table
    candidates: list[Candidate | str] = field(name="cs")
    # the normalized lead as JSON text (the delivery job's payload); None: it is ARGV[1 + i]
    payload: str | None = field(default=None, name="x")
    # a ping-post post: its ping id (decide.lua checks the ping and releases each tried
    # candidate's hold of it just before trying it); None: a direct post
    ping: str | None = field(default=None, name="pg")
    # the supplier that posted it (lp_supplier_id): carried into the delivery job's
    # "supplier" field for the lead archive (billing.leads); "" when none
    supplier: str = field(default="", name="sp")
    # 1: the candidates are the first of more eligible buyers (engine.routing.plans,
    # route_first): when they cannot take the lead (sold fewer than sell_limit, no wallet
    # refusal), decide.lua answers MORE, takes back what it wrote for the lead and
    # stores no idempotency record; the engine sends it again with every eligible buyer
    more: int = field(default=0, name="mr")

    def inline(self) -> list[Candidate]:
        """The candidates, every one inline (a sync campaign's lead: its waterfall reads
        and edits them); ValueError if one is a key of a call's table."""
        out = [c for c in self.candidates if isinstance(c, Candidate)]
        if len(out) != len(self.candidates):
            raise ValueError(f"lead {self.id}: candidates given by key, not inline")
        return out


class Call(msgspec.Struct, kw_only=True, gc=False):
    """decide.lua's ARGV[1]: a micro-batch of leads of one tenant.

    The engine sends each buyer's candidate object once per call, in :attr:`table`, and
    keys in the leads' ``cs``: 16 leads then decode a buyer's object once, not 16 times.
    Either collection may be pre-encoded JSON (``msgspec.Raw``), as :func:`encode_call`
    sends them.
    """

    now: int  # epoch ms (ledger and event timestamps)
    wallet: str = field(name="w")  # the tenant platform wallet's account id (fees)
    # candidate table: key -> candidate (may be left out)
    table: dict[str, Candidate] | msgspec.Raw = field(default_factory=dict, name="c")
    leads: list[LeadCall] | msgspec.Raw  # decided in order, each all or nothing


Sale = list[str]
"""One sale of a decision: [buyer id, price in micros as a decimal string]."""


class Decision(msgspec.Struct, frozen=True, gc=False):
    """decide.lua's result for one lead, as answered and as stored under its keys.

    An ERROR (code 1050) lead failed half-way inside the script and was taken back whole:
    nothing was charged and no record was stored, so a retry decides it afresh.
    """

    id: str  # lead id
    # ACCEPTED | DUPLICATED | REJECTED | ERROR, or MORE (LeadCall.more: never answered
    # to a seller, nothing written nor stored)
    status: str = field(name="s")
    code: int = field(name="c")  # response code (engine.ingest.ingest.Codes)
    message: str = field(default="", name="m")  # reason, for the seller
    # the buyers it was sold to, in order; cjson encodes an empty list as {}
    sold: list[Sale] | dict[str, Any] = []
    test: int = field(default=0, name="t")  # 1 = a test lead (copied from LeadCall.test)
    replay: bool = field(default=False, name="rp")  # the stored result of an earlier call
    buyer: str = field(default="", name="b")  # ERROR: the candidate buyer it failed on

    @property
    def buyers(self) -> list[Sale]:
        """The sales, [] when none (whatever cjson made of an empty list)."""
        return self.sold if isinstance(self.sold, list) else []

    @property
    def s(self) -> str:
        """:attr:`status` under its wire name, for code that reads decisions as the
        script spells them (tests)."""
        return self.status


class StoredDecision(Decision, frozen=True, gc=False):
    """An idempotency record as stored: a :class:`Decision`, or the pending marker of a
    running sync waterfall. decide.lua finds the marker (``"sy":``) on a payload replay
    and points the new key to the record instead of copying it."""

    claims_until: int = field(default=0, name="sy")  # epoch ms the claims end; 0 = final


class Reply(msgspec.Struct, frozen=True, gc=False):
    """decide.lua's answer to a :class:`Call` (cjson encodes an empty list as {})."""

    decisions: list[Decision] | dict[str, Any] = field(name="r")  # one per lead, in order
    # the events the call emitted: [event type, count, ...] (metrics)
    events: list[str | int] | dict[str, Any] = field(default=[], name="e")
    # micros the call debited, as decimal strings: [lead prices, platform fees]
    debited: list[str] = field(default=[], name="m")
    # the leads taken back (ERROR 1050): [lead id, error text], for the engine's log
    failed: list[list[str]] | dict[str, Any] = field(default=[], name="x")


_enc = msgspec.json.Encoder()
_lead = msgspec.json.Decoder(LeadCall)
_reply = msgspec.json.Decoder(Reply)
_stored = msgspec.json.Decoder(StoredDecision)


def encode_lead(lead: LeadCall) -> bytes:
    """A lead's JSON, as it goes into a call's ``leads``."""
    return _enc.encode(lead)


def decode_lead(raw: bytes | str) -> LeadCall:
    return _lead.decode(raw)


def table_entry(key: str, candidate: Candidate) -> bytes:
    """The call's candidate table entry ``"key":{...}``, encoded once (by a routing plan)
    and joined into every call whose leads refer to the key."""
    return _enc.encode(key) + b":" + _enc.encode(candidate)


def encode_call(now: int, wallet: str, entries: Iterable[bytes], leads: Sequence[bytes]
                ) -> bytes:
    """ARGV[1] of the given encoded leads (:func:`encode_lead`) and the table entries
    their keys refer to (:func:`table_entry`; an entry given twice is sent once)."""
    return _enc.encode(Call(
        now=now, wallet=wallet,
        table=msgspec.Raw(b"{%s}" % b",".join(dict.fromkeys(entries))),
        leads=msgspec.Raw(b"[%s]" % b",".join(leads))))


def decode_reply(raw: bytes | str) -> Reply:
    return _reply.decode(raw)


def encode_decision(d: Decision) -> bytes:
    """A decision (or a :class:`StoredDecision`) as an idempotency record."""
    return _enc.encode(d)


def decode_stored(raw: bytes | str) -> StoredDecision:
    return _stored.decode(raw)

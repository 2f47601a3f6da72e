"""Routing plans: a campaign's buyers compiled once, asked per lead for candidates.

Everything that depends only on the lead and the clock (filters, schedules, the order of a
waterfall or a price auction) is decided here in Python. Everything that depends on shared
state (pause flags, caps, balances, round-robin cursors, duplicates) is re-checked inside
decide.lua, atomically, so two engine processes can never oversell a buyer.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from engine.core import money
from engine.core.config import Buyer, Campaign, Caps, Config, Dedupe, Tenant
from engine.routing.fields import CampaignSchema
from engine.routing.filters import BuyerFilter
from engine.routing.schedule import CompiledSchedule, daily_cap
from engine.store.lua_protocol import NO_CAP, Candidate, CapLimits, table_entry

_ROTATING = {"round_robin", "weighted_round_robin"}
_MINUTES_PER_DAY = 1440
# a window plan's buyer: (index, its filter or None when it has none, 1 / weight)
_Member = tuple[int, BuyerFilter | None, float]
# (members in order, tied: ordered per lead, all of one weight: shuffled lazily)
_Group = tuple[tuple[_Member, ...], bool, bool]
# Candidates a lead is routed with beyond its sell limit before the rest of its eligible
# buyers are left for later (CampaignPlan.route_first): when none of these can take it
# (caps, funds, pauses, buyer duplicates), decide.lua answers MORE and writes nothing,
# and the engine sends the lead again with every eligible buyer (docs/benchmarks.md).
EXTRA_CANDIDATES = 3
WIDENED_FOR = 1_000  # leads routed with more first candidates after a MORE (needed_more)
_PLAN_TOKENS = itertools.count()


def fingerprint(scope: str, parts: Sequence[str]) -> str:
    """A short stable hash of normalized dedupe values; the values themselves (emails,
    phones) never become Redis key names."""
    return hashlib.blake2b("\x1f".join((scope, *parts)).encode(), digest_size=12).hexdigest()


def _hash_state(*parts: str) -> hashlib.blake2b:
    """The state of :func:`fingerprint`'s hash once it has read ``parts`` and the
    separator after them: a copy of it reads the rest of a fingerprint's text."""
    return hashlib.blake2b(("\x1f".join(parts) + "\x1f").encode(), digest_size=12)


class _Printer:
    """A lead's dedupe fingerprints of its plain values in one scope: ``match = "any"``,
    one per field present, :func:`fingerprint` of (field, value); ``"all"``, one of
    (every field, then every value) when every field is present. The hash of the scope
    and field names is computed once; a lead's fingerprint copies it and reads only the
    lead's values (the same text as fingerprint's, so the same fingerprint)."""

    __slots__ = ("_all", "_fields", "_states")

    def __init__(self, dedupe: Dedupe, scope: str) -> None:
        self._fields = tuple(dedupe.fields)
        self._all = dedupe.match == "all"
        self._states = ((_hash_state(scope, *dedupe.fields),) if self._all
                        else tuple(_hash_state(scope, f) for f in dedupe.fields))

    def __call__(self, lead: Mapping[str, str]) -> list[str]:
        if self._all:
            values = [lead.get(f, "") for f in self._fields]
            if not all(values):
                return []
            h = self._states[0].copy()
            h.update("\x1f".join(values).encode())
            return [h.hexdigest()]
        out = []
        for f, state in zip(self._fields, self._states, strict=True):
            value = lead.get(f)
            if value:
                h = state.copy()
                h.update(value.encode())
                out.append(h.hexdigest())
        return out


# the hashes a seller may send at ping instead of a dedupe field (docs/pingpost.md)
HASHES: dict[str, Callable[[bytes], Any]] = {"md5": hashlib.md5, "sha256": hashlib.sha256}
HASH_HEX = {"md5": 32, "sha256": 64}  # hex digits of each


def hashed_text(kind: str, value: str) -> str:
    """What a seller hashes for the duplicate check at ping, from a field's normalized
    value (engine.routing.fields): the value itself (an e-mail trimmed and lower-cased),
    but a phone as digits-only E.164 ("1" and its 10 NANP digits)."""
    return "1" + value if kind == "phone" else value


def hash_hex(alg: str, kind: str, value: str) -> str:
    """The lower-case hex digest a seller sends as ``<field>_<alg>`` for this value."""
    return str(HASHES[alg](hashed_text(kind, value).encode()).hexdigest())


def _hashed_prints(dedupe: Dedupe, scope: str, alg: str, hexes: Mapping[str, str]
                   ) -> list[str]:
    """The marks of hashed dedupe values (``hexes``: field -> hex digest), as
    :class:`_Printer` makes them of plain values; ``<field>#<alg>`` in place of the
    field name, which a field name cannot contain, so they never meet a plain mark."""
    names = [f"{f}#{alg}" for f in dedupe.fields]
    if dedupe.match == "all":
        values = [hexes.get(f, "") for f in dedupe.fields]
        return [fingerprint(scope, [*names, *values])] if all(values) else []
    return [fingerprint(scope, [n, hexes[f]]) for f, n in zip(dedupe.fields, names, strict=True)
            if hexes.get(f)]


def _cap(value: int | None) -> int:
    return NO_CAP if value is None else value


def _spend_cap(value: str | None) -> int:
    return NO_CAP if value is None else money.parse(value)


@dataclass(slots=True)
class BuyerPlan:
    id: str
    account: str
    price: int
    fee_out: int
    priority: int
    weight: int
    active: bool
    filter: BuyerFilter
    schedule: CompiledSchedule
    caps: Caps
    static_caps: tuple[int, int, int, int, int, int]  # hour, week, month, total, spend d/m

    # per weekday: decide.lua's candidate (its per-lead dedupe left out); the key it goes
    # under in a call's candidate table, unique to this plan (a reload makes new ones, so
    # leads routed before and after a reload can share a call), as a lead's candidates
    # item; and the table's entry ("key":{...}), encoded once
    candidates: tuple[Candidate, ...] = ()
    cand_keys: tuple[str, ...] = ()
    cand_entries: tuple[bytes, ...] = ()

    def cap_array(self, weekday: int) -> CapLimits:
        h, w, m, t, sd, sm = self.static_caps
        return (h, _cap(daily_cap(self.caps, weekday)), w, m, t, sd, sm)

    def __post_init__(self) -> None:
        self.candidates = tuple(
            Candidate(buyer=self.id, account=self.account, price=self.price,
                      fee_out=self.fee_out, caps=self.cap_array(day))
            for day in range(7)
        )
        token = next(_PLAN_TOKENS)
        self.cand_keys = tuple(f"{token:x}.{day}" for day in range(7))
        self.cand_entries = tuple(table_entry(key, cand) for key, cand
                                  in zip(self.cand_keys, self.candidates, strict=True))


def _walk(groups: Sequence[_Group], lead: Mapping[str, str], rng: random.Random
          ) -> Iterator[int]:
    """The eligible buyers of a window plan in :meth:`CampaignPlan.route`'s order, each
    filter evaluated when its buyer is reached. A tie among buyers of one weight is a
    Fisher-Yates shuffle made one place at a time (as uniform as route's sort of random
    keys); of several weights, every member's key is drawn first, as route does."""
    for members, tied, one_weight in groups:
        if not tied:
            for i, f, _ in members:
                if f is None or f.matches(lead):
                    yield i
        elif one_weight:
            pool, n, rand = list(members), len(members), rng.random
            for k in range(n):
                j = k + int(rand() * (n - k))
                pool[k], pool[j] = pool[j], pool[k]
                i, f, _ = pool[k]
                if f is None or f.matches(lead):
                    yield i
        else:
            rand = rng.random
            keyed = sorted([(-(rand() ** inv_w), i) for i, _, inv_w in members])
            filters = {i: f for i, f, _ in members}
            for _, i in keyed:
                f = filters[i]
                if f is None or f.matches(lead):
                    yield i


def smooth_wrr(weights: Sequence[int]) -> list[int]:
    """nginx's smooth weighted round robin, unrolled to one full cycle of indexes: weights
    3,1 give 0,0,1,0 rather than 0,0,0,1, so a heavy buyer's leads are spread out."""
    current = [0] * len(weights)
    total = sum(weights)
    seq: list[int] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        seq.append(best)
    return seq


class CampaignPlan:
    """A campaign, its validation schema and its buyers, compiled for the hot path."""

    def __init__(self, cfg: Config, campaign: Campaign, tenant: Tenant) -> None:
        self.campaign = campaign
        self.id, self.tenant = campaign.id, tenant.id
        self.tz = ZoneInfo(campaign.timezone or tenant.timezone)
        self.schema = CampaignSchema(
            campaign.fields,
            source=cfg.source,
            path_prefix=f"campaigns[{cfg.campaigns.index(campaign)}].fields",
        )
        self.method = campaign.distribution
        self.sync = campaign.mode == "sync"  # ingest hands these to engine.ingest.waterfall
        self.rotating = self.method in _ROTATING
        self.sell_limit = campaign.sell_limit if self.method == "send_to_all" else 1
        self.fee_in = money.parse(tenant.fees.inbound_lead)
        fee_out = money.parse(tenant.fees.outbound_delivery)
        self.dedupe = campaign.dedupe
        self.dedupe_ttl_s = (campaign.dedupe.days if campaign.dedupe else 1) * 86_400
        self.buyer_scope = campaign.dedupe is not None and campaign.dedupe.scope == "buyer"
        # ping-post with a dedupe: each sale also marks its values' hashes, which a ping
        # may be checked against (docs/pingpost.md, "Duplicates at ping")
        pp = campaign.ping_post
        self.dedupe_hashes: list[str] = (list(pp.dedupe_hashes)
                                         if pp is not None and campaign.dedupe else [])
        self._kinds = {f.name: f.type for f in campaign.fields}
        buyers = [b for b in cfg.buyers if b.tenant == tenant.id and b.campaign == campaign.id]
        self.buyers = [self._buyer(cfg, b, fee_out) for b in buyers]
        # the fingerprints of a lead's plain values: the campaign's, or by buyer index
        dd = campaign.dedupe
        self._printer = _Printer(dd, "c:" + self.id) if dd and not self.buyer_scope else None
        self._buyer_printers = ([_Printer(dd, "b:" + b.id) for b in self.buyers]
                                if dd and self.buyer_scope else [])
        self._buyer_index = {b.id: i for i, b in enumerate(self.buyers)}
        weights = [b.weight if self.method == "weighted_round_robin" else 1 for b in self.buyers]
        self.sequence = smooth_wrr(weights) if self.buyers else []
        # per weekday: each buyer's candidate key and table entry, by buyer index
        self._cand_keys = [[b.cand_keys[d] for b in self.buyers] for d in range(7)]
        self._cand_entries = [[b.cand_entries[d] for b in self.buyers] for d in range(7)]
        # the routing plan of the minute of the week last asked for (see route), and
        # how many buyers it has
        self._window: tuple[int, list[_Group]] | None = None
        self._window_size = 0
        self._window_flat: tuple[_Member, ...] | None = None  # its buyers, when none tie
        self._window_local: datetime | None = None  # the datetime last asked about
        # the candidates a lead is first routed with (route_first; 0: all of them):
        # rotating campaigns are ordered by decide.lua over every eligible buyer, a sync
        # campaign's waterfall and a ping-post post pick their candidates themselves
        self.first_candidates = self._first_base = (
            0 if self.rotating or self.sync or campaign.ping_post is not None
            else self.sell_limit + EXTRA_CANDIDATES)
        self._widened_for = 0  # leads routed before first_candidates is halved again

    def _buyer(self, cfg: Config, b: Buyer, fee_out: int) -> BuyerPlan:
        path = f"buyers[{cfg.buyers.index(b)}]"
        c = b.caps
        return BuyerPlan(
            id=b.id,
            account=b.client,
            price=money.parse(b.price),
            fee_out=fee_out,
            priority=b.priority,
            weight=b.weight,
            active=b.status == "active",
            filter=BuyerFilter(b.filters, source=cfg.source, path_prefix=f"{path}.filters"),
            schedule=CompiledSchedule(b.schedule, source=cfg.source, path=f"{path}.schedule"),
            caps=c,
            static_caps=(
                _cap(c.hour),
                _cap(c.week),
                _cap(c.month),
                _cap(c.total),
                _spend_cap(c.spend_day),
                _spend_cap(c.spend_month),
            ),
        )

    def route(self, lead: Mapping[str, str], local: datetime, rng: random.Random) -> list[int]:
        """``ordered(eligible(lead, local), rng)`` in one pass: the buyers who are active
        and open at this minute come from a plan made once per minute of the week
        (:meth:`_window_plan`: already in the method's order, waterfall priorities as
        groups), so a lead costs each buyer its filter (none: nothing) and, within a
        waterfall priority shared by several eligible buyers, the random tie-break."""
        groups = self._window_at(local)[1]
        if self._window_flat is not None:  # no tie: one pass over every buyer in order
            return [i for i, f, _ in self._window_flat if f is None or f.matches(lead)]
        out: list[int] = []
        for members, tied, _ in groups:
            if not tied:
                out += [i for i, f, _ in members if f is None or f.matches(lead)]
                continue
            # as ordered(): weighted random among the eligible of one priority
            rand = rng.random
            keyed = [(-(rand() ** inv_w), i) for i, f, inv_w in members
                     if f is None or f.matches(lead)]
            keyed.sort()
            out += [i for _, i in keyed]
        return out

    def route_first(self, lead: Mapping[str, str], local: datetime, rng: random.Random
                    ) -> tuple[list[int], Iterator[int] | None]:
        """The lead's first :attr:`first_candidates` eligible buyers in :meth:`route`'s
        order, and the rest of them as an iterator (None when there is no more: the first
        are all of them), evaluated only if asked for: a lead costs the buyers it needs,
        not the campaign's size. With ``first_candidates`` 0 (rotating, sync and
        ping-post campaigns) or a campaign no larger, it is :meth:`route`. The first and
        the rest together are one draw of :meth:`route`'s order (a tie-break among buyers
        of one priority and weight is a shuffle made as far as it is read)."""
        want = self.first_candidates
        if self._widened_for:
            self._narrow()
        _, groups = self._window_at(local)
        if want <= 0 or self._window_size <= want:
            return self.route(lead, local, rng), None
        walk = _walk(groups, lead, rng)
        first = list(itertools.islice(walk, want))
        after = next(walk, None) if len(first) == want else None
        return first, (None if after is None else itertools.chain((after,), walk))

    def needed_more(self, first: int) -> None:
        """A lead routed with ``first`` candidates could not take it (decide.lua's MORE):
        the next leads are routed with twice as many (up to every buyer) for the next
        :data:`WIDENED_FOR` leads, then half as many again, down to the usual number. A
        campaign whose first buyers are at their caps for the day then pays a second call
        for a few leads, not for every lead. Only a lead routed with the current number
        widens it: the other MOREs of the same call (routed before it widened) do not
        double it again."""
        if self._first_base and first >= self.first_candidates:
            self.first_candidates = min(2 * self.first_candidates, len(self.buyers))
            self._widened_for = WIDENED_FOR

    def _narrow(self) -> None:
        self._widened_for -= 1
        if not self._widened_for:
            self.first_candidates = max(self.first_candidates // 2, self._first_base)
            if self.first_candidates > self._first_base:
                self._widened_for = WIDENED_FOR

    def _window_at(self, local: datetime) -> tuple[int, list[_Group]]:
        """The routing plan of ``local``'s minute of the week (made once a minute; the
        ingest clock hands every lead of a second the same datetime object)."""
        if local is self._window_local and self._window is not None:
            return self._window
        self._window_local = local
        minute = local.weekday() * _MINUTES_PER_DAY + local.hour * 60 + local.minute
        window = self._window
        if window is None or window[0] != minute:
            window = self._window = (minute, self._window_plan(local))
            self._window_size = sum(len(members) for members, _, _ in window[1])
            self._window_flat = (None if any(tied for _, tied, _ in window[1])
                                 else tuple(m for members, _, _ in window[1] for m in members))
        return window

    def _window_plan(self, local: datetime) -> list[_Group]:
        """The buyers active and open at ``local``, in the order :meth:`ordered` gives
        them before any tie-break: waterfall priority groups (``tied``: 2+ buyers,
        ordered per lead at random by weight; with one weight, lazily), or one group in
        price or index order."""
        buyers = self.buyers
        idx = [i for i, b in enumerate(buyers) if b.active and b.schedule.is_open(local)]

        def member(i: int) -> _Member:
            b = buyers[i]
            return (i, b.filter if len(b.filter) else None, 1 / b.weight)

        if self.method == "waterfall":
            groups: dict[int, list[_Member]] = {}
            for i in idx:
                groups.setdefault(buyers[i].priority, []).append(member(i))
            return [(tuple(g), len(g) > 1, len({w for *_, w in g}) == 1)
                    for _, g in sorted(groups.items())]
        return [(tuple(member(i) for i in self.ordered(idx, random.Random(0))), False, True)]

    def eligible(self, lead: Mapping[str, str], local: datetime) -> list[int]:
        """Indexes of the buyers whose filters and schedule accept this lead now."""
        return [
            i
            for i, b in enumerate(self.buyers)
            if b.active and b.schedule.is_open(local) and b.filter.matches(lead)
        ]

    def ordered(self, idx: list[int], rng: random.Random) -> list[int]:
        """The order candidates are tried in (rotating methods are ordered by decide.lua)."""
        buyers = self.buyers
        if self.method == "waterfall":
            # priority first; ties broken at random, weighted by weight
            keyed = [
                (buyers[i].priority, -(rng.random() ** (1 / buyers[i].weight)), i) for i in idx
            ]
            return [i for *_, i in sorted(keyed)]
        if self.method in ("highest_price", "exclusive", "send_to_all"):
            return sorted(idx, key=lambda i: (-buyers[i].price, buyers[i].priority))
        return idx

    def campaign_prints(self, lead: Mapping[str, str]) -> list[str]:
        if self._printer is None:
            return []
        return self._prints(self._printer, "c:" + self.id, lead)

    def buyer_prints(self, buyer: BuyerPlan, lead: Mapping[str, str]) -> list[str]:
        if not self.buyer_scope:
            return []
        printer = self._buyer_printers[self._buyer_index[buyer.id]]
        return self._prints(printer, "b:" + buyer.id, lead)

    def _prints(self, printer: _Printer, scope: str, lead: Mapping[str, str]) -> list[str]:
        """A lead's dedupe marks: of its values, and of their hashes (ping-post)."""
        assert self.dedupe is not None
        out = printer(lead)
        for alg in self.dedupe_hashes:
            hexes = {f: hash_hex(alg, self._kinds.get(f, "text"), lead[f])
                     for f in self.dedupe.fields if lead.get(f)}
            out += _hashed_prints(self.dedupe, scope, alg, hexes)
        return out

    def hashed_prints(self, hashed: Mapping[str, Mapping[str, str]],
                      buyer: BuyerPlan | None = None) -> list[str]:
        """The marks a ping's hashed dedupe values (``hashed``: alg -> field -> hex) are
        checked against: the campaign's, or with ``buyer`` (buyer-scope dedupe) its own."""
        if self.dedupe is None or self.buyer_scope != (buyer is not None):
            return []
        scope = "c:" + self.id if buyer is None else "b:" + buyer.id
        out: list[str] = []
        for alg, hexes in hashed.items():
            out += _hashed_prints(self.dedupe, scope, alg, hexes)
        return out

    def inline_candidates(self, order: list[int], lead: Mapping[str, str], weekday: int
                          ) -> list[Candidate | str]:
        """A lead's candidates for these buyers, each inline with its buyer-scope
        fingerprints (a sync campaign's: its waterfall edits them)."""
        buyers = self.buyers
        return [msgspec.structs.replace(buyers[i].candidates[weekday],
                                        dedupe=self.buyer_prints(buyers[i], lead))
                for i in order]

    def candidate_refs(self, order: list[int], lead: Mapping[str, str], weekday: int
                       ) -> tuple[list[Candidate | str], list[list[str]] | None, list[bytes]]:
        """A lead's candidates for these buyers as keys into the call's candidate table,
        its buyer-scope fingerprints per candidate (None without buyer-scope dedupe), and
        the entries of that table (``"key":{...}``): a call of 16 leads decodes each
        buyer's candidate object once, not 16 times."""
        keys, entries = self._cand_keys[weekday], self._cand_entries[weekday]
        refs: list[Candidate | str] = [keys[i] for i in order]
        bd: list[list[str]] | None = None
        if self.buyer_scope:
            printers = self._buyer_printers
            bd = ([printers[i](lead) for i in order] if not self.dedupe_hashes
                  else [self.buyer_prints(self.buyers[i], lead) for i in order])
        return refs, bd, [entries[i] for i in order]

    def rotation(self, order: list[int]) -> list[int]:
        """The campaign's rotation sequence as 1-based candidate positions (0 = not eligible)."""
        pos = {buyer_idx: n + 1 for n, buyer_idx in enumerate(order)}
        return [pos.get(i, 0) for i in self.sequence]

"""The lead archive: the leads each buyer bought, in SQL (#18, docs/portal.md).

Where a sale comes from. decide.lua writes one delivery job per sale to the tenant's
``keys.deliveries`` stream (lead id, buyer, campaign, account, price, fee, the normalized
lead, time); no other record of a sale carries the lead's fields (the ledger's ``lead``
entry has no fields and no fee, the ``lead:<id>`` sale record no fields), so decide.lua is
left as it is. The delivery worker deletes a job once delivered, so it hands each new job
(attempt 0) on as it reads it, to ``keys.sold`` (engine.delivery.worker, one pipelined
XADD per read; a job read twice, after a crash, is handed on twice: harmless here).

The archive worker (:func:`run_lead_archive`) then does, per tenant and pass, what the
ledger archive (billing.archive) does: reads ``keys.sold`` through its consumer group
``leads`` (claiming a dead worker's entries), upserts the rows in one SQL transaction
(``ON CONFLICT (tenant, lead_id, buyer)``: a batch re-delivered after a crash inserts
nothing twice), commits, and only then acks and deletes the entries. Then:

* **returns**: the ``lead_returned`` events of the tenant's ``keys.events`` stream (its own
  group ``leads``), an UPDATE that sets ``returned_ts``/``return_reason`` once (a return
  seen before its sale leaves a placeholder row the sale fills in);
* **outcomes and delivery logs**: the ``settled`` entries the delivery worker appends to
  ``keys.sold`` once a delivery is settled (delivery_finish.lua: its decision and the
  lead's delivery log, which Redis then forgets): the decision (ACCEPTED, REJECTED,
  DUPLICATED, FAILED -> accepted, rejected, duplicate, failed) as an UPDATE of a pending
  row only, the log entries inserted into ``sold_lead_attempts`` (once each: a replay, or
  a later settle of the same delivery, adds only what is new); in the same
  pass as the sales, after them (a sale's entry always comes first in the stream);
* **personal fields**: erased ``pii_retention_days`` (per tenant, 30 by default) after the
  sale (:meth:`LeadArchive.erase_personal`), the rest of the row kept.

Personal fields are the lead's name, e-mail, phone, address and birth date fields (by name,
:data:`PERSONAL_NAMES`) and the campaign's fields typed email, phone, dob or ip; they are
stored apart from the others (column ``personal``) so erasing them is one UPDATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import redis.asyncio as aioredis

from engine.core import keys, money
from engine.core.billing_errors import InvalidRequest
from engine.core.config import Campaign, Config, Tenant
from engine.core.constants import archive_path
from engine.store.sql import Backend, Row, Step, open_backend, time_range
from engine.store.store import UNAVAILABLE, Store, now_ms
from engine.store.streams import Batch, StreamConsumer

log = logging.getLogger("leadflow.leads")

GROUP = "leads"
DAY_MS = 86_400_000
MAX_PAGE = 500
OUTCOMES = {"ACCEPTED": "accepted", "REJECTED": "rejected", "DUPLICATED": "duplicate",
            "FAILED": "failed"}
REFUNDED = ("rejected", "duplicate", "failed")  # outcomes whose sale was refunded
PERSONAL_NAMES = frozenset({
    "name", "full_name", "first_name", "last_name", "middle_name", "email", "email_address",
    "phone", "phone_number", "phone1", "phone2", "mobile", "mobile_phone", "home_phone",
    "work_phone", "address", "address1", "address2", "address_1", "address_2", "street",
    "street_address", "dob", "date_of_birth", "birth_date", "ssn", "ip", "ip_address",
})
PERSONAL_TYPES = frozenset({"email", "phone", "dob", "ip"})
_COLS = ("tenant", "lead_id", "buyer", "ts", "campaign", "supplier", "account", "price",
         "fee", "fields", "personal", "sold")
_ATTEMPT_COLS = ("tenant", "lead_id", "buyer", "ts", "attempt", "result", "status", "ms",
                 "reason", "excerpt")
_SELECT = ("lead_id, buyer, ts, campaign, supplier, account, price, fee, outcome, reason, "
           "returned_ts, return_reason, fields, personal")
_json = msgspec.json.Encoder()
_fields_dec = msgspec.json.Decoder(dict[str, str])


class SoldLead(msgspec.Struct, kw_only=True, frozen=True):
    """One archived sale (money in micros, times in epoch ms)."""

    lead_id: str
    buyer: str
    ts: int
    campaign: str
    supplier: str
    account: str
    price: int
    fee: int
    outcome: str  # pending | accepted | rejected | duplicate | failed
    reason: str
    returned_ts: int | None
    return_reason: str
    fields: dict[str, str]  # every field kept: the others, and personal ones until erased
    erased: bool  # personal fields erased (retention) or none were ever kept
    attempts: list[Attempt] = []  # the delivery log, oldest first (:meth:`LeadArchive.lead`)

    @property
    def returned(self) -> bool:
        return self.returned_ts is not None


class Attempt(msgspec.Struct, frozen=True):
    """One entry of a sale's delivery log (engine.delivery.record's log entry): an
    attempt (``result``: accepted, rejected, duplicated, timeout, error, retry, ...) or a
    decision (failed, skipped, deferred)."""

    buyer: str
    attempt: int
    ts: int
    result: str
    status: int = 0
    ms: int = 0
    reason: str = ""
    excerpt: str = ""


_attempts_dec = msgspec.json.Decoder(list[Attempt])


class LeadPage(msgspec.Struct, kw_only=True):
    items: list[SoldLead]
    next_cursor: str | None = None


class Day(msgspec.Struct, kw_only=True, frozen=True):
    day: date
    leads: int
    spend: int  # micros: sales not refunded nor returned
    returned: int


def personal_names(campaign: Campaign | None) -> frozenset[str]:
    """The names of a campaign's personal fields (see the module docs)."""
    if campaign is None:
        return PERSONAL_NAMES
    return PERSONAL_NAMES | {f.name for f in campaign.fields if f.type in PERSONAL_TYPES}


def _sold_lead(r: Row) -> SoldLead:
    fields = _fields_dec.decode(r[12]) if r[12] else {}
    personal = _fields_dec.decode(r[13]) if r[13] else {}
    return SoldLead(lead_id=r[0], buyer=r[1], ts=int(r[2]), campaign=r[3], supplier=r[4],
                    account=r[5], price=int(r[6]), fee=int(r[7]), outcome=r[8], reason=r[9],
                    returned_ts=None if r[10] is None else int(r[10]), return_reason=r[11],
                    fields={**fields, **personal}, erased=not personal)


def _cursor(lead: SoldLead) -> str:
    return f"{lead.ts}~{lead.buyer}~{lead.lead_id}"


def _parse_cursor(cursor: str) -> tuple[int, str, str]:
    parts = cursor.split("~", 2)
    if len(parts) == 3 and parts[0].isascii() and parts[0].isdigit() and len(parts[0]) < 19:
        return int(parts[0]), parts[1], parts[2]
    raise InvalidRequest("cursor: not a cursor of this list (use a next_cursor)",
                         code="invalid_query")


def _decode(f: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in f.items()}


class LeadArchive:
    """SQL side of the sold leads. Open with :meth:`open`; close when done."""

    def __init__(self, backend: Backend) -> None:
        self._db = backend
        p = backend.ph
        sets = ", ".join(f"{c} = excluded.{c}" for c in _COLS[3:])
        self._upsert_sql = (
            f"INSERT INTO sold_leads ({', '.join(_COLS)}) VALUES "  # noqa: S608
            f"({', '.join([p] * len(_COLS))}) ON CONFLICT (tenant, lead_id, buyer) "
            f"DO UPDATE SET {sets} WHERE sold_leads.sold = 0")
        self._return_sql = (
            "INSERT INTO sold_leads (tenant, lead_id, buyer, returned_ts, return_reason, "  # noqa: S608
            f"sold) VALUES ({p}, {p}, {p}, {p}, {p}, 0) ON CONFLICT (tenant, lead_id, buyer) "
            "DO UPDATE SET returned_ts = excluded.returned_ts, "
            "return_reason = excluded.return_reason WHERE sold_leads.returned_ts IS NULL")
        self._attempts_sql = (
            f"INSERT INTO sold_lead_attempts ({', '.join(_ATTEMPT_COLS)}) VALUES "  # noqa: S608
            f"({', '.join([p] * len(_ATTEMPT_COLS))}) ON CONFLICT DO NOTHING")

    @classmethod
    async def open(cls, url: str | None = None, *, path: str | None = None) -> LeadArchive:
        """``postgresql://...`` -> PostgreSQL; ``sqlite:///file`` or None -> SQLite file
        (``path``, else the default state directory's archive): the ledger's database."""
        backend = await open_backend(url, path or archive_path(".leadflow"))
        schema = resources.files("billing").joinpath("leads.sql").read_text(encoding="utf-8")
        await backend.script(schema)
        return cls(backend)

    async def close(self) -> None:
        await self._db.close()

    # -- archiving -------------------------------------------------------------------------

    def _row(self, tenant: str, f: dict[str, str], names: frozenset[str]) -> Row | None:
        try:
            lead = _fields_dec.decode(f.get("lead", "{}"))
            personal = {k for k in lead if k in names or k.lower() in PERSONAL_NAMES}
            return (tenant, f["lead_id"], f["buyer"], int(f.get("ts") or 0),
                    f.get("campaign", ""), f.get("supplier", ""), f.get("account", ""),
                    int(f.get("price") or 0), int(f.get("fee") or 0),
                    _json.encode({k: v for k, v in lead.items() if k not in personal}).decode(),
                    _json.encode({k: v for k, v in lead.items() if k in personal}).decode()
                    if any(k in personal for k in lead) else None, 1)
        except (KeyError, ValueError):
            return None

    def _outcome(self, tenant: str, lead_id: str, buyer: str, d: Any) -> Step | None:
        """A delivery decision (decoded ``keys.dstate`` JSON) as the UPDATE of its row's
        outcome, a pending row only; None when it is no final decision."""
        outcome = OUTCOMES.get(d.get("o", "")) if isinstance(d, dict) else None
        if not outcome:
            return None
        p = self._db.ph
        return Step(
            f"UPDATE sold_leads SET outcome = {p}, reason = {p} "  # noqa: S608
            f"WHERE tenant = {p} AND lead_id = {p} AND buyer = {p} AND outcome = 'pending'",
            (outcome, str(d.get("r", ""))[:500], tenant, lead_id, buyer))

    def _settled(self, tenant: str, f: dict[str, str]) -> tuple[list[Row], list[Step]] | None:
        """A settled delivery: its log entries (rows of ``sold_lead_attempts``) and its
        outcome (an UPDATE of a pending row only); None when malformed."""
        try:
            lead_id, buyer = f["lead_id"], f["buyer"]
            d = msgspec.json.decode(f["decision"])
            log_ = _attempts_dec.decode(f.get("log", "[]"))
        except (KeyError, msgspec.DecodeError):
            return None
        rows: list[Row] = [(tenant, lead_id, buyer, a.ts, a.attempt, a.result, a.status, a.ms,
                            a.reason[:500], a.excerpt[:500]) for a in log_]
        step = self._outcome(tenant, lead_id, buyer, d)
        return rows, [] if step is None else [step]

    async def store_sold(self, consumer: StreamConsumer, tenant: str, batches: list[Batch],
                         personal: Callable[[str], frozenset[str]]) -> int:
        """Sold-lead entries into SQL (one transaction), then their settled deliveries
        (outcome and delivery log; replayed, they write the same again); then acked and
        deleted."""
        entries = [(i, _decode(f)) for b in batches for i, f in b.entries]
        gone = [i for b in batches for i in b.gone]
        rows: list[Row] = []
        attempts: list[Row] = []
        steps: list[Step] = []
        bad = 0
        for _, f in entries:
            if "settled" in f:
                settled = self._settled(tenant, f)
                if settled is None:
                    bad += 1
                else:
                    attempts += settled[0]
                    steps += settled[1]
            elif (r := self._row(tenant, f, personal(f.get("campaign", "")))) is not None:
                rows.append(r)
            else:
                bad += 1
        if bad:
            log.warning("lead archive: tenant %s: %d malformed entries dropped", tenant, bad)
        if rows:
            await self._db.insert(self._upsert_sql, rows)
        if attempts:
            await self._db.insert(self._attempts_sql, attempts)
        if steps:  # after the sales they settle (a stream's order: a sale comes first)
            await self._db.batch(steps)
        ids = [i for i, _ in entries] + gone
        if ids:  # committed: only now may Redis forget them
            await consumer.ack(keys.sold(tenant), *ids, delete=True)
        return len(entries)

    async def store_returns(self, consumer: StreamConsumer, tenant: str,
                            batches: list[Batch]) -> int:
        """The ``lead_returned`` events into SQL, then acked (the events stream is shared:
        it is trimmed by its length, never by this worker)."""
        rows: list[Row] = []
        ids: list[str] = []
        for b in batches:
            ids += b.gone
            for i, raw in b.entries:
                ids.append(i)
                f = _decode(raw)
                if f.get("type") == "lead_returned" and f.get("lead_id") and f.get("buyer"):
                    with contextlib.suppress(ValueError):
                        rows.append((tenant, f["lead_id"], f["buyer"], int(f.get("ts") or 0),
                                     f.get("reason", "")))
        if rows:
            await self._db.insert(self._return_sql, rows)
        if ids:
            await consumer.ack(keys.events(tenant), *ids)
        return len(ids)

    async def resolve_outcomes(self, redis: aioredis.Redis, tenant: str, *,
                               limit: int = 500) -> int:
        """Pending rows whose delivery was decided (``keys.dstate``) but never reached the
        archive as settled (a sale decided before settling existed, or its settled entry
        trimmed from a backlog past ``SOLD_MAXLEN``): UPDATEd."""
        p = self._db.ph
        pending = await self._db.fetch(
            f"SELECT lead_id, buyer FROM sold_leads WHERE tenant = {p} "  # noqa: S608
            f"AND outcome = 'pending' AND sold = 1 ORDER BY ts LIMIT {p}", [tenant, limit])
        if not pending:
            return 0
        async with redis.pipeline(transaction=False) as pipe:
            for lead_id, buyer in pending:
                pipe.hget(keys.dstate(tenant, lead_id), buyer)
            states = await pipe.execute()
        steps = []
        for (lead_id, buyer), raw in zip(pending, states, strict=True):
            if not raw:
                continue
            try:
                d = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                continue
            step = self._outcome(tenant, lead_id, buyer, d)
            if step is not None:
                steps.append(step)
        if steps:
            await self._db.batch(steps)
        return len(steps)

    async def erase_personal(self, tenant: str, days: int, *, now: int) -> int:
        """Personal fields of the tenant's sales older than ``days`` days erased; returns
        the rows erased."""
        p = self._db.ph
        counts = await self._db.batch([Step(
            f"UPDATE sold_leads SET personal = NULL, pii_erased_ts = {p} "  # noqa: S608
            f"WHERE tenant = {p} AND pii_erased_ts IS NULL AND ts < {p}",
            (now, tenant, now - days * DAY_MS))])
        return counts[0]

    async def archive_once(self, redis: aioredis.Redis, tenant: Tenant | str, *,
                           consumer: str, personal: Callable[[str], frozenset[str]] | None = None,
                           count: int = 1_000, claim_idle_ms: int = 60_000) -> int:
        """One pass for one tenant: sales, returns, outcomes. Returns the entries taken."""
        tid = tenant if isinstance(tenant, str) else tenant.id
        sold, events = consumers(redis, [tid], consumer, count=count,
                                 claim_idle_ms=claim_idle_ms)
        n = await self._pass(sold, events, tid, personal or (lambda _c: PERSONAL_NAMES), count)
        return n + await self.resolve_outcomes(redis, tid)

    async def _pass(self, sold: StreamConsumer, events: StreamConsumer, tenant: str,
                    personal: Callable[[str], frozenset[str]], count: int) -> int:
        reader = (keys.sold(tenant),)
        n = await self.store_sold(sold, tenant, await sold.poll(count, reader=reader), personal)
        n += await self.store_returns(events, tenant,
                                      await events.poll(count, reader=(keys.events(tenant),)))
        return n

    # -- queries ---------------------------------------------------------------------------

    def _where(self, tenant: str, accounts: Sequence[str], from_ms: int | None,
               to_ms: int | None) -> tuple[list[str], list[Any]]:
        p = self._db.ph
        where = [f"tenant = {p}", "sold = 1",
                 f"account IN ({', '.join([p] * len(accounts))})" if accounts else "1 = 0"]
        params: list[Any] = [tenant, *accounts]
        time_range(p, from_ms, to_ms, where, params)
        return where, params

    async def leads(self, tenant: str, accounts: Sequence[str], *, from_ms: int | None = None,
                    to_ms: int | None = None, limit: int = 50,
                    cursor: str | None = None) -> LeadPage:
        """The sales of ``accounts`` (newest first); ``cursor``: a page's ``next_cursor``."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit: 1 to {MAX_PAGE}", code="invalid_query")
        p = self._db.ph
        where, params = self._where(tenant, accounts, from_ms, to_ms)
        if cursor:
            ts, buyer, lead_id = _parse_cursor(cursor)
            where.append(f"(ts < {p} OR (ts = {p} AND (buyer < {p} OR (buyer = {p} "
                         f"AND lead_id < {p}))))")
            params += [ts, ts, buyer, buyer, lead_id]
        rows = await self._db.fetch(
            f"SELECT {_SELECT} FROM sold_leads WHERE {' AND '.join(where)} "  # noqa: S608
            f"ORDER BY ts DESC, buyer DESC, lead_id DESC LIMIT {p}", [*params, limit + 1])
        items = [_sold_lead(r) for r in rows[:limit]]
        return LeadPage(items=items,
                        next_cursor=_cursor(items[-1]) if len(rows) > limit else None)

    async def lead(self, tenant: str, accounts: Sequence[str], lead_id: str,
                   buyer: str) -> SoldLead | None:
        """One sale, if it was made to one of ``accounts``."""
        p = self._db.ph
        where, params = self._where(tenant, accounts, None, None)
        rows = await self._db.fetch(
            f"SELECT {_SELECT} FROM sold_leads WHERE {' AND '.join(where)} "  # noqa: S608
            f"AND lead_id = {p} AND buyer = {p}", [*params, lead_id, buyer])
        if not rows:
            return None
        logs = await self._db.fetch(
            f"SELECT {', '.join(_ATTEMPT_COLS[2:])} FROM sold_lead_attempts "  # noqa: S608
            f"WHERE tenant = {p} AND lead_id = {p} AND buyer = {p} ORDER BY ts, attempt",
            [tenant, lead_id, buyer])
        attempts = [Attempt(buyer=r[0], ts=int(r[1]), attempt=int(r[2]), result=r[3],
                            status=int(r[4]), ms=int(r[5]), reason=r[6], excerpt=r[7])
                    for r in logs]
        return msgspec.structs.replace(_sold_lead(rows[0]), attempts=attempts)

    async def iter_csv(self, tenant: str, accounts: Sequence[str], *,
                       from_ms: int | None = None, to_ms: int | None = None
                       ) -> AsyncIterator[str]:
        """The sales as CSV, the header first, then a page of 500 at a time."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\r\n")
        # supplier last: a column added after the others, so readers by position keep working
        w.writerow(["lead_id", "time_utc", "campaign", "buyer", "account", "price", "fee",
                    "outcome", "returned_utc", "return_reason", "supplier"])
        cursor: str | None = None
        while True:
            page = await self.leads(tenant, accounts, from_ms=from_ms, to_ms=to_ms,
                                    limit=MAX_PAGE, cursor=cursor)
            for s in page.items:
                w.writerow([_csv_safe(s.lead_id), _utc(s.ts), _csv_safe(s.campaign),
                            _csv_safe(s.buyer), _csv_safe(s.account), money.format(s.price),
                            money.format(s.fee), s.outcome,
                            "" if s.returned_ts is None else _utc(s.returned_ts),
                            _csv_safe(s.return_reason), _csv_safe(s.supplier)])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def daily(self, tenant: str, accounts: Sequence[str], *, first: date, last: date,
                    tz: str) -> list[Day]:
        """Sales, spend and returns per day of ``tz``, ``first`` to ``last`` inclusive
        (every day, those without sales at 0). Summed in SQL per quarter hour (every time
        zone's offset is a multiple of one), then the quarters put on their local day."""
        zone = ZoneInfo(tz)
        start = datetime.combine(first, datetime.min.time(), zone)
        end = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone)
        where, params = self._where(tenant, accounts, int(start.timestamp() * 1000),
                                    int(end.timestamp() * 1000))
        refunded = ", ".join(f"'{o}'" for o in REFUNDED)
        rows = await self._db.fetch(
            "SELECT ts / 900000, COUNT(*), "  # noqa: S608
            f"COALESCE(SUM(CASE WHEN outcome IN ({refunded}) OR returned_ts IS NOT NULL "
            "THEN 0 ELSE price END), 0), "
            "SUM(CASE WHEN returned_ts IS NULL THEN 0 ELSE 1 END) "
            f"FROM sold_leads WHERE {' AND '.join(where)} GROUP BY ts / 900000", params)
        days = {first + timedelta(days=i): [0, 0, 0] for i in range((last - first).days + 1)}
        for quarter, n, spend, returned in rows:
            d = datetime.fromtimestamp(int(quarter) * 900, zone).date()
            if d in days:
                cell = days[d]
                cell[0] += int(n)
                cell[1] += int(spend)
                cell[2] += int(returned or 0)
        return [Day(day=d, leads=c[0], spend=c[1], returned=c[2]) for d, c in days.items()]


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _csv_safe(v: str) -> str:
    """A cell a spreadsheet will not run as a formula."""
    return "'" + v if v[:1] in ("=", "+", "-", "@", "\t", "\r") else v


def consumers(redis: aioredis.Redis, tenants: Iterable[str], consumer: str, *,
              count: int = 1_000, claim_idle_ms: int = 60_000
              ) -> tuple[StreamConsumer, StreamConsumer]:
    """This consumer of the tenants' sold-lead and event streams (group ``leads``), each
    tenant read on its own, without waiting, claiming a dead worker's entries each pass."""
    ts = list(tenants)
    kw: dict[str, Any] = {"count": count, "block_ms": None, "claim_idle_ms": claim_idle_ms,
                          "claim_every_ms": 0, "split": True}
    return (StreamConsumer(redis, GROUP, consumer, {keys.sold(t): t for t in ts}, **kw),
            StreamConsumer(redis, GROUP, consumer, {keys.events(t): t for t in ts}, **kw))


def personal_of(cfg: Config, tenant: str) -> Callable[[str], frozenset[str]]:
    """Campaign id -> its personal field names, for one tenant of ``cfg``."""
    by_id = {c.id: personal_names(c) for c in cfg.campaigns if c.tenant == tenant}
    return lambda campaign: by_id.get(campaign, PERSONAL_NAMES)


# personal fields erased, and the outcomes no settled entry brought looked up
# (resolve_outcomes: a fallback, not worth a query and a Redis read of every pending row on
# every pass), once a minute
ERASE_EVERY_MS = 60_000


async def run_lead_archive(store: Store, archive: LeadArchive, cfg: Config, *,
                           consumer: str, stop: asyncio.Event, idle_s: float = 0.5,
                           clock: Callable[[], int] = now_ms) -> None:
    """Archive every tenant's sales until ``stop`` is set; erase personal fields past
    each tenant's ``pii_retention_days`` and look up the outcomes that never came settled
    once a minute. One tenant's failure is logged and
    skipped for the pass."""
    tenants = list(cfg.tenants)
    sold, events = consumers(store.redis, [t.id for t in tenants], consumer)
    personal = {t.id: personal_of(cfg, t.id) for t in tenants}
    erased_at = 0
    while not stop.is_set():
        taken = 0
        now = clock()
        erase = now - erased_at >= ERASE_EVERY_MS
        for t in tenants:
            try:
                taken += await archive._pass(sold, events, t.id, personal[t.id], 1_000)
                if erase:
                    await archive.erase_personal(t.id, t.pii_retention_days, now=now)
                    taken += await archive.resolve_outcomes(store.redis, t.id)
            except UNAVAILABLE as exc:
                log.warning("lead archive: tenant %s unavailable (%s); retrying", t.id,
                            type(exc).__name__)
            except Exception:  # one tenant must not stop the others
                log.exception("lead archive: tenant %s failed; retrying", t.id)
        if erase:
            erased_at = now
        if not taken:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), idle_s)

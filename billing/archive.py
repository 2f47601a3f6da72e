"""The ledger archive: Redis ledger streams copied into SQL, then trimmed.

The worker reads the tenant ledger stream through the consumer group ``archive``
(:class:`engine.store.streams.StreamConsumer`), inserts the entries in one SQL transaction (``ON
CONFLICT DO NOTHING`` on ``(tenant, entry_id)``: a batch replayed after a crash inserts
nothing twice), commits, acknowledges, and only then trims the tenant stream with ``XTRIM
MINID`` up to the oldest entry not yet committed (pending in the group, or not yet
delivered). An account's history is its entries in SQL
plus those still in the tenant stream (:func:`history`).

SQLite (stdlib ``sqlite3`` in a worker thread) is the default; a ``postgresql://`` URL
uses PostgreSQL through psycopg 3 (the backends: engine.store.sql, shared with the identity
store). :func:`account_totals` checks that the Redis balance equals
the SQL sum plus the account's entries still in the tenant stream and not yet in SQL.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis

from billing.schemas import Transaction
from engine.core import keys, money
from engine.core.billing_errors import InvalidRequest
from engine.core.constants import archive_path
from engine.store.sql import Backend, Row, open_backend, time_range
from engine.store.store import UNAVAILABLE, Store
from engine.store.streams import Batch, Fields, Reader, StreamConsumer

log = logging.getLogger("leadflow.archive")

GROUP = "archive"
# API transaction types -> ledger kinds
TYPES: dict[str, tuple[str, ...]] = {
    "lead": ("lead", "reprice"),
    "fee": ("fee", "fee_refund"),
    "usage": ("usage",),
    "funding": ("funding",),
    "recharge": ("recharge",),
    "refund": ("refund",),
    "return": ("return",),
    "adjustment": ("adjustment", "opening"),
}
PAYMENTS = ("funding", "recharge", "refund")  # ledger kinds of an account's payments
MAX_PAGE = 1_000  # transactions a page holds at most
RECENT_PAGE = 1_000  # stream entries per XREVRANGE of recent()
RECENT_SCAN = 10_000  # stream entries recent() reads at most
_BASE = ("account", "delta", "balance", "kind", "ref", "ts")
_COLS = ("tenant", "entry_id", "id_ms", "id_seq", "account", "kind", "delta", "balance", "ref",
         "ts", "process", "usr", "extra")
_json = msgspec.json.Encoder()
_extra_dec = msgspec.json.Decoder(dict[str, str])


class Page(msgspec.Struct, kw_only=True):
    items: list[Transaction]
    next_cursor: str | None = None


def _split_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


_CURSOR = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")
_INT64 = 2**63  # SQL integers (SQLite, PostgreSQL BIGINT) are signed 64-bit


def parse_cursor(cursor: str) -> tuple[int, int]:
    """A ``next_cursor`` (a ledger entry id ``ms-seq``, or ``ms``) as its two parts.
    Anything else, or a part SQL cannot hold (2^63 and up), is ``invalid_query``."""
    if _CURSOR.fullmatch(cursor):  # ASCII digits only: int() would also take other digits
        ms, seq = _split_id(cursor)
        if ms < _INT64 and seq < _INT64:
            return ms, seq
    raise InvalidRequest("cursor: not a cursor of this API (use a next_cursor)",
                         code="invalid_query")


def _next_id(entry_id: str) -> str:
    ms, seq = _split_id(entry_id)
    return f"{ms}-{seq + 1}"


def _extra(f: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in f.items() if k not in _BASE and k not in ("process", "user")}


def _row(tenant: str, entry_id: str, f: dict[str, str]) -> Row:
    ms, seq = _split_id(entry_id)
    return (tenant, entry_id, ms, seq, f.get("account", ""), f.get("kind", ""),
            int(f.get("delta", 0)), int(f.get("balance", 0)), f.get("ref", ""),
            int(f.get("ts", ms)), f.get("process", ""), f.get("user", ""),
            _json.encode(_extra(f)).decode())


def entry_transaction(entry_id: str, f: dict[str, str]) -> Transaction:
    """A ledger entry's fields (a stream entry decoded, or an archived row as
    :func:`_stream_fields` gives it) in the shape of the transactions API."""
    ms, _ = _split_id(entry_id)
    kind = f.get("kind", "")
    return Transaction(id=entry_id, account=f.get("account", ""), type=_type_of(kind),
                       amount=money.format(int(f.get("delta", 0))),
                       balance=money.format(int(f.get("balance", 0))), ref=f.get("ref", ""),
                       ts=int(f.get("ts", ms)), process=f.get("process", ""),
                       user=f.get("user", ""), extra={"kind": kind, **_extra(f)})


def _type_of(kind: str) -> str:
    for t, kinds in TYPES.items():
        if kind in kinds:
            return t
    return kind


def _decode(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


def _stream_fields(r: Row) -> dict[str, str]:
    """An archived row as its ledger stream entry's fields (the inverse of :func:`_row`)."""
    f = {"account": r[1], "delta": str(r[3]), "balance": str(r[4]), "kind": r[2],
         "ref": r[5], "ts": str(r[6])}
    if r[7]:
        f["process"] = r[7]
    if r[8]:
        f["user"] = r[8]
    f.update(_extra_dec.decode(r[9]))
    return f


class Archive:
    """SQL side of the ledger. Open with :meth:`open`; close when done."""

    def __init__(self, backend: Backend) -> None:
        self._db = backend
        p = backend.ph
        self._insert_sql = (
            f"INSERT INTO ledger_entries ({', '.join(_COLS)}) VALUES "  # noqa: S608
            f"({', '.join([p] * len(_COLS))}) ON CONFLICT (tenant, entry_id) DO NOTHING"
        )

    @classmethod
    async def open(cls, url: str | None = None, *, path: str | None = None) -> Archive:
        """``postgresql://...`` -> PostgreSQL; ``sqlite:///file`` or None -> SQLite file
        (``path``, else the default state directory's archive)."""
        backend = await open_backend(url, path or archive_path(".leadflow"))
        archive = cls(backend)
        schema = resources.files("billing").joinpath("schema.sql").read_text(encoding="utf-8")
        await backend.script(schema)
        return archive

    async def close(self) -> None:
        await self._db.close()

    # -- archiving -------------------------------------------------------------------------

    async def archive_once(self, redis: aioredis.Redis, tenant: str, *, consumer: str,
                           count: int = 1_000, claim_idle_ms: int = 60_000) -> int:
        """Copy one batch to SQL, ack it, then trim; returns the number of entries."""
        ledger = _ledgers(redis, [tenant], consumer, count=count, claim_idle_ms=claim_idle_ms)
        return await self._archive(ledger, tenant, await ledger.poll(count))

    async def _archive(self, ledger: StreamConsumer, tenant: str, batches: list[Batch]) -> int:
        """The entries read or claimed from the tenant's ledger into SQL, acked, then the
        stream trimmed; returns the number of entries."""
        entries = [(i, _decode(f)) for b in batches for i, f in b.entries]
        if not entries:
            await self._trim(ledger.redis, tenant)
            return 0
        await self._db.insert(self._insert_sql, [_row(tenant, i, f) for i, f in entries])
        # committed: only now may Redis forget them
        await ledger.ack(keys.ledger(tenant), *[i for i, _ in entries])
        await self._trim(ledger.redis, tenant)
        return len(entries)

    async def _trim(self, redis: aioredis.Redis, tenant: str) -> None:
        stream = keys.ledger(tenant)
        groups = await redis.xinfo_groups(stream)
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None:
            return
        summary = await redis.xpending(stream, GROUP)
        if summary["pending"]:
            min_id = summary["min"]
            safe = min_id.decode() if isinstance(min_id, bytes) else str(min_id)
        else:
            last = group["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            if last == "0-0":
                return
            safe = _next_id(last)
        await redis.xtrim(stream, minid=safe, approximate=False)

    # -- queries ---------------------------------------------------------------------------

    async def transactions(
        self, tenant: str, account: str, *, from_ms: int | None = None,
        to_ms: int | None = None, type: str | None = None, q: str | None = None,
        limit: int = 100, cursor: str | None = None, kinds: Sequence[str] | None = None,
    ) -> Page:
        """Newest first. ``cursor`` is the ``next_cursor`` of the previous page (an entry
        id: the page holds the entries older than it); ``kinds``: only these ledger kinds."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit: 1 to {MAX_PAGE}", code="invalid_query")
        if type and type not in TYPES:
            raise InvalidRequest(f"type: one of {', '.join(TYPES)}", code="invalid_query")
        rows = await self._select(tenant, account, limit + 1, from_ms=from_ms, to_ms=to_ms,
                                  kinds=TYPES[type] if type else None, q=q, cursor=cursor,
                                  only=kinds)
        items = [entry_transaction(r[0], _stream_fields(r)) for r in rows[:limit]]
        return Page(items=items, next_cursor=items[-1].id if len(rows) > limit else None)

    async def entries(self, tenant: str, account: str, *, limit: int,
                      cursor: str | None = None, kinds: Sequence[str] | None = None,
                      ) -> list[tuple[str, dict[str, str]]]:
        """The account's archived entries older than ``cursor`` (an entry id; None: the
        newest), newest first, as the ledger stream held them: (id, fields)."""
        rows = await self._select(tenant, account, limit, cursor=cursor, only=kinds)
        return [(r[0], _stream_fields(r)) for r in rows]

    async def _select(
        self, tenant: str, account: str, limit: int, *, from_ms: int | None = None,
        to_ms: int | None = None, kinds: Sequence[str] | None = None, q: str | None = None,
        cursor: str | None = None, only: Sequence[str] | None = None,
    ) -> list[Row]:
        """Rows of one account, newest first; ``kinds`` and ``only`` both filter by ledger
        kind (a transaction type's kinds, and the caller's own list)."""
        p = self._db.ph
        where = [f"tenant = {p}", f"account = {p}"]
        params: list[Any] = [tenant, account]
        time_range(p, from_ms, to_ms, where, params)
        for allowed in (kinds, only):
            if allowed is not None:
                where.append(f"kind IN ({', '.join([p] * len(allowed))})" if allowed
                             else "1 = 0")
                params.extend(allowed)
        if q:
            pattern = "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_") + "%"
            where.append(" OR ".join(f"LOWER({c}) LIKE {p} ESCAPE '\\'"
                                     for c in ("process", "usr", "ref")).join("()"))
            params.extend([pattern] * 3)
        if cursor:
            ms, seq = parse_cursor(cursor)
            where.append(f"(id_ms < {p} OR (id_ms = {p} AND id_seq < {p}))")
            params += [ms, ms, seq]
        # placeholders only: every value is a bound parameter
        sql = ("SELECT entry_id, account, kind, delta, balance, ref, ts, process, usr, extra "  # noqa: S608
               f"FROM ledger_entries WHERE {' AND '.join(where)} "
               f"ORDER BY id_ms DESC, id_seq DESC LIMIT {p}")
        return await self._db.fetch(sql, [*params, limit])

    async def export_csv(self, tenant: str, account: str, **filters: Any) -> str:
        """Every matching transaction as CSV (paged internally)."""
        return "".join([chunk async for chunk in self.iter_csv(tenant, account, **filters)])

    async def iter_csv(self, tenant: str, account: str, **filters: Any
                       ) -> AsyncIterator[str]:
        """The CSV of :meth:`export_csv`, a page of 1,000 transactions at a time (the
        header first): for a streamed answer, whatever the account's history."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\r\n")
        w.writerow(["id", "time_utc", "account", "type", "kind", "amount", "balance", "ref",
                    "process", "user", "gross", "card_fee"])
        cursor: str | None = None
        while True:
            page = await self.transactions(tenant, account, limit=1_000, cursor=cursor,
                                           **filters)
            for t in page.items:
                when = datetime.fromtimestamp(t.ts / 1000, UTC).isoformat(timespec="seconds")
                w.writerow([t.id, when, t.account, t.type, t.extra.get("kind", ""), t.amount,
                            t.balance, _csv_safe(t.ref), _csv_safe(t.process),
                            _csv_safe(t.user), t.extra.get("gross", ""),
                            t.extra.get("card_fee", "")])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def _below(self, entry_id: str | None, *, inclusive: bool = False) -> tuple[str, list[Any]]:
        """The SQL condition (and its parameters) of the entries before ``entry_id`` (and
        that one too when ``inclusive``); none without an id."""
        if not entry_id:
            return "", []
        p, (ms, seq) = self._db.ph, _split_id(entry_id)
        op = "<=" if inclusive else "<"
        return f" AND (id_ms < {p} OR (id_ms = {p} AND id_seq {op} {p}))", [ms, ms, seq]

    async def account_sum(self, tenant: str, account: str, *, upto: str | None = None,
                          below: str | None = None) -> tuple[int, int]:
        """(sum of deltas, rows) archived for the account, up to entry id ``upto`` or
        before entry id ``below``."""
        p = self._db.ph
        cond, extra = self._below(below) if below else self._below(upto, inclusive=True)
        sql = ("SELECT COALESCE(SUM(delta), 0), COUNT(*) FROM ledger_entries "  # noqa: S608
               f"WHERE tenant = {p} AND account = {p}" + cond)
        rows = await self._db.fetch(sql, [tenant, account, *extra])
        return int(rows[0][0]), int(rows[0][1])

    async def period_sums(self, tenant: str, account: str, from_ms: int, to_ms: int, *,
                          below: str | None = None) -> list[tuple[str, bool, int, int]]:
        """The account's archived entries with ``from_ms <= ts < to_ms`` (and, with
        ``below``, an id before it), grouped by ledger kind and direction: (kind, credit,
        entries, sum of deltas) rows."""
        p = self._db.ph
        cond, extra = self._below(below)
        rows = await self._db.fetch(
            "SELECT kind, delta > 0, COUNT(*), COALESCE(SUM(delta), 0) "  # noqa: S608
            f"FROM ledger_entries WHERE tenant = {p} AND account = {p} AND ts >= {p} "
            f"AND ts < {p}{cond} GROUP BY kind, delta > 0",
            [tenant, account, from_ms, to_ms, *extra])
        return [(str(r[0]), bool(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def archived(self, tenant: str, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        found: set[str] = set()
        p = self._db.ph
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = await self._db.fetch(
                f"SELECT entry_id FROM ledger_entries WHERE tenant = {p} AND entry_id IN "  # noqa: S608
                f"({', '.join([p] * len(chunk))})", [tenant, *chunk])
            found.update(r[0] for r in rows)
        return found


def _csv_safe(text: str) -> str:
    """Neutralise spreadsheet formulas in user-controlled cells."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class History(NamedTuple):
    """A page of an account's ledger, newest first, and the cursor of the next page (None:
    no more): its last entry's id, or, without an archive, where the stream scan stopped."""

    entries: list[tuple[str, dict[str, str]]]
    next_before: str | None


async def history(store: Store, archive: Archive | None, tenant: str, account: str, *,
                  limit: int, before: str = "+", kinds: Sequence[str] | None = None,
                  scan: int = RECENT_SCAN, page: int = RECENT_PAGE) -> History:
    """The account's ``limit`` newest ledger entries older than ``before`` (an entry id,
    exclusive; "+": the newest), only ``kinds`` if given, newest first, as (id, fields):
    from the tenant's Redis ledger stream, and from the SQL archive for what the ledger
    worker archived and then trimmed from the stream (on a running engine, almost all).

    As ``leadflow reconcile`` sums a ledger (engine.run.reconcile): the stream is read newest
    first, in pages, until enough entries are found or it ends. Trimming only ever removes a
    stream's oldest entries, and only after the worker's SQL commit, so every entry older
    than the oldest one read is in SQL: the rest comes from SQL, older than that one. No
    entry is shown twice (one archived but not trimmed yet is read from the stream only)
    and none is missed, whatever the worker does meanwhile. At most ``scan`` stream entries
    (of every account) are read, for a stream the worker lags far behind on or one never
    archived: the older entries then come from SQL alone, which leaves out those not
    archived yet. Without an archive (none could be opened), the stream is the whole ledger:
    a page that read ``scan`` entries ends there, and its cursor goes on from that point.
    """
    tail = await store.ledger_tail(tenant, account, before=before, limit=limit, scan=scan,
                                   kinds=kinds, page=page)
    found = tail.entries
    if len(found) < limit and archive is not None:
        cursor = tail.oldest or (None if before == "+" else before)
        found = found + await archive.entries(tenant, account, limit=limit - len(found),
                                              cursor=cursor, kinds=kinds)
    if len(found) >= limit:
        return History(found, found[-1][0])
    more = archive is None and not tail.complete and tail.oldest is not None
    return History(found, tail.oldest if more else None)


async def recent(store: Store, archive: Archive | None, tenant: str, account: str, *,
                 limit: int, kinds: Sequence[str] | None = None, scan: int = RECENT_SCAN,
                 page: int = RECENT_PAGE) -> list[Transaction]:
    """:func:`history`'s newest entries in the shape of the transactions API."""
    page_ = await history(store, archive, tenant, account, limit=limit, kinds=kinds,
                          scan=scan, page=page)
    return [entry_transaction(i, f) for i, f in page_.entries]


class AccountTotals(msgspec.Struct, frozen=True):
    account: str
    redis_balance: int
    sql_sum: int
    unarchived_sum: int

    @property
    def ok(self) -> bool:
        return self.redis_balance == self.sql_sum + self.unarchived_sum


async def account_totals(store: Store, archive: Archive, tenant: str,
                         account: str) -> AccountTotals:
    """Redis balance == SQL sum + the account's entries in the tenant stream (one snapshot
    of the whole stream, which the ledger worker keeps short; see :func:`_snapshot`)."""
    bal, first, rows = await _snapshot(store, tenant, account)
    sql_sum, _ = await archive.account_sum(tenant, account, below=first)
    return AccountTotals(account=account, redis_balance=bal, sql_sum=sql_sum,
                         unarchived_sum=sum(int(f[b"delta"]) for f in rows))


async def _snapshot(store: Store, tenant: str, account: str
                    ) -> tuple[int, str | None, list[Fields]]:
    """The account's balance, the tenant ledger stream's first entry id (None: empty) and
    the account's entries in the stream, read together. The stream is trimmed only from
    its head and only after the SQL commit, so every entry before the first one is in SQL,
    and SQL is summed only below it: an entry archived while this runs is counted once,
    from the stream (asking SQL which stream entries it has, then summing SQL, counted
    such an entry twice)."""
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.hget(keys.acct(tenant, account), "bal")
        pipe.xrange(keys.ledger(tenant), "-", "+")
        bal, rows = await pipe.execute()
    want = account.encode()
    first = rows[0][0].decode() if rows else None
    return int(bal or 0), first, [f for _, f in rows if f.get(b"account") == want]


class PeriodTotals(msgspec.Struct, frozen=True):
    """What an account's ledger says about a period (amounts in micros, all >= 0 but
    ``spent``, which a period of refunds only could take below 0): the weekly report."""

    balance: int  # the account's balance now
    leads: int  # sales (ledger kind ``lead``)
    spent: int  # leads, re-pricing, usage and fees, less the sales refunded
    funded: int  # funding and recharges
    returns: int  # leads returned
    returned: int  # credited for them
    refunded: int  # unused balance refunded to cards


def _totals(balance: int, rows: Iterable[tuple[str, bool, int, int]]) -> PeriodTotals:
    t = {"leads": 0, "spent": 0, "funded": 0, "returns": 0, "returned": 0, "refunded": 0}
    for kind, credit, n, total in rows:
        if kind == "lead":
            t["leads"] += n
        if kind in ("lead", "reprice", "usage", "fee", "fee_refund") or (
                kind == "refund" and credit):  # a sale refunded (delivery rejected)
            t["spent"] -= total
        elif kind in ("funding", "recharge"):
            t["funded"] += total
        elif kind == "return":
            t["returns"] += n
            t["returned"] += total
        elif kind == "refund":  # the unused balance back to a card
            t["refunded"] -= total
    return PeriodTotals(balance=balance, **t)


async def period_totals(store: Store, archive: Archive, tenant: str, account: str, *,
                        from_ms: int, to_ms: int) -> PeriodTotals:
    """The account's ledger over ``from_ms <= ts < to_ms``: the SQL archive's sums of the
    entries before the tenant stream's first, plus the stream's (:func:`_snapshot`)."""
    bal, first, rows = await _snapshot(store, tenant, account)
    grouped: dict[tuple[str, bool], list[int]] = {}
    for kind, credit, n, total in await archive.period_sums(tenant, account, from_ms, to_ms,
                                                            below=first):
        grouped[(kind, credit)] = [n, total]
    for f in rows:
        if not from_ms <= int(f.get(b"ts", b"0")) < to_ms:
            continue
        delta = int(f[b"delta"])
        cell = grouped.setdefault((f.get(b"kind", b"").decode(), delta > 0), [0, 0])
        cell[0] += 1
        cell[1] += delta
    return _totals(bal, ((k, c, n, s) for (k, c), (n, s) in grouped.items()))


def _ledgers(redis: aioredis.Redis, tenants: list[str], consumer: str, *,
             count: int = 1_000, claim_idle_ms: int = 60_000) -> StreamConsumer:
    """This consumer of the tenants' ledger streams (group ``archive``): each tenant read on
    its own (one tenant's failure, a bad entry or its node down, holds no other back),
    without waiting, claiming a dead worker's entries on every pass."""
    return StreamConsumer(redis, GROUP, consumer, {keys.ledger(t): t for t in tenants},
                          count=count, block_ms=None, claim_idle_ms=claim_idle_ms,
                          claim_every_ms=0, split=True)


async def run_archive_worker(store: Store, archive: Archive, tenants: list[str], *,
                             consumer: str, stop: asyncio.Event, idle_s: float = 0.5) -> None:
    """Archive every tenant's ledger until ``stop`` is set: passes over the tenants one
    after another, waiting ``idle_s`` after a pass that found nothing. One tenant's failure
    (its Redis node down, a bad entry) is logged and skipped for this pass; the other
    tenants' ledgers keep being archived (and trimmed) meanwhile."""
    ledger = _ledgers(store.redis, tenants, consumer)

    async def handle(reader: Reader, batches: list[Batch]) -> int:
        return await archive._archive(ledger, ledger.streams[reader[0]], batches)

    def failed(reader: Reader, exc: Exception) -> None:
        tenant = ledger.streams[reader[0]]
        if isinstance(exc, UNAVAILABLE):
            log.warning("ledger archive: tenant %s unavailable (%s); retrying",
                        tenant, type(exc).__name__)
        else:  # one tenant must not stop the others
            log.error("ledger archive: tenant %s failed; retrying", tenant, exc_info=exc)

    await ledger.run(stop, handle, survive=(Exception,), on_error=failed, retry_s=0,
                     idle_s=idle_s, in_turn=True)

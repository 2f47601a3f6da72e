"""Usage metering, the SQL ledger archive (SQLite always, PostgreSQL when installed),
transaction queries / CSV and account totals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from billing import usage
from billing.archive import Archive, account_totals
from billing.context import BillingContext
from engine.core import keys, money
from engine.core.billing_errors import (
    AccountClosed,
    InsufficientFunds,
    InvalidRequest,
    UnknownAccount,
)
from tests.helpers.billing_fixtures import T

D = money.MICROS


# -- usage -------------------------------------------------------------------------------

async def test_usage_debits_unit_price_times_quantity(ctx: BillingContext) -> None:
    await ctx.store.adjust(T, "c1", 10 * D, "adjustment", op_id="seed")
    r = await usage.record_usage(ctx, T, "c1", "sms", 7, "ev-1", user="bob")
    assert r.ok and r.cost == "0.35" and r.balance == "9.65" and not r.replay
    r = await usage.record_usage(ctx, T, "c1", "transcribe", "2.5", "ev-2")
    assert r.cost == "0.03"  # 0.012 x 2.5
    entry = [f for _, f in await ctx.store.ledger_page(T, "c1", limit=2)][1]
    assert entry["kind"] == "usage" and entry["process"] == "sms" and entry["user"] == "bob"
    assert entry["ref"] == "usage:c1:ev-1" and entry["unit_price"] == "0.05"


async def test_usage_idempotent_on_event_id(ctx: BillingContext) -> None:
    await ctx.store.adjust(T, "c1", 10 * D, "adjustment", op_id="seed")
    a = await usage.record_usage(ctx, T, "c1", "email_test", 2, "ev-1")
    b = await usage.record_usage(ctx, T, "c1", "email_test", 2, "ev-1")
    assert b.replay and a.balance == b.balance == "7.50"
    ttl = await ctx.store.redis.ttl(keys.op(T, "usage:c1:ev-1"))
    assert ttl > 31 * 86_400  # remembered at least 32 days


async def test_usage_floor_enforced(ctx: BillingContext) -> None:
    # floor -$20.00 (seed 000): $20 of debt at most
    await usage.record_usage(ctx, T, "c1", "email_test", 16, "ev-1")  # -> -20.00
    with pytest.raises(InsufficientFunds):
        await usage.record_usage(ctx, T, "c1", "sms", 1, "ev-2")
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.balance == -20 * D


@pytest.mark.parametrize(("meter", "qty", "event", "code"), [
    ("nope", 1, "e1", "unknown_meter"),
    ("sms", 0, "e1", "invalid_quantity"),
    ("sms", -3, "e1", "invalid_quantity"),
    ("sms", "1e3", "e1", "invalid_quantity"),
    ("sms", "0.0", "e1", "invalid_quantity"),
    ("sms", True, "e1", "invalid_quantity"),
    ("sms", 1.5, "e1", "invalid_quantity"),
    ("sms", 1, "", "invalid_event_id"),
    ("sms", 1, "a b", "invalid_event_id"),
])
async def test_usage_bad_input_moves_nothing(ctx: BillingContext, meter: str, qty: object,
                                             event: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await usage.record_usage(ctx, T, "c1", meter, qty, event)  # type: ignore[arg-type]
    assert err.value.code == code
    assert await ctx.store.ledger_page(T, "c1") == []


async def test_usage_unknown_or_closed_account(ctx: BillingContext) -> None:
    with pytest.raises(UnknownAccount):
        await usage.record_usage(ctx, T, "zz", "sms", 1, "e1")
    await ctx.store.set_account_flag(T, "c2", "closed", "1")
    with pytest.raises(AccountClosed):
        await usage.record_usage(ctx, T, "c2", "sms", 1, "e1")


async def test_usage_batch(ctx: BillingContext) -> None:
    await ctx.store.adjust(T, "c1", 1 * D, "adjustment", op_id="seed")
    items = [usage.Usage(account="c1", meter="sms", quantity=2, event_id="b1"),
             usage.Usage(account="c2", meter="sms", quantity=1, event_id="b2"),
             usage.Usage(account="c1", meter="email_test", quantity=20, event_id="b3")]
    out = await usage.record_batch(ctx, T, items)
    assert [(r.ok, r.error) for r in out] == [(True, ""), (True, ""),
                                               (False, "insufficient_funds")]
    bad = [*items, usage.Usage(account="c1", meter="nope", quantity=1, event_id="b4")]
    with pytest.raises(InvalidRequest) as err:
        await usage.record_batch(ctx, T, bad)
    assert "items[3]" in str(err.value)
    with pytest.raises(InvalidRequest):
        await usage.record_batch(ctx, T, [items[0], items[0]])
    # event ids are per account (the idempotency scope): one id on two accounts is two events
    same_id = [usage.Usage(account="c1", meter="sms", quantity=1, event_id="e1"),
               usage.Usage(account="c2", meter="sms", quantity=1, event_id="e1")]
    assert [r.ok for r in await usage.record_batch(ctx, T, same_id)] == [True, True]


# -- archive -----------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def archive(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Archive]:
    if request.param == "sqlite":
        arc = await Archive.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    else:
        url = request.getfixturevalue("postgres_url")
        arc = await Archive.open(url)
        await arc._db.fetch("TRUNCATE ledger_entries", [])
    yield arc
    await arc.close()


async def _some_history(ctx: BillingContext) -> None:
    await ctx.store.adjust(T, "c1", 500 * D, "funding", op_id="pi_1",
                           extra={"gross": "515.00", "card_fee": "15.00",
                                  "process": "manual_funding", "user": "alice"})
    for i in range(5):
        await usage.record_usage(ctx, T, "c1", "sms", i + 1, f"u{i}", user="bob")
    await ctx.store.adjust(T, "c2", 10 * D, "adjustment", op_id="adj-1",
                           extra={"process": "=HYPERLINK()"})


async def test_archive_idempotent_and_trims_after_commit(
        ctx: BillingContext, archive: Archive) -> None:
    r = ctx.store.redis
    await _some_history(ctx)
    total = await r.xlen(keys.ledger(T))
    assert total == 7
    n = await archive.archive_once(r, T, consumer="a1")
    assert n == 7
    assert await r.xlen(keys.ledger(T)) == 0  # trimmed, only after the commit
    assert await ctx.store.ledger_sum(T, "c1") == (0, 0)
    assert await archive.account_sum(T, "c1") == (500 * D - 750_000, 6)
    # a crash after the commit and before the ack: the batch comes back, nothing doubles
    await usage.record_usage(ctx, T, "c1", "sms", 1, "late")
    fresh = await r.xreadgroup("archive", "a2", {keys.ledger(T): ">"})
    assert len(fresh[0][1]) == 1  # delivered to a2 which "dies" before committing
    assert await r.xlen(keys.ledger(T)) == 1  # pending entries are never trimmed
    rec = await account_totals(ctx.store, archive, T, "c1")
    assert rec.ok and rec.unarchived_sum == -50_000
    assert await archive.archive_once(r, T, consumer="a1", claim_idle_ms=0) == 1
    assert await archive.archive_once(r, T, consumer="a1", claim_idle_ms=0) == 0
    # replay everything already archived: ON CONFLICT DO NOTHING
    await archive._db.insert(archive._insert_sql, [
        ("acme", "1-0", 1, 0, "c1", "usage", -1, 0, "", 1, "", "", "{}")])
    await archive._db.insert(archive._insert_sql, [
        ("acme", "1-0", 1, 0, "c1", "usage", -1, 0, "", 1, "", "", "{}")])
    assert (await archive.account_sum(T, "c1"))[1] == 8
    await archive._db.fetch(
        f"DELETE FROM ledger_entries WHERE entry_id = {archive._db.ph}", ["1-0"])
    rec = await account_totals(ctx.store, archive, T, "c1")
    assert rec.ok and rec.unarchived_sum == 0 and rec.redis_balance == 500 * D - 800_000


async def test_transactions_query_and_csv(ctx: BillingContext, archive: Archive) -> None:
    await _some_history(ctx)
    await archive.archive_once(ctx.store.redis, T, consumer="a1")
    page = await archive.transactions(T, "c1", limit=4)
    assert len(page.items) == 4 and page.next_cursor
    assert [t.type for t in page.items] == ["usage"] * 4  # newest first
    rest = await archive.transactions(T, "c1", limit=4, cursor=page.next_cursor)
    assert [t.type for t in rest.items] == ["usage", "funding"] and rest.next_cursor is None
    funding = await archive.transactions(T, "c1", type="funding")
    assert [t.amount for t in funding.items] == ["500.00"]
    assert funding.items[0].extra["gross"] == "515.00"
    assert len((await archive.transactions(T, "c1", q="ALICE")).items) == 1
    assert len((await archive.transactions(T, "c1", q="bob")).items) == 5
    assert len((await archive.transactions(T, "c1", q="u3")).items) == 1  # by ref
    assert (await archive.transactions(T, "c1", q="%")).items == []
    ts = page.items[0].ts
    assert len((await archive.transactions(T, "c1", from_ms=ts + 1)).items) == 0
    assert len((await archive.transactions(T, "c1", to_ms=ts + 1)).items) == 6
    with pytest.raises(InvalidRequest):
        await archive.transactions(T, "c1", type="bogus")
    text = await archive.export_csv(T, "c1")
    lines = text.strip().split("\r\n")
    assert lines[0].startswith("id,time_utc,account,type") and len(lines) == 7
    assert ",515.00,15.00" in lines[-1]
    c2 = await archive.export_csv(T, "c2")
    assert "'=HYPERLINK()" in c2  # formula neutralised


@pytest.mark.parametrize("cursor", [
    "99999999999999999999-0", "1-99999999999999999999",  # more digits than an int64
    "9223372036854775808-0", "1-9223372036854775808",  # 2^63: SQL cannot bind it
    "\uff11-0", "1-\u0661", "-5", "1-", "1--2", " 1-0", "1-0 ", "abc",  # not an entry id
])
async def test_transactions_refuse_a_cursor_sql_cannot_hold(
        ctx: BillingContext, archive: Archive, cursor: str) -> None:
    """A cursor is a ``next_cursor`` (an entry id): anything else, or a part of 2^63 and up,
    is invalid_query (a 20-digit part raised OverflowError from SQLite: a 500)."""
    await _some_history(ctx)
    await archive.archive_once(ctx.store.redis, T, consumer="a1")
    with pytest.raises(InvalidRequest) as err:
        await archive.transactions(T, "c1", cursor=cursor)
    assert err.value.code == "invalid_query"
    # the largest ids SQL holds are cursors: everything archived comes before them
    for edge in ("9223372036854775807-9223372036854775807", "9223372036854775807"):
        assert len((await archive.transactions(T, "c1", cursor=edge)).items) == 6


async def test_account_totals_detect_drift(ctx: BillingContext, archive: Archive) -> None:
    await _some_history(ctx)
    await archive.archive_once(ctx.store.redis, T, consumer="a1")
    assert (await account_totals(ctx.store, archive, T, "c1")).ok
    await ctx.store.redis.hincrby(keys.acct(T, "c1"), "bal", 1)  # corruption
    assert not (await account_totals(ctx.store, archive, T, "c1")).ok


async def test_archive_worker_loop(ctx: BillingContext, tmp_path: Path) -> None:
    import asyncio

    from billing.archive import run_archive_worker

    arc = await Archive.open(str(tmp_path / "w.sqlite3"))
    try:
        await _some_history(ctx)
        stop = asyncio.Event()
        # a broken tenant listed first (its ledger key is not a stream: WRONGTYPE on every
        # pass) must not keep the other tenant's ledger from being archived
        await ctx.store.redis.set(keys.ledger("broken"), "not a stream")
        task = asyncio.create_task(run_archive_worker(ctx.store, arc, ["broken", T],
                                                      consumer="w", stop=stop, idle_s=0.01))
        async def archived_all() -> None:
            while (await arc.account_sum(T, "c1"))[1] < 6:  # noqa: ASYNC110 - polls SQL
                await asyncio.sleep(0.01)

        await asyncio.wait_for(archived_all(), 10)
        stop.set()
        await task
        assert (await arc.account_sum(T, "c1"))[1] == 6
    finally:
        await arc.close()


async def test_redis_unused(redis: aioredis.Redis) -> None:
    assert await redis.ping()


async def test_history_without_an_archive_reads_a_bounded_part_of_the_stream_per_page(
        ctx: BillingContext) -> None:
    """An account's history is picked out of its tenant's stream. Without an SQL archive
    (none could be opened) a page used to read the whole stream, however long; it now reads
    at most ``scan`` entries and its cursor goes on from where it stopped, so paging still
    sees every entry once."""
    from billing.archive import history

    mine = []
    for i in range(4):
        mine.append((await ctx.store.adjust(T, "c1", D, "adjustment", op_id=f"m{i}")).entry)
        for j in range(3):  # another account's entries in between
            await ctx.store.adjust(T, "c2", D, "adjustment", op_id=f"o{i}.{j}")
    seen: list[str] = []
    before, pages = "+", 0
    while True:
        page = await history(ctx.store, None, T, "c1", limit=10, before=before, scan=3,
                             page=2)
        seen += [i for i, _ in page.entries]
        pages += 1
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == mine[::-1] and pages > 4  # each page read at most 3 entries

"""The lead archive (billing/leads.py): sold leads handed on by the delivery worker, into
SQL idempotently, outcomes and returns as UPDATEs, personal fields erased on time; on
SQLite and (when installed) PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from billing.leads import DAY_MS, LeadArchive, personal_of, run_lead_archive
from engine.core import keys
from engine.core.config import Buyer, Campaign, Config, Field, Tenant
from engine.delivery.worker import DeliveryWorker, WorkerOptions
from engine.store.store import Store
from tests.helpers import sales

T = sales.T


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def leads(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LeadArchive]:
    if request.param == "sqlite":
        arc = await LeadArchive.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    else:
        arc = await LeadArchive.open(request.getfixturevalue("postgres_url"))
        await arc._db.fetch("TRUNCATE sold_leads, sold_lead_attempts", [])
    yield arc
    await arc.close()


def _cfg(*buyers: Buyer) -> Config:
    return Config(
        tenants=[Tenant(id=T, api_token="tok", pii_retention_days=30)],
        campaigns=[Campaign(id="cmp", tenant=T, fields=[
            Field(name="contact", type="email"), Field(name="state", type="state")])],
        buyers=list(buyers))


def _buyer(bid: str) -> Buyer:  # no webhook: delivered (ACCEPTED) by being sold
    return Buyer(id=bid, tenant=T, campaign="cmp", client=f"c-{bid}", price="5.00")


async def _sold(redis: aioredis.Redis, n: int, *, cfg: Config | None = None,
                supplier: str = "s7") -> tuple[Store, Config, DeliveryWorker]:
    store = Store(redis)
    b = _buyer("b1")
    cfg = cfg or _cfg(b)
    await sales.accounts(store, b)
    for i in range(n):
        await sales.sell(store, b, f"L{i}", {"first_name": "Ada", "contact": "ada@x.test",
                                            "state": "CA", "i": str(i)},
                         supplier=supplier)
    w = DeliveryWorker(cfg, store, tenants=[T], consumer="d1",
                       options=WorkerOptions(block_ms=20))
    return store, cfg, w


async def _count(arc: LeadArchive) -> list[Any]:
    return await arc._db.fetch("SELECT COUNT(*), COUNT(DISTINCT lead_id) FROM sold_leads", [])


async def test_sales_archived_once_with_outcome_and_return(
        redis: aioredis.Redis, leads: LeadArchive) -> None:
    store, cfg, w = await _sold(redis, 3)
    assert await w.process_once(block_ms=20) == 3  # delivered: the jobs are deleted
    await w.close()
    assert await redis.xlen(keys.deliveries(T)) == 0
    # each handed on when first read, then settled: its decision and delivery log there,
    # the log gone from Redis (the decision stays: it guards against a second delivery)
    assert await redis.xlen(keys.sold(T)) == 6
    for i in range(3):
        assert not await redis.exists(keys.dlog(T, f"L{i}", "b1"))
        assert await redis.exists(keys.dstate(T, f"L{i}"))
    personal = personal_of(cfg, T)
    assert await leads.archive_once(redis, T, consumer="a1", personal=personal) >= 3
    assert await redis.xlen(keys.sold(T)) == 0  # committed, then deleted
    page = await leads.leads(T, ["c-b1"])
    assert [s.lead_id for s in page.items] == ["L2", "L1", "L0"]
    s = page.items[0]
    assert (s.buyer, s.campaign, s.account, s.price, s.fee) == (
        "b1", "cmp", "c-b1", 5_000_000, sales.FEE)
    # the lead's supplier, carried by decide.lua's delivery job into the SQL row (#18)
    assert await leads._db.fetch("SELECT DISTINCT supplier FROM sold_leads", []) == [("s7",)]
    assert s.supplier == "s7"
    assert s.outcome == "accepted" and not s.returned
    assert s.fields == {"first_name": "Ada", "contact": "ada@x.test", "state": "CA", "i": "2"}
    # a replay of the same sales (a job handed on twice) changes nothing
    for i in range(3):
        await redis.xadd(keys.sold(T), {"lead_id": f"L{i}", "buyer": "b1", "campaign": "cmp",
                                        "account": "c-b1", "price": "1", "ts": "1",
                                        "lead": "{}"})
    await leads.archive_once(redis, T, consumer="a1", personal=personal)
    assert await _count(leads) == [(3, 3)]
    assert (await leads.leads(T, ["c-b1"])).items[0].price == 5_000_000
    # a return: the lead_returned event, once
    assert (await store.refund_sale(T, "L1", "b1", "not interested", kind="return")).ok
    await leads.archive_once(redis, T, consumer="a1", personal=personal)
    got = await leads.lead(T, ["c-b1"], "L1", "b1")
    assert got is not None and got.returned and got.return_reason == "not interested"
    assert await leads.lead(T, ["c-other"], "L1", "b1") is None  # another account's: none
    assert [(a.buyer, a.attempt, a.result, a.reason) for a in got.attempts] == [
        ("b1", 0, "accepted", "no webhook configured")]  # the delivery log, from SQL
    csv = "".join([c async for c in leads.iter_csv(T, ["c-b1"])])
    assert csv.count("\r\n") == 4 and "not interested" in csv
    assert csv.startswith("lead_id,time_utc,campaign,buyer,") and csv.split("\r\n")[0].endswith(
        ",return_reason,supplier") and ",cmp,b1," in csv and ",s7\r\n" in csv


async def test_interrupted_batch_redelivered_nothing_doubled_nothing_lost(
        redis: aioredis.Redis, leads: LeadArchive) -> None:
    """The SQL commit happened, the worker died before its ack: the entries are claimed by
    the next worker and upserted again (nothing doubled); a worker that died before the
    commit leaves them pending (nothing lost)."""
    _, cfg, w = await _sold(redis, 5)
    await w.process_once(block_ms=20)
    await w.close()
    real = leads._db.insert
    calls = 0

    async def dies_after_commit(sql: str, rows: Any) -> None:
        nonlocal calls
        calls += 1
        await real(sql, rows[:2]) if calls == 1 else None  # died mid-batch: 2 rows in
        raise ConnectionError("killed")

    leads._db.insert = dies_after_commit  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await leads.archive_once(redis, T, consumer="dead", personal=personal_of(cfg, T))
    with pytest.raises(ConnectionError):  # dies before any commit this time
        await leads.archive_once(redis, T, consumer="dead", personal=personal_of(cfg, T),
                                 claim_idle_ms=0)
    leads._db.insert = real  # type: ignore[method-assign]
    assert await redis.xlen(keys.sold(T)) == 10  # nothing acked, nothing deleted
    assert await leads.archive_once(redis, T, consumer="heir", personal=personal_of(cfg, T),
                                    claim_idle_ms=0) >= 5
    assert await _count(leads) == [(5, 5)]
    assert await redis.xlen(keys.sold(T)) == 0
    assert (await redis.xpending(keys.sold(T), "leads"))["pending"] == 0


async def test_personal_fields_erased_after_retention(
        redis: aioredis.Redis, leads: LeadArchive) -> None:
    _, cfg, w = await _sold(redis, 2)
    await w.process_once(block_ms=20)
    await w.close()
    await leads.archive_once(redis, T, consumer="a1", personal=personal_of(cfg, T))
    sold_at = (await leads.leads(T, ["c-b1"])).items[-1].ts
    assert await leads.erase_personal(T, 30, now=sold_at + 30 * DAY_MS - 1) == 0
    s = (await leads.leads(T, ["c-b1"])).items[0]
    assert not s.erased and s.fields["contact"] == "ada@x.test"
    assert await leads.erase_personal(T, 30, now=sold_at + 31 * DAY_MS) == 2
    for s in (await leads.leads(T, ["c-b1"])).items:
        # the campaign's email-typed field and the name went; the rest stays
        assert s.erased and s.fields == {"state": "CA", "i": s.lead_id[1:]}
        assert s.price == 5_000_000 and s.outcome == "accepted"
    assert await leads.erase_personal(T, 30, now=sold_at + 40 * DAY_MS) == 0


async def test_worker_loop_with_an_injected_clock(redis: aioredis.Redis,
                                                  leads: LeadArchive) -> None:
    store, cfg, w = await _sold(redis, 2)
    await w.process_once(block_ms=20)
    await w.close()
    now = [datetime.now(UTC).timestamp() * 1000 + 31 * DAY_MS]  # a month on: erase at once
    stop = asyncio.Event()
    task = asyncio.create_task(run_lead_archive(store, leads, cfg, consumer="w", stop=stop,
                                                idle_s=0.01, clock=lambda: int(now[0])))
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        items = (await leads.leads(T, ["c-b1"])).items
        if len(items) == 2 and all(s.erased for s in items):
            break
        assert asyncio.get_running_loop().time() < deadline, items
        await asyncio.sleep(0.02)
    stop.set()
    await task


async def test_daily_in_the_tenant_time_zone(redis: aioredis.Redis,
                                             leads: LeadArchive) -> None:
    rows = [  # 23:30 UTC on 1 March and 04:30 on 2 March are both 1 March in New York (EST)
        (T, "A", "b1", int(datetime(2026, 3, 1, 23, 30, tzinfo=UTC).timestamp() * 1000),
         "cmp", "", "c-b1", 10_000_000, 0, "{}", None, 1),
        (T, "B", "b1", int(datetime(2026, 3, 2, 4, 30, tzinfo=UTC).timestamp() * 1000),
         "cmp", "", "c-b1", 20_000_000, 0, "{}", None, 1),
    ]
    await leads._db.insert(leads._upsert_sql, rows)
    days = await leads.daily(T, ["c-b1"], first=date(2026, 3, 1), last=date(2026, 3, 2),
                             tz="America/New_York")
    assert [(d.day.day, d.leads, d.spend) for d in days] == [(1, 2, 30_000_000), (2, 0, 0)]
    utc = await leads.daily(T, ["c-b1"], first=date(2026, 3, 1), last=date(2026, 3, 2),
                            tz="UTC")
    assert [(d.day.day, d.leads) for d in utc] == [(1, 1), (2, 1)]

"""GET /v1/accounts/{id}/overview on the real engine: its payment history and last
transactions come from the Redis ledger and the SQL archive together.

On a running engine the ledger worker archives an account's entries to SQL and trims them
from its Redis stream within moments; the overview read the stream only, so it showed no
payments and no transactions at all (found by a newcomer's walkthrough).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from billing import archive as archive_mod
from billing.archive import Archive
from engine.core import keys
from engine.run.workers import WorkerFn, ledger_worker
from engine.store.embedded import EmbeddedRedis
from tests.helpers.harness import Engine, buyer, campaign, make_config, running

LEDGER = keys.ledger("t1")  # the tenant stream: c1's entries and the others'


@pytest.fixture
def cfg():
    return make_config(campaign(), buyer("b1", price="10.00"))


def engine(cfg: Any, url: str, state_dir: Path, workers: list[WorkerFn]
           ) -> contextlib.AbstractAsyncContextManager[Engine]:
    return running(cfg, url, workers=workers, state_dir=state_dir)


async def credit(eng: Engine, key: str, amount: str = "5.00") -> str:
    status, body = await eng.api("POST", "/v1/accounts/c1/credits",
                                 json={"amount": amount, "note": key},
                                 headers={"Idempotency-Key": key})
    assert status == 201, body
    return str(body["entry"])


async def overview(eng: Engine) -> dict[str, Any]:
    status, body = await eng.api("GET", "/v1/accounts/c1/overview")
    assert status == 200, body
    return dict(body)


async def transactions(eng: Engine) -> list[dict[str, Any]]:
    status, body = await eng.api("GET", "/v1/accounts/c1/transactions?limit=10")
    assert status == 200, body
    return list(body["data"])


@contextlib.asynccontextmanager
async def stream_trims(redis: aioredis.Redis, key: str) -> AsyncIterator[Any]:
    """Redis keyspace notifications of XTRIM on ``key`` (sent only when entries went), to
    wait for the ledger worker's trim without polling; the server's setting is restored."""
    before = (await redis.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    await redis.config_set("notify-keyspace-events", "Kt")
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(f"__keyspace@0__:{key}")
        yield pubsub
    finally:
        await pubsub.aclose()
        await redis.config_set("notify-keyspace-events", before)


async def until_trimmed_empty(redis: aioredis.Redis, key: str, pubsub: Any) -> None:
    """Wait until the stream is empty: every entry archived (the worker trims only after
    its SQL commit). Notifications arriving meanwhile are queued on the subscription."""
    async with asyncio.timeout(30):
        while await redis.xlen(key):
            # blocks until a message; None: it was the subscription's confirmation
            while await pubsub.get_message(ignore_subscribe_messages=True, timeout=None) is None:
                pass


async def test_overview_shows_history_the_running_ledger_worker_archived(
        redis, redis_server: EmbeddedRedis, cfg, tmp_path: Path) -> None:
    """As in `leadflow run`: the ledger worker runs and empties the account's Redis
    ledger. Manual credits that GET /transactions lists were missing from the overview's
    payment history (always []), and so was every entry from its last transactions."""
    async with stream_trims(redis, LEDGER) as trims, \
            engine(cfg, redis_server.url, tmp_path, [ledger_worker]) as eng:
        credits = [await credit(eng, f"ov-{i}", f"{i + 1}.00") for i in range(3)]
        for i in range(2):
            status, body = await eng.lead(email=f"ov{i}@example.com")
            assert status == 200 and body["status"] == "ACCEPTED", body
        await until_trimmed_empty(redis, LEDGER, trims)
        body = await overview(eng)
        assert [p["id"] for p in body["payment_history"]] == credits[::-1]
        assert [(p["type"], p["amount"], p["process"]) for p in body["payment_history"]] == [
            ("funding", "3.00", "manual"), ("funding", "2.00", "manual"),
            ("funding", "1.00", "manual")]
        last = body["last_transactions"]
        assert [t["type"] for t in last] == ["lead", "lead", "funding", "funding", "funding",
                                             "adjustment"]  # the opening entry last
        assert last[0]["balance"] == body["balance"] == "86.00"
        assert last == await transactions(eng)  # the archive's own view, entry for entry


async def test_overview_joins_stream_and_archive_without_gaps_or_doubles(
        redis, redis_server: EmbeddedRedis, cfg, tmp_path: Path) -> None:
    """The ledger worker caught between its steps: some entries only in SQL (archived and
    trimmed), some in both (archived, but a dead worker's pending batch holds the trim
    back), some only in Redis (that pending batch, and one not read yet). The overview
    shows each once, newest first: what /transactions shows once everything is archived."""
    async with engine(cfg, redis_server.url, tmp_path, []) as eng:
        worker = await Archive.open(path=str(tmp_path / "ledger.sqlite3"))
        try:
            a = [await credit(eng, "a1"), await credit(eng, "a2")]
            assert await worker.archive_once(redis, "t1", consumer="w1") > 0
            assert await redis.xlen(LEDGER) == 0  # opening, a1, a2: SQL only
            b = await credit(eng, "b1")
            status, lead = await eng.lead(email="mid@example.com")
            assert status == 200 and lead["status"] == "ACCEPTED", lead
            # a worker reads the batch with b1 and the sale, then dies before its commit
            assert await redis.xreadgroup(archive_mod.GROUP, "dead",
                                          {keys.ledger("t1"): ">"})
            c = [await credit(eng, "c1"), await credit(eng, "c2")]
            assert await worker.archive_once(redis, "t1", consumer="w1") > 0
            d = await credit(eng, "d1")  # not read by any worker yet
            in_stream = [i for i, _ in await eng.store.ledger_page("t1", "c1")]
            assert in_stream[0] == d and in_stream[1:3] == c[::-1] and b in in_stream
            assert len(in_stream) == 5  # d1, c2, c1, the sale, b1
            archived = await worker.transactions("t1", "c1", limit=10)
            assert c[0] in {t.id for t in archived.items}  # in SQL and still in Redis
            assert b not in {t.id for t in archived.items}

            body = await overview(eng)
            ids = [t["id"] for t in body["last_transactions"]]
            assert ids == [*in_stream, *a[::-1], ids[-1]] and len(set(ids)) == 8
            assert body["last_transactions"][-1]["extra"]["kind"] == "opening"
            assert [p["id"] for p in body["payment_history"]] == [d, *c[::-1], b, *a[::-1]]
            # at most `scan` stream entries read: older ones come from SQL alone, each once
            capped = await archive_mod.recent(eng.store, worker, "t1", "c1", limit=10,
                                              scan=2, page=1)
            assert [t.id for t in capped] == [d, c[1], c[0], *a[::-1], ids[-1]]

            # everything archived: the archive alone now says what the overview said
            await worker.archive_once(redis, "t1", consumer="w1", claim_idle_ms=0)
            assert await worker.archive_once(redis, "t1", consumer="w1") == 0
            assert await redis.xlen(LEDGER) == 0
            assert await transactions(eng) == body["last_transactions"]
            assert (await overview(eng))["payment_history"] == body["payment_history"]
        finally:
            await worker.close()


async def test_ledger_pages_on_from_redis_into_the_archive(
        redis, redis_server: EmbeddedRedis, cfg, tmp_path: Path) -> None:
    """GET /v1/accounts/{id}/ledger used to list only the entries still in Redis: once the
    ledger worker had archived them it was empty. It now pages on into the SQL archive,
    each entry once, in the order /transactions lists them."""
    async with engine(cfg, redis_server.url, tmp_path, []) as eng:
        worker = await Archive.open(path=str(tmp_path / "ledger.sqlite3"))
        try:
            archived = [await credit(eng, f"old-{i}") for i in range(3)]
            status, body = await eng.lead(email="sold@example.com")  # wallet entries too
            assert status == 200 and body["status"] == "ACCEPTED", body
            assert await worker.archive_once(redis, "t1", consumer="w1") > 0
            assert await redis.xlen(LEDGER) == 0  # all in SQL now
            fresh = [await credit(eng, f"new-{i}") for i in range(2)]
            seen, query = [], ""
            while query is not None:
                status, page = await eng.api("GET", f"/v1/accounts/c1/ledger?limit=2{query}")
                assert status == 200, page
                seen += [e["id"] for e in page["entries"]]
                nxt = page["next_before"]
                query = None if nxt is None else f"&before={nxt}"
            assert seen[:2] == fresh[::-1] and seen[3:6] == archived[::-1]
            assert len(seen) == len(set(seen)) == 7  # 2 new, the sale, 3 old, the opening
            # a hand-made cursor of a bare millisecond: the entries before it, the same in
            # Redis (fresh) and in the archive (archived); Redis used to include that ms
            for entry in (fresh[1], archived[1]):
                ms = int(entry.split("-")[0])
                _, page = await eng.api("GET", f"/v1/accounts/c1/ledger?limit=1000&before={ms}")
                assert [e["id"] for e in page["entries"]] == [
                    i for i in seen if int(i.split("-")[0]) < ms]
            await worker.archive_once(redis, "t1", consumer="w1")
            assert seen == [t["id"] for t in await transactions(eng)]
        finally:
            await worker.close()

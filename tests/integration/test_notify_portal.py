"""Portal users as recipients (#18, docs/notifications.md): a client's messages go to its
contacts and to the active portal users mapped to it, each address once, each with its own
preferences and unsubscribe link; exactly once per (event, recipient, kind). A real
engine, its notify worker, a real aiosmtpd SMTP server, the identity store in SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis

from billing.archive import Archive
from engine.core import keys
from engine.core.config import WEEKDAYS
from engine.notify.outbox import Outbox
from engine.notify.recipients import merged
from engine.notify.weekly import WeeklyReports
from engine.notify.worker import GROUP, smtp_transport
from engine.run.workers import REGISTRY
from tests.helpers.harness import buyer, campaign, make_config, running
from tests.helpers.notify_config import CONTACT, notify_toml, smtp_table
from tests.helpers.portal import make_user
from tests.helpers.smtp import SmtpServer

PUBLIC = "https://leads.acme.example"


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(15):
        while not await check():  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(0.05)


async def _group(redis: aioredis.Redis) -> dict[str, object]:
    if not await redis.exists(keys.events("t1")):  # the worker has not made it yet
        return {}
    for g in await redis.xinfo_groups(keys.events("t1")):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == GROUP:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.items()}
    return {}


async def _started(redis: aioredis.Redis) -> bool:
    return bool(await _group(redis))


async def _done(redis: aioredis.Redis) -> bool:
    last = await redis.xrevrange(keys.events("t1"), count=1)
    g = await _group(redis)
    return bool(last and g) and g["pending"] == 0 \
        and g["last-delivered-id"] == last[0][0].decode()


def test_addresses_are_merged_once_whatever_their_case() -> None:
    assert merged(["AP@Bright.example", "b@x.example"], ["ap@bright.example ", "c@x.example",
                                                         "B@X.example"]) == (
        "AP@Bright.example", "b@x.example", "c@x.example")


async def test_a_clients_portal_users_get_its_messages_once(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer, tmp_path: Path) -> None:
    """c1 (contact ap@bright.example) has portal users: its contact's address in capitals
    (one e-mail, not two), an owner (its own e-mail), one who turned returns off (no
    return_decided, but the balance alert, a category that cannot be turned off), a
    disabled, a deleted and an invited one (nothing); a user of c2 and an operator get
    nothing of c1. A lead takes c1 under its alert, its return is granted: each message
    once per recipient, each optional one with the recipient's own unsubscribe link; the
    events replayed send nothing again."""
    cfg = make_config(campaign(), buyer("b1", price="10.00"),
                      base=notify_toml(smtp_table(smtp_server.host, smtp_server.port))
                      + f'\n[settings]\npublic_url = "{PUBLIC}"\n')
    async with running(cfg, redis_server.url, state_dir=tmp_path,
                       workers=[REGISTRY["notify"]]) as eng:
        ids = eng.app.identity
        assert ids is not None
        await make_user(eng, CONTACT.upper(), ["c1"])
        await make_user(eng, "owner@bright.example", ["c1", "c2"])
        await make_user(eng, "quiet@bright.example", ["c1"])
        disabled = await make_user(eng, "disabled@bright.example", ["c1"])
        await ids.update_user("t1", disabled, status="disabled")
        deleted = await make_user(eng, "deleted@bright.example", ["c1"])
        await ids.delete_user("t1", deleted)
        await ids.create_user("t1", "invited@bright.example", ["c1"], invite_ttl_ms=3_600_000)
        await make_user(eng, "c2only@bright.example", ["c2"])
        await make_user(eng, "ops@bright.example", [], role="operator")
        status, _ = await eng.api("PUT", "/v1/notify/preferences", json={
            "address": "quiet@bright.example", "categories": {"returns": False}})
        assert status == 200
        await _until(lambda: _started(redis))

        status, sold = await eng.lead(email="jane@example.com")  # 25 -> 15: under 20
        assert status == 200 and sold["status"] == "ACCEPTED", sold
        status, _ = await eng.api("POST", f"/v1/leads/{sold['lead_id']}/returns",
                                  json={"buyer": "b1", "reason": "wrong_number"})
        assert status == 200
        await _until(lambda: _done(redis))
        got = sorted((r.recipients[0], r.message["Subject"].split(" ")[0])
                     for r in smtp_server.received)
        assert got == [
            (CONTACT, "Return"), (CONTACT, "Your"),
            ("ops@acme.example", "Lead"),  # return_requested: the tenant's operators
            ("owner@bright.example", "Return"), ("owner@bright.example", "Your"),
            ("quiet@bright.example", "Your")]
        links = {r.recipients[0]: r.message["List-Unsubscribe"] for r in smtp_server.received
                 if r.message["Subject"].startswith("Return granted")}
        assert len(set(links.values())) == 2 and all(v.startswith(f"<{PUBLIC}/")
                                                      for v in links.values())

        # every entry read again: nothing sent twice
        await redis.xgroup_setid(keys.events("t1"), GROUP, "0")
        await _until(lambda: _done(redis))
        assert len(smtp_server.received) == 6


async def test_the_weekly_report_goes_to_the_clients_portal_users_too(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer, tmp_path: Path) -> None:
    """The weekly report of c1: its contact and its active portal user, once each (a
    disabled user, none)."""
    tz = ZoneInfo("UTC")
    day = datetime.now(tz).date() + timedelta(days=2)
    due = int(datetime.combine(day, day_time(9), tz).timestamp() * 1000)
    cfg = make_config(campaign(), buyer("b1", price="10.00"), base=notify_toml(
        smtp_table(smtp_server.host, smtp_server.port), operators=(),
        weekly_day=WEEKDAYS[day.weekday()]))
    archive = await Archive.open(path=str(tmp_path / "archive.db"))
    try:
        async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
            ids = eng.app.identity
            assert ids is not None
            await make_user(eng, "owner@bright.example", ["c1"])
            off = await make_user(eng, "off@bright.example", ["c1"])
            await ids.update_user("t1", off, status="disabled")
            transport = smtp_transport(cfg.tenant("t1"))
            assert transport is not None
            reports = WeeklyReports(cfg, eng.svc.store, archive,
                                    {"t1": Outbox(redis, "t1", transport)},
                                    clock_ms=lambda: due, portal=ids.notify_addresses)
            assert await reports.run_due("t1") == 2
            assert sorted(r.recipients[0] for r in smtp_server.received) == [
                CONTACT, "owner@bright.example"]
            assert await reports.run_due("t1") == 0
    finally:
        await archive.close()

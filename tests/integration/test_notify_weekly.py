"""The weekly report (engine/notify/weekly.py) on a running engine: a real redis-server, the
SQL archive in SQLite, a real aiosmtpd server and an injected clock (nothing slept).

The tenant's report day is set two days after today in New York, so the report due before
the test's "now" is five days old (past LATE_MS: skipped) and the next one covers today."""

from __future__ import annotations

import email.message
from datetime import datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from billing.archive import Archive
from engine.core import keys
from engine.core.config import WEEKDAYS, Config
from engine.notify import prefs
from engine.notify.outbox import Outbox
from engine.notify.weekly import KIND, MAX_ATTEMPTS, WeeklyReports, event_id, last_due
from engine.notify.worker import smtp_transport
from tests.helpers.harness import buyer, campaign, make_config, running
from tests.helpers.notify_config import CONTACT, notify_toml, smtp_table
from tests.helpers.smtp import SmtpServer

TZ = ZoneInfo("America/New_York")
OPERATOR = "ops@acme.example"


def _due_ms() -> tuple[str, int]:
    """A report day two days from today in New York, and its 09:00 there."""
    today = datetime.now(TZ).date()
    day = today + timedelta(days=2)
    return WEEKDAYS[day.weekday()], int(datetime.combine(day, day_time(9), TZ).timestamp() * 1000)


def _config(server: SmtpServer, day: str) -> Config:
    toml = notify_toml(smtp_table(server.host, server.port), operators=(OPERATOR,),
                       weekly_day=day, opening="100.00", timezone="America/New_York")
    return make_config(campaign(), buyer("b1", price="10.00"), base=toml)


def _text(msg: email.message.EmailMessage) -> str:
    return msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_last_due_is_the_day_and_hour_in_the_tenants_zone() -> None:
    def ms(*a: int) -> int:
        return int(datetime(*a, tzinfo=TZ).timestamp() * 1000)

    # Monday 2026-12-07, 08:59 in New York: not yet; the week before's report
    week = last_due(ms(2026, 12, 7, 8, 59), TZ, "mon", "09:00")
    assert (str(week.start), str(week.end)) == ("2026-11-23", "2026-11-29")
    week = last_due(ms(2026, 12, 7, 9, 0), TZ, "mon", "09:00")
    assert (str(week.start), str(week.end)) == ("2026-11-30", "2026-12-06")
    assert week.due_ms == ms(2026, 12, 7, 9, 0)
    assert (week.from_ms, week.to_ms) == (ms(2026, 11, 30), ms(2026, 12, 7))
    # the week with the end of daylight saving time (2026-11-01) has 169 hours
    week = last_due(ms(2026, 11, 2, 10, 0), TZ, "mon", "09:00")
    assert str(week.start) == "2026-10-26"
    assert week.to_ms - week.from_ms == 169 * 3_600_000
    # 09:00 in New York is 14:00 UTC in winter
    assert week.due_ms == int(datetime(2026, 11, 2, 14, 0, tzinfo=ZoneInfo("UTC"))
                              .timestamp() * 1000)


async def test_the_weekly_report_is_sent_once_at_its_local_time(
        redis, redis_server, smtp_server: SmtpServer, tmp_path: Path) -> None:
    day, due = _due_ms()
    cfg = _config(smtp_server, day)
    archive = await Archive.open(path=str(tmp_path / "ledger.db"))
    now = [due - 60_000]

    def reports() -> WeeklyReports:  # a worker (re)started: its own instance, one clock
        transport = smtp_transport(cfg.tenant("t1"))
        assert transport is not None
        return WeeklyReports(cfg, eng.svc.store, archive,
                             {"t1": Outbox(redis, "t1", transport)}, clock_ms=lambda: now[0])

    try:
        async with running(cfg, redis_server.url) as eng:
            for n in range(2):
                status, body = await eng.lead(email=f"jane{n}@example.com")
                assert status == 200 and body["status"] == "ACCEPTED", body
                if n == 0:  # the first sale in SQL, the second still in the stream only
                    assert await archive.archive_once(redis, "t1", consumer="t") > 0
            status, _ = await eng.api("POST", "/v1/leads/" + body["lead_id"] + "/returns",
                                      json={"buyer": "b1", "reason": "wrong_number"})
            assert status == 200

            worker = reports()
            assert await worker.run_due("t1") == 0  # 08:59: not yet
            assert smtp_server.received == []

            now[0] = due
            assert await worker.run_due("t1") == 2  # the client's contact and the operator
            got = {r.recipients[0]: r.message for r in smtp_server.received}
            assert set(got) == {CONTACT, OPERATOR}
            client = _text(got[CONTACT])
            assert "Leads received: 2" in client
            assert "Spent: 20.00 USD" in client  # two leads at 10.00
            assert "Leads returned: 1 (10.00 USD credited)" in client
            assert "Balance: 90.00 USD" in client
            assert got[CONTACT]["Subject"] == "Your week: 2 leads, 20.00 USD"
            wallet = _text(got[OPERATOR])
            # the fees: 2 x (0.10 inbound + 0.20 delivery), less the returned sale's 0.20
            assert "Spent: 0.40 USD" in wallet and "Balance: 999.60 USD" in wallet
            week = last_due(due, TZ, day, "09:00")
            assert await redis.exists(keys.weekly("t1", week.start.isoformat()))

            now[0] = due + 60_000
            assert await worker.run_due("t1") == 0
            # a restarted worker, and the week's mark lost: the outbox still sends nothing
            await redis.delete(keys.weekly("t1", week.start.isoformat()))
            assert await reports().run_due("t1") == 0
            assert len(smtp_server.received) == 2
    finally:
        await archive.close()


async def test_a_report_that_fails_is_retried_then_given_up(
        redis, redis_server, smtp_server: SmtpServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    day, due = _due_ms()
    cfg = _config(smtp_server, day)
    archive = await Archive.open(path=str(tmp_path / "ledger.db"))
    now = [due]
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    smtp_server.stop()
    try:
        async with running(cfg, redis_server.url) as eng:
            outbox = Outbox(redis, "t1", transport, retry_base_ms=1_000, retry_max_ms=1_000,
                            clock_ms=lambda: now[0])
            worker = WeeklyReports(cfg, eng.svc.store, archive, {"t1": outbox},
                                   clock_ms=lambda: now[0])
            week = last_due(due, TZ, day, "09:00")
            event = event_id(week, "c1")
            assert await worker.run_due("t1") == 0
            attempts, retry_at = await outbox.tries(event, CONTACT, KIND)
            assert attempts == 1 and retry_at is not None
            assert await worker.run_due("t1") == 0  # before its retry time: not tried
            assert (await outbox.tries(event, CONTACT, KIND))[0] == 1
            assert not await redis.exists(keys.weekly("t1", week.start.isoformat()))

            smtp_server.start()
            now[0] = due + 1_000  # both recipients' backoffs (at most a second) are over
            assert await worker.run_due("t1") == 2
            assert sorted(r.recipients[0] for r in smtp_server.received) == [CONTACT,
                                                                              OPERATOR]

            # the next week, the server gone for good: given up after MAX_ATTEMPTS
            smtp_server.stop()
            monkeypatch.setattr("engine.notify.weekly.MAX_ATTEMPTS", 2)
            assert MAX_ATTEMPTS > 2
            now[0] = due + 7 * 86_400_000
            nxt = last_due(now[0], TZ, day, "09:00")
            # the operator turned the reports off: only the client's contact is tried
            await prefs.set_preferences(redis, "t1", OPERATOR, {"reports": False})
            await worker.run_due("t1")
            assert not await redis.exists(keys.weekly("t1", nxt.start.isoformat()))
            now[0] += 1_000  # the backoff is at most a second
            await worker.run_due("t1")  # the second failure: given up, the week done
            assert await redis.exists(keys.weekly("t1", nxt.start.isoformat()))
            now[0] += 1_000
            await worker.run_due("t1")
            assert (await outbox.tries(event_id(nxt, "c1"), CONTACT, KIND))[0] == 2
            assert (await outbox.tries(event_id(nxt, "wallet"), OPERATOR, KIND))[0] == 0
            assert len(smtp_server.received) == 2
    finally:
        await archive.close()

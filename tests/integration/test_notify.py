"""The notification worker (engine/notify/worker.py) in a running engine: a real redis-server,
a real aiosmtpd SMTP server (or a local stand-in for SendGrid's API), a lead whose debit
takes a client under its alert threshold.

Exactly one e-mail per (event, recipient, kind): a replayed event sends nothing again, and
an SMTP server down when the event comes is sent to once it is back (the consumer's claim
of idle entries retries it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from engine.core import keys
from engine.core.config import Config
from engine.notify.outbox import Outbox, entry_id
from engine.notify.sendgrid import ENTRY_ARG
from engine.notify.worker import GROUP, run_notify_worker, smtp_transport
from engine.run.workers import REGISTRY, WorkerContext, in_process_workers
from tests.helpers.harness import buyer, campaign, make_config, running
from tests.helpers.notify_config import CONTACT, notify_toml, sendgrid_table, smtp_table
from tests.helpers.sendgrid import SendGridServer
from tests.helpers.smtp import SmtpServer
from tests.helpers.streams import group


def _config(server: SmtpServer, caps: str = "") -> Config:
    return make_config(campaign(), buyer("b1", price="10.00", extra=caps),
                       base=notify_toml(smtp_table(server.host, server.port)))


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(15):
        while not await check():  # noqa: ASYNC110 - polls Redis and the SMTP server
            await asyncio.sleep(0.05)


async def _group(redis: aioredis.Redis) -> dict[str, object]:
    return await group(redis, keys.events("t1"), GROUP)


def _started(redis: aioredis.Redis) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await _group(redis))
    return check


async def _alert_id(redis: aioredis.Redis) -> str:
    rows = await redis.xrange(keys.events("t1"))
    ids = [i.decode() for i, f in rows if f[b"type"] == b"balance_alert"]
    assert len(ids) == 1, rows
    return ids[0]


async def _done(redis: aioredis.Redis) -> bool:
    """The notify group read every entry and holds none pending."""
    last = await redis.xrevrange(keys.events("t1"), count=1)
    g = await _group(redis)
    return bool(last and g) and g["pending"] == 0 \
        and g["last-delivered-id"] == last[0][0].decode()


async def test_a_balance_alert_is_one_email_to_the_contact_and_a_replay_sends_none(
        redis, redis_server, smtp_server: SmtpServer) -> None:
    cfg = _config(smtp_server)
    async with running(cfg, redis_server.url, workers=[REGISTRY["notify"]]) as eng:
        await _until(_started(redis))  # the group starts at the stream's end
        status, body = await eng.lead(email="jane@example.com")
        assert status == 200 and body["status"] == "ACCEPTED", body
        assert await eng.balance("c1") == 15_000_000
        await _until(lambda: _done(redis))
        assert len(smtp_server.received) == 1
        got = smtp_server.received[0]
        assert got.recipients == [CONTACT]
        assert got.message["Subject"] == "Your balance is under 20.00 USD"
        text = got.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "15.00 USD" in text and "Bright Solar" in text and "c1" in text

        # the same entry delivered again: the group re-reads the whole stream
        await redis.xgroup_setid(keys.events("t1"), GROUP, "0")
        await _until(lambda: _done(redis))
        assert len(smtp_server.received) == 1


def _text(got: object) -> str:
    body = got.message.get_body(("plain",)).get_content()  # type: ignore[attr-defined]
    return " ".join(body.split())


async def test_each_event_of_an_account_is_its_email_to_the_right_recipients(
        redis, redis_server, smtp_server: SmtpServer) -> None:
    """$25 at $10 a lead, a daily cap of 3: 25 -> 15 (balance_alert) -> 5 -> -5
    (balance_negative, and the cap filled: cap_reached); the third lead is returned
    (return_requested to the operators, return_decided to the client); a manual credit
    of $100 (funding_received). One e-mail each, with its amounts."""
    cfg = _config(smtp_server, caps="caps = { day = 3 }")
    async with running(cfg, redis_server.url, workers=[REGISTRY["notify"]]) as eng:
        await _until(_started(redis))
        leads = []
        for i in range(3):
            status, body = await eng.lead(email=f"n{i}@example.com")
            assert status == 200 and body["status"] == "ACCEPTED", body
            leads.append(body["lead_id"])
        status, _ = await eng.api("POST", f"/v1/leads/{leads[2]}/returns",
                                  json={"buyer": "b1", "reason": "disconnected_phone"})
        assert status == 200
        status, _ = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "100.00"},
                                  headers={"Idempotency-Key": "wire-1"})
        assert status == 201
        assert await eng.balance("c1") == 105_000_000
        await _until(lambda: _done(redis))
        got = {(r.recipients[0], r.message["Subject"]): _text(r)
               for r in smtp_server.received}
        assert len(smtp_server.received) == len(got) == 6
        assert "is now 15.00 USD" in got[CONTACT, "Your balance is under 20.00 USD"]
        negative = got[CONTACT, "Your balance is negative: -5.00 USD"]
        assert "until it reaches -20.00 USD" in negative
        assert "b1 received 3 leads this day, its cap." in got[CONTACT, "b1 reached its day cap"]
        asked = got["ops@acme.example", f"Lead {leads[2]} returned by Bright Solar"]
        assert f"returned lead {leads[2]}, bought by b1 for 10.00 USD: disconnected phone " \
               "number." in asked
        decided = got[CONTACT, f"Return granted for lead {leads[2]}"]
        assert "10.00 USD is credited back to Bright Solar" in decided
        funded = got[CONTACT, "Funds received: 100.00 USD"]
        assert "(manual credit)" in funded and "New balance: 105.00 USD" in funded
        await eng.assert_reconciled()


async def test_an_smtp_server_down_gets_the_email_once_it_is_back(
        redis, redis_server, smtp_server: SmtpServer) -> None:
    cfg = _config(smtp_server)

    async def quick_notify(ctx: WorkerContext, stop: asyncio.Event) -> None:
        # claim idle entries after 300 ms instead of a minute; retry after at most 200 ms
        await run_notify_worker(ctx.config(), ctx.store, consumer=ctx.consumer + "-notify",
                                stop=stop, claim_idle_ms=300, claim_every_ms=100,
                                retry_base_ms=100, retry_max_ms=200)

    smtp_server.stop()
    async with running(cfg, redis_server.url, workers=[quick_notify]) as eng:
        await _until(_started(redis))  # the group starts at the stream's end
        status, body = await eng.lead(email="jane@example.com")
        assert status == 200 and body["status"] == "ACCEPTED", body
        transport = smtp_transport(cfg.tenant("t1"))
        assert transport is not None
        outbox = Outbox(redis, "t1", transport)
        alert = await _alert_id(redis)

        async def failed_twice() -> bool:
            return (await outbox.tries(alert, CONTACT, "balance_alert"))[0] >= 2

        await _until(failed_twice)  # tried, and tried again after a claim
        assert (await _group(redis))["pending"] == 1
        assert smtp_server.received == []

        smtp_server.start()
        await _until(lambda: _done(redis))
        assert [r.recipients for r in smtp_server.received] == [[CONTACT]]
        assert await outbox.tries(alert, CONTACT, "balance_alert") == (0, None)


async def test_tenants_without_smtp_are_skipped_with_one_log_line(
        redis, redis_server, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(campaign(), buyer("b1"))  # no [tenants.notify]
    assert REGISTRY["notify"] in in_process_workers()  # `leadflow run` starts it
    caplog.set_level(logging.INFO, logger="leadflow.notify")
    async with running(cfg, redis_server.url, workers=[REGISTRY["notify"]]) as eng:
        status, _ = await eng.lead(email="jane@example.com")
        assert status == 200
        await asyncio.sleep(0.2)
        assert not eng.svc.crew.failed.is_set()
    lines = [r.getMessage() for r in caplog.records if r.name == "leadflow.notify"]
    assert lines == ["notify worker: no smtp or sendgrid, no e-mail for t1, t2"]
    # no group made: nothing read (the lead made no event, so no stream either)
    assert not await redis.exists(keys.events("t1")) or await _group(redis) == {}


def _sendgrid_config(server: SendGridServer) -> Config:
    return make_config(campaign(), buyer("b1", price="10.00"),
                       base=notify_toml(sendgrid_table(server.url)))


async def _sent_metric(eng) -> float:
    async with eng.http.get(eng.url + "/metrics") as r:
        assert r.status == 200
        body = (await r.read()).decode()
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == "leadflow_notify_sent_total" and s.labels == {
                    "channel": "sendgrid", "kind": "balance_alert"}:
                return s.value
    raise AssertionError("no leadflow_notify_sent_total{channel=sendgrid,kind=balance_alert}")


async def test_a_sendgrid_tenant_gets_its_balance_alert_through_the_api_once(
        redis, redis_server, sendgrid_server: SendGridServer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.integration-hunter2")
    cfg = _sendgrid_config(sendgrid_server)
    caplog.set_level(logging.DEBUG)
    async with running(cfg, redis_server.url, workers=[REGISTRY["notify"]]) as eng:
        await _until(_started(redis))  # the group starts at the stream's end
        before = await _sent_metric(eng)
        status, body = await eng.lead(email="jane@example.com")
        assert status == 200 and body["status"] == "ACCEPTED", body
        await _until(lambda: _done(redis))
        [req] = sendgrid_server.requests
        assert (req.method, req.path) == ("POST", "/v3/mail/send")
        assert req.headers["Authorization"] == "Bearer SG.integration-hunter2"
        sent = req.json()
        assert sent["personalizations"] == [{"to": [{"email": CONTACT}]}]
        assert sent["subject"] == "Your balance is under 20.00 USD"
        assert "15.00 USD" in sent["content"][0]["value"]
        alert = await _alert_id(redis)
        entry = entry_id(alert, CONTACT, "balance_alert")
        assert sent["custom_args"] == {ENTRY_ARG: entry}
        assert sent["headers"] == {"Message-ID": f"<notify.{entry}@acme.example>"}
        assert await _sent_metric(eng) == before + 1  # the service exports it

        # the same entry delivered again: the group re-reads the whole stream
        await redis.xgroup_setid(keys.events("t1"), GROUP, "0")
        await _until(lambda: _done(redis))
        assert len(sendgrid_server.requests) == 1
        assert await _sent_metric(eng) == before + 1
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in logged and CONTACT not in logged

"""The tenant's notification API (engine/api/notify.py) in a running engine: a real
redis-server, a real aiosmtpd SMTP server, real HTTP, and the notify worker in-process.

Templates: an override is what the next e-mail uses, a revert brings the default back; a
preview renders and sends nothing; a test send reaches the tenant's own addresses; bad
input is a documented 4xx and stores nothing. Preferences: a category turned off gets no
mail, on again it does. Unsubscribe links: GET changes nothing, POST (one click) turns the
category off, a forged token is 400. One tenant's token never reaches another's data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.core.config import Config
from engine.notify import prefs
from engine.notify import templates as tpl
from engine.notify.worker import GROUP
from engine.run.workers import REGISTRY
from tests.helpers.harness import Engine, buyer, campaign, make_config, running
from tests.helpers.notify_config import CONTACT, notify_toml, smtp_table
from tests.helpers.smtp import SmtpServer
from tests.helpers.streams import group

OPS = ("ops@acme.example", "cfo@acme.example")
PUBLIC = "https://leads.acme.example"
T1 = keys.notify_templates("t1")


def _config(server: SmtpServer, *, public_url: bool = True) -> Config:
    toml = notify_toml(smtp_table(server.host, server.port), operators=OPS)
    if public_url:
        toml += f'\n[settings]\npublic_url = "{PUBLIC}"\n'
    return make_config(campaign(), buyer("b1", price="10.00"), base=toml)


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(15):
        while not await check():  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(0.05)


async def _group(redis: aioredis.Redis) -> dict[str, Any]:
    return await group(redis, keys.events("t1"), GROUP)


async def _done(redis: aioredis.Redis) -> bool:
    """The notify group read every entry and holds none pending."""
    last = await redis.xrevrange(keys.events("t1"), count=1)
    g = await _group(redis)
    return bool(last and g) and g["pending"] == 0 \
        and g["last-delivered-id"] == last[0][0].decode()


async def _started(redis: aioredis.Redis) -> None:
    async def check() -> bool:
        return bool(await _group(redis))
    await _until(check)


async def _alert(eng: Engine, redis: aioredis.Redis, n: int) -> None:
    """One more balance_alert of c1 (a credit back above the alert, then a lead under it),
    handled by the worker."""
    if n:
        status, _ = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "10.00"},
                                  headers={"Idempotency-Key": f"again-{n}"})
        assert status == 201
    status, body = await eng.lead(email=f"jane{n}@example.com")
    assert status == 200 and body["status"] == "ACCEPTED", body
    await _until(lambda: _done(redis))


def _text(msg: Any) -> str:
    return msg.get_body(("plain",)).get_content()  # type: ignore[no-any-return]


async def test_an_override_is_what_the_next_email_uses_and_a_revert_brings_the_default(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url,
                       workers=[REGISTRY["notify"]]) as eng:
        await _started(redis)
        d = tpl.default("balance_alert")
        mine = {"subject": "Top up: {{ balance|money }} {{ currency }} left",
                "text": "Dear {{ client_name }}, {{ balance|money }} left.",
                "html": "<p>Dear {{ client_name }}</p>"}
        status, body = await eng.api("PUT", "/v1/notify/templates/balance_alert", json=mine)
        assert status == 200, body
        assert body["overridden"] is True and body["subject"] == mine["subject"]
        assert body["default"]["subject"] == d.subject
        assert body["category"] == "balance" and body["optional"] is False
        assert "balance" in body["variables"] and "threshold" in body["variables"]
        status, listing = await eng.api("GET", "/v1/notify/templates")
        assert status == 200
        flags = {t["kind"]: t["overridden"] for t in listing["templates"]}
        assert flags == {k: k == "balance_alert" for k in tpl.KINDS}

        await _alert(eng, redis, 0)
        [got] = smtp_server.received
        assert got.recipients == [CONTACT]
        assert got.message["Subject"] == "Top up: 15.00 USD left"
        assert _text(got.message).strip() == "Dear Bright Solar, 15.00 left."
        assert got.message["List-Unsubscribe"] is None  # balance is not optional

        status, body = await eng.api("DELETE", "/v1/notify/templates/balance_alert")
        assert status == 200 and body["overridden"] is False and body["subject"] == d.subject
        status, again = await eng.api("DELETE", "/v1/notify/templates/balance_alert")
        assert (status, again) == (200, body)  # idempotent
        assert not await redis.exists(T1)
        await _alert(eng, redis, 1)
        alerts = [r for r in smtp_server.received  # the credit is mailed too
                  if not r.message["Subject"].startswith("Funds received")]
        assert len(alerts) == 2
        assert alerts[1].message["Subject"] == "Your balance is under 20.00 USD"


async def test_a_category_turned_off_gets_no_mail_and_on_again_it_does(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url,
                       workers=[REGISTRY["notify"]]) as eng:
        await _started(redis)
        status, body = await eng.api("PUT", "/v1/notify/preferences", json={
            "address": "AP@Bright.example", "categories": {"balance": False}})
        assert status == 200, body
        assert body["address"] == CONTACT and body["categories"]["balance"] is False
        assert body["categories"]["reports"] is True
        await _alert(eng, redis, 0)  # handled (acked): no mail
        assert smtp_server.received == []
        status, body = await eng.api("GET", f"/v1/notify/preferences?address={CONTACT}")
        assert status == 200 and body["categories"]["balance"] is False
        status, body = await eng.api("PUT", "/v1/notify/preferences", json={
            "address": CONTACT, "categories": {"balance": True}})
        assert status == 200 and body["categories"]["balance"] is True
        await _alert(eng, redis, 1)
        got = [r for r in smtp_server.received  # the credit is mailed too (funding)
               if not r.message["Subject"].startswith("Funds received")]
        assert [r.recipients for r in got] == [[CONTACT]]


async def test_a_preview_renders_the_sample_and_sends_and_stores_nothing(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        status, body = await eng.api("POST", "/v1/notify/templates/weekly_report/preview")
        assert status == 200, body
        want = tpl.render("weekly_report", tpl.sample("weekly_report"))
        assert body == {"subject": want.subject, "text": want.text, "html": want.html}
        assert tpl.SAMPLE_UNSUBSCRIBE_URL in body["text"]
        status, body = await eng.api("POST", "/v1/notify/templates/weekly_report/preview",
                                     json={"subject": "{{ leads }} leads for {{ client_name }}"})
        assert status == 200, body
        assert body["subject"] == "412 leads for Bright Solar LLC"
        assert body["text"] == want.text  # the parts not given: the ones in force
        status, body = await eng.api("POST", "/v1/notify/templates/weekly_report/preview",
                                     json={"text": "{{ nope }}"})
        assert status == 400 and body["error"]["code"] == "template_invalid"
        assert "text" in body["error"]["message"] and "nope" in body["error"]["message"]
        assert smtp_server.received == []
        assert await redis.keys("*notify*") == []


async def test_a_test_send_reaches_the_tenants_own_addresses_with_the_sample(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        status, body = await eng.api("POST", "/v1/notify/templates/recharge_succeeded/test")
        assert status == 200, body
        assert body == {"sent_to": 2, "recipients": list(OPS)}
        assert sorted(r.recipients[0] for r in smtp_server.received) == sorted(OPS)
        got = smtp_server.received[0].message
        assert got["Subject"] == "Recharge of 100.00 USD succeeded"
        assert "Bright Solar LLC" in _text(got)  # the sample data
        # pressed again: sent again (no outbox), with a new Message-ID
        status, _ = await eng.api("POST", "/v1/notify/templates/recharge_succeeded/test")
        assert status == 200 and len(smtp_server.received) == 4
        assert len({r.message["Message-ID"] for r in smtp_server.received}) == 4
        # the tenant's own template is what is tested
        status, _ = await eng.api("PUT", "/v1/notify/templates/recharge_succeeded", json={
            "subject": "Mine {{ amount|money }}", "text": "t", "html": "h"})
        assert status == 200
        status, _ = await eng.api("POST", "/v1/notify/templates/recharge_succeeded/test")
        assert status == 200 and smtp_server.received[-1].message["Subject"] == "Mine 100.00"


async def test_a_test_send_without_transport_or_addresses_or_server_is_refused(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    cfg = _config(smtp_server)
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.api("POST", "/v1/notify/templates/balance_alert/test",
                                     token="tok-t2")  # t2: no [tenants.notify]
        assert (status, body["error"]["code"]) == (409, "no_transport")
        cfg.tenant("t1").notify.operators = []
        status, body = await eng.api("POST", "/v1/notify/templates/balance_alert/test")
        assert (status, body["error"]["code"]) == (409, "no_operator_address")
        cfg.tenant("t1").notify.operators = ["refused@acme.example"]  # the server says 550
        status, body = await eng.api("POST", "/v1/notify/templates/balance_alert/test")
        assert (status, body["error"]["code"]) == (502, "send_failed")
        assert "sent to 0 of 1" in body["error"]["message"]
        smtp_server.stop()
        cfg.tenant("t1").notify.operators = list(OPS)
        status, body = await eng.api("POST", "/v1/notify/templates/balance_alert/test")
        assert (status, body["error"]["code"]) == (502, "send_failed")
        status, body = await eng.api("POST", "/v1/notify/templates/nope/test")
        assert (status, body["error"]["code"]) == (404, "unknown_kind")
    assert smtp_server.received == []


D = tpl.default("weekly_report")
GOOD = {"subject": D.subject, "text": D.text, "html": D.html}
BAD_TEMPLATES: list[tuple[str, dict[str, Any], int, str]] = [
    ("syntax error", {**GOOD, "text": "{% for x in %}"}, 400, "template_invalid"),
    ("sandbox escape", {**GOOD, "html": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
     400, "template_invalid"),
    ("unknown variable", {**GOOD, "subject": "{{ no_such_thing }}"}, 400, "template_invalid"),
    ("link without a guard", {**GOOD, "text": "{{ unsubscribe_url }}"}, 400,
     "template_invalid"),
    ("over 64 KiB", {**GOOD, "text": "x" * (65 * 1024)}, 400, "template_invalid"),
    ("a gigabyte", {**GOOD, "text": "{{ 'x' * 1000000000 }}"}, 400, "template_invalid"),
    ("non-string part", {**GOOD, "subject": 5}, 400, "invalid_body"),
    ("missing part", {"subject": "s", "text": "t"}, 400, "invalid_body"),
    ("unknown field", {**GOOD, "extra": "x"}, 400, "invalid_body"),
]


@pytest.mark.parametrize(("why", "body", "status", "code"), BAD_TEMPLATES,
                         ids=[b[0] for b in BAD_TEMPLATES])
async def test_a_bad_template_is_refused_and_nothing_is_stored(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer, why: str,
        body: dict[str, Any], status: int, code: str) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        got, answer = await eng.api("PUT", "/v1/notify/templates/weekly_report", json=body)
        assert (got, answer["error"]["code"]) == (status, code), answer
        if code == "template_invalid":
            part = next(p for p in ("subject", "text", "html") if body[p] != GOOD[p])
            message = answer["error"]["message"]
            assert message.startswith((f"weekly_report.{part}: ", "weekly_report: ")), message
        assert not await redis.exists(T1)


async def test_requests_refused_before_the_template_store_nothing(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        url = eng.url + "/v1/notify/templates/weekly_report"
        auth = {"Authorization": "Bearer tok-t1"}
        cases = [
            ("PUT", "/v1/notify/templates/nope", {"json": GOOD}, "tok-t1", 404, "unknown_kind"),
            ("GET", "/v1/notify/templates/nope", {}, "tok-t1", 404, "unknown_kind"),
            ("DELETE", "/v1/notify/templates/nope", {}, "tok-t1", 404, "unknown_kind"),
            ("POST", "/v1/notify/templates/nope/preview", {}, "tok-t1", 404, "unknown_kind"),
            ("PUT", "/v1/notify/templates/weekly_report", {"json": GOOD}, "wrong", 401,
             "unauthorized"),
            ("PUT", "/v1/notify/templates/weekly_report",
             {"data": b"subject=x", "headers": {"Content-Type": "text/plain"}}, "tok-t1",
             400, "unsupported_media_type"),
            ("PUT", "/v1/notify/templates/weekly_report",
             {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
             "tok-t1", 400, "invalid_body"),
        ]
        for method, path, kw, token, status, code in cases:
            got, answer = await eng.api(method, path, token=token, **kw)
            assert (got, answer["error"]["code"]) == (status, code), (method, path, answer)
        async with eng.http.put(url, json=GOOD) as r:  # no Authorization at all
            assert r.status == 401
        big = {**GOOD, "text": "x" * 1_000_000}  # 1 MB
        async with eng.http.put(url, json=big, headers=auth) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
        async with eng.http.post(url + "/preview", json=big, headers=auth) as r:
            assert r.status == 413
        assert not await redis.exists(T1)
        # the limit leaves room for three templates of 64 KiB, JSON-escaped quotes too
        full = {p: '"' * tpl.MAX_TEMPLATE_BYTES for p in ("subject", "text", "html")}
        got, answer = await eng.api("PUT", "/v1/notify/templates/weekly_report", json=full)
        assert got == 200, answer
        assert await redis.hexists(T1, "weekly_report")


async def test_a_runaway_template_is_refused_while_the_engine_keeps_serving(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    async with running(_config(smtp_server), redis_server.url) as eng:
        put = asyncio.create_task(eng.api("PUT", "/v1/notify/templates/weekly_report",
                                          json={**GOOD, "text": loop}))
        # the engine (in this very event loop) answers for a second while the template
        # renders in its child: rendered here, it would hold the loop for hours
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            async with eng.http.get(eng.url + "/healthz") as r:
                assert r.status == 200
        assert not put.done()
        status, body = await put
        assert (status, body["error"]["code"]) == (400, "template_invalid")
        assert not await redis.exists(T1)


async def test_a_tenant_reaches_only_its_own_templates_and_preferences(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        mine = {**GOOD, "subject": "t1's own"}
        status, _ = await eng.api("PUT", "/v1/notify/templates/weekly_report", json=mine)
        assert status == 200
        status, _ = await eng.api("PUT", "/v1/notify/preferences", json={
            "address": CONTACT, "categories": {"reports": False}})
        assert status == 200
        # t2 sees the defaults, and its changes are its own
        status, body = await eng.api("GET", "/v1/notify/templates/weekly_report",
                                     token="tok-t2")
        assert status == 200 and body["overridden"] is False and body["subject"] == D.subject
        status, body = await eng.api("GET", f"/v1/notify/preferences?address={CONTACT}",
                                     token="tok-t2")
        assert status == 200 and body["categories"]["reports"] is True
        status, _ = await eng.api("DELETE", "/v1/notify/templates/weekly_report",
                                  token="tok-t2")
        assert status == 200
        status, _ = await eng.api("PUT", "/v1/notify/preferences", token="tok-t2", json={
            "address": CONTACT, "categories": {"reports": True, "caps": False}})
        assert status == 200
        status, _ = await eng.api("PUT", "/v1/notify/templates/weekly_report",
                                  token="tok-t2", json={**GOOD, "subject": "t2's own"})
        assert status == 200
        status, body = await eng.api("GET", "/v1/notify/templates/weekly_report")
        assert body["overridden"] is True and body["subject"] == "t1's own"
        status, body = await eng.api("GET", f"/v1/notify/preferences?address={CONTACT}")
        assert body["categories"]["reports"] is False and body["categories"]["caps"] is True
        status, body = await eng.api("GET", "/v1/notify/templates/weekly_report",
                                     token="tok-t2")
        assert body["subject"] == "t2's own"


async def test_bad_preferences_are_refused_and_nothing_is_stored(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        cases = [
            ({"address": CONTACT, "categories": {"reports": False, "nope": False}}, 400,
             "unknown_category"),
            ({"address": CONTACT, "categories": {"reports": "no"}}, 400, "invalid_body"),
            ({"address": CONTACT, "categories": {"reports": 0}}, 400, "invalid_body"),
            ({"address": "not an address", "categories": {"reports": False}}, 400,
             "invalid_address"),
            ({"categories": {"reports": False}}, 400, "invalid_body"),
        ]
        for body, status, code in cases:
            got, answer = await eng.api("PUT", "/v1/notify/preferences", json=body)
            assert (got, answer["error"]["code"]) == (status, code), (body, answer)
        for query in ("", "?address=", "?address=nobody"):
            got, answer = await eng.api("GET", "/v1/notify/preferences" + query)
            assert (got, answer["error"]["code"]) == (400, "invalid_address")
        got, answer = await eng.api("GET", "/v1/notify/preferences?address=x@y.example",
                                    token="nope")
        assert got == 401
        assert await redis.keys("*notify*") == []


async def test_an_unsubscribe_link_turns_its_category_off_on_post_only(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server), redis_server.url) as eng:
        status, body = await eng.api("POST", "/v1/notify/templates/weekly_report/test")
        assert status == 200
        by_rcpt = {r.recipients[0]: r.message for r in smtp_server.received}
        msg = by_rcpt["ops@acme.example"]
        header = msg["List-Unsubscribe"]
        assert header.startswith(f"<{PUBLIC}/v1/notify/unsubscribe?t=") and header.endswith(">")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        link = header[1:-1]
        assert link in _text(msg)
        assert by_rcpt["cfo@acme.example"]["List-Unsubscribe"] != header  # its own link
        local = eng.url + urlsplit(link).path + "?" + urlsplit(link).query
        prefs_key = keys.notify_prefs("t1", prefs.address_id("ops@acme.example"))

        # GET: a page with a button, nothing changed (mail scanners follow links)
        async with eng.http.get(local) as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
            assert r.headers["Cache-Control"] == "no-store"
        assert '<form method="post">' in page and "weekly reports" in page
        assert not await redis.exists(prefs_key)

        # a forged token (another category under the same signature): 400, nothing changed
        forged = link.replace(link.split("?t=")[1].split(".")[0],
                              prefs._b64(f"t1\ncaps\n{prefs.address_id('ops@acme.example')}"
                                         .encode()))
        for bad in (forged, link + "x", link.split("?")[0] + "?t=", link.split("?")[0]):
            path = eng.url + urlsplit(bad).path + ("?" + urlsplit(bad).query
                                                   if urlsplit(bad).query else "")
            for method in ("GET", "POST"):
                async with eng.http.request(method, path) as r:
                    assert r.status == 400, (method, bad)
                    assert (await r.json())["error"]["code"] == "invalid_token"
        assert not await redis.exists(prefs_key)

        # one click (RFC 8058): a form POST to the link
        async with eng.http.post(local, data={"List-Unsubscribe": "One-Click"}) as r:
            assert r.status == 200 and "no longer receives" in await r.text()
        status, body = await eng.api("GET", "/v1/notify/preferences?address=ops@acme.example")
        assert body["categories"]["reports"] is False
        assert body["categories"]["caps"] is True
        status, body = await eng.api("GET", "/v1/notify/preferences?address=cfo@acme.example")
        assert body["categories"]["reports"] is True
        # the page's own form: the token as a form field; again: the same
        token = link.split("?t=")[1]
        async with eng.http.post(eng.url + "/v1/notify/unsubscribe", data={"t": token}) as r:
            assert r.status == 200


async def test_without_a_public_url_there_is_no_link_and_no_header(
        redis: aioredis.Redis, redis_server, smtp_server: SmtpServer) -> None:
    async with running(_config(smtp_server, public_url=False), redis_server.url) as eng:
        status, _ = await eng.api("POST", "/v1/notify/templates/weekly_report/test")
        assert status == 200
        for r in smtp_server.received:
            assert r.message["List-Unsubscribe"] is None
            assert "unsubscribe" not in _text(r.message).lower()
        assert not await redis.exists(keys.notify_secret("t1"))

"""engine.notify.compose and its use by the notify worker, against the tests' real
redis-server and a real aiosmtpd server: the tenant's override, preferences, links."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.notify import NotifyError, overrides, prefs
from engine.notify import templates as t
from engine.notify.compose import compose
from engine.notify.worker import NotifyWorker, smtp_transport
from engine.run import configfile
from engine.store.store import Store
from tests.helpers.smtp import SmtpServer

PUBLIC = "https://leads.acme.example"
WHO = ("ap@bright.example", "cfo@bright.example")

TOML = """
[settings]
public_url = "https://leads.acme.example"

[[tenants]]
id = "t1"
name = "Acme Leads"
api_token = "tok-t1"
[tenants.notify]
operators = ["ops@acme.example"]
[tenants.notify.smtp]
host = "127.0.0.1"
port = {port}
security = "plain"
sender = "billing@acme.example"

[[clients]]
tenant = "t1"
id = "c1"
name = "Bright Solar"
contacts = ["ap@bright.example", "cfo@bright.example"]
"""


async def test_defaults_without_an_override_or_a_link(redis: aioredis.Redis) -> None:
    got = await compose(redis, "t1", "balance_alert", t.sample("balance_alert"), WHO,
                        public_url=PUBLIC)
    want = t.render("balance_alert", t.sample("balance_alert"))
    assert got == dict.fromkeys(WHO, want)
    assert await redis.exists(keys.notify_secret("t1")) == 0  # no link: no secret made


async def test_an_optional_kind_gets_each_recipients_own_link(redis: aioredis.Redis) -> None:
    data = t.sample("weekly_report")
    got = await compose(redis, "t1", "weekly_report", data, WHO, public_url=PUBLIC)
    links = {r: m.unsubscribe_url for r, m in got.items()}
    assert all(u is not None and u.startswith(PUBLIC + prefs.UNSUBSCRIBE_PATH + "?t=")
               for u in links.values())
    assert links[WHO[0]] != links[WHO[1]]
    for r, m in got.items():
        assert m.unsubscribe_url is not None and m.unsubscribe_url in m.text
        found = await prefs.verify(redis, m.unsubscribe_url.split("?t=")[1], {"t1"})
        assert found == prefs.Unsubscribe("t1", "reports", prefs.address_id(r))
    # no public URL: no link (the sample's is not sent either)
    bare = await compose(redis, "t1", "weekly_report", data, WHO, public_url=None)
    assert all(m.unsubscribe_url is None and "unsubscribe" not in m.text.lower()
               for m in bare.values())


async def test_a_recipient_who_turned_the_category_off_is_left_out(
        redis: aioredis.Redis) -> None:
    await prefs.set_preferences(redis, "t1", "CFO@bright.example", {"balance": False})
    got = await compose(redis, "t1", "balance_alert", t.sample("balance_alert"), WHO,
                        public_url=None)
    assert list(got) == [WHO[0]]
    await prefs.set_preferences(redis, "t1", WHO[1], {"balance": True})
    got = await compose(redis, "t1", "balance_alert", t.sample("balance_alert"), WHO,
                        public_url=None)
    assert list(got) == list(WHO)


async def test_the_override_is_used_and_one_that_fails_falls_back_to_the_default(
        redis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    d = t.default("balance_alert")
    await overrides.put(redis, "t1", "balance_alert",
                        t.Templates("Low: {{ balance|money }}", "Mine {{ client_name }}", d.html))
    got = await compose(redis, "t1", "balance_alert", t.sample("balance_alert"), WHO[:1],
                        public_url=None)
    assert got[WHO[0]].subject == "Low: 19.50" and got[WHO[0]].text == "Mine Bright Solar LLC"
    # stored as valid, but this message's data breaks it: the default, and a log line
    # naming the kind, neither the template nor the data
    await overrides.put(redis, "t1", "balance_alert", t.Templates(
        "{{ 1 // (client_name != 'Secret Client Inc') }} SECRET-TEMPLATE", d.text, d.html))
    caplog.set_level(logging.WARNING, logger="leadflow.notify")
    data = t.sample("balance_alert") | {"client_name": "Secret Client Inc"}
    got = await compose(redis, "t1", "balance_alert", data, WHO[:1], public_url=None)
    assert got[WHO[0]] == t.render("balance_alert", data)
    [line] = [r.getMessage() for r in caplog.records]
    assert "balance_alert" in line and "t1" in line
    assert "Secret" not in line and "SECRET" not in line and "bright" not in line


async def test_a_default_that_fails_is_a_notify_error(redis: aioredis.Redis) -> None:
    with pytest.raises(NotifyError):
        await compose(redis, "t1", "balance_alert", {"tenant_name": "x"}, WHO,
                      public_url=None)


async def test_the_worker_skips_a_recipient_who_turned_the_category_off(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = configfile.loads(TOML.format(port=smtp_server.port), source="<test>")
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None)
    await worker.start_group()
    await prefs.set_preferences(redis, "t1", "cfo@bright.example", {"balance": False})
    await overrides.put(redis, "t1", "balance_alert", t.Templates(
        "Mine: {{ balance|money }}", "text {{ client_name }}", "<p>{{ client_name }}</p>"))
    stream = keys.events("t1")
    await redis.xadd(stream, {"type": "balance_alert", "account": "c1", "balance": "15000000",
                              "threshold": "20000000"})
    [batch] = await worker.events.poll(10)
    [(entry_id, fields)] = batch.entries
    assert await worker.handle("t1", entry_id, fields)  # done: sent, and skipped
    assert [(r.recipients, r.message["Subject"]) for r in smtp_server.received] == [
        (["ap@bright.example"], "Mine: 15.00")]
    assert (await redis.xpending(stream, "notify"))["pending"] == 0

"""The tenant's own webhook (engine/delivery/tenant_hooks.py): a real redis-server, the engine
serving, and a real HTTP receiver (tests/helpers/buyers.py) that verifies each request's
Standard Webhooks signature with the ``standardwebhooks`` package."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from engine.core import keys
from engine.core.config import Config
from engine.core.errors import ConfigError
from engine.delivery.tenant_hooks import GROUP, payload, run_tenant_hooks
from engine.run.workers import REGISTRY, WorkerContext, in_process_workers
from tests.helpers.buyers import SECRET, Buyers, buyer_servers
from tests.helpers.harness import BASE_TOML, Engine, buyer, campaign, make_config, running
from tests.helpers.streams import group


@pytest.fixture
async def receiver() -> AsyncIterator[Buyers]:
    async with buyer_servers() as state:
        yield state


def _config(url: str, events: str = "[]") -> Config:
    toml = BASE_TOML.replace(
        '[tenants.wallet]\nopening_balance = "1000.00"\n',
        '[tenants.wallet]\nopening_balance = "1000.00"\n'
        f'[tenants.notify.webhook]\nurl = "{url}"\nsecret = "{SECRET}"\n'
        f'events = {events}\ntimeout_ms = 2000\n')
    toml = toml.replace('id = "c1"\nopening_balance = "100.00"',
                        'id = "c1"\nopening_balance = "25.00"')
    return make_config(campaign(), buyer("b1", price="10.00"), base=toml)


async def _group_done(redis: aioredis.Redis) -> bool:
    last = await redis.xrevrange(keys.events("t1"), count=1)
    g = await group(redis, keys.events("t1"), GROUP)
    return bool(g and last) and g["pending"] == 0 and (
        g["last-delivered-id"] == last[0][0].decode())


async def _until_group(redis: aioredis.Redis) -> None:
    async with asyncio.timeout(15):
        while not await group(redis, keys.events("t1"), GROUP):  # noqa: ASYNC110 - polls
            await asyncio.sleep(0.02)


async def _until_done(redis: aioredis.Redis) -> None:
    async with asyncio.timeout(15):
        while not await _group_done(redis):  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(0.02)


def test_the_payload_is_the_event_with_amounts_as_decimal_strings() -> None:
    etype, body = payload({b"type": b"balance_alert", b"account": b"c1",
                           b"balance": b"-4250000", b"threshold": b"20000000",
                           b"ts": b"1796668800123", b"ref": b"config"})
    assert etype == "balance_alert"
    assert json.loads(body) == {
        "type": "balance_alert", "timestamp": "2026-12-07T18:40:00.123Z",
        "data": {"account": "c1", "balance": "-4.25", "threshold": "20.00", "ref": "config"}}


async def _webhook_sent(eng: Engine) -> float:
    async with eng.http.get(eng.url + "/metrics") as r:
        body = (await r.read()).decode()
    return sum(s.value for fam in text_string_to_metric_families(body) for s in fam.samples
               if s.name == "leadflow_notify_sent_total"
               and s.labels == {"channel": "webhook", "kind": "balance_alert"})


async def test_an_event_reaches_the_tenants_webhook_signed(
        redis, redis_server, receiver: Buyers) -> None:
    cfg = _config(receiver.url + "/accept")
    assert REGISTRY["hooks"] in in_process_workers()  # `leadflow run` starts it
    async with running(cfg, redis_server.url, workers=[REGISTRY["hooks"]]) as eng:
        await _until_group(redis)
        before = await _webhook_sent(eng)
        status, body = await eng.lead(email="jane@example.com")
        assert status == 200 and body["status"] == "ACCEPTED", body
        await _until_done(redis)
        assert await _webhook_sent(eng) == before + 1
    got = receiver.at("/accept")
    assert len(got) == 1 and got[0].verified
    alert = [i.decode() for i, f in await redis.xrange(keys.events("t1"))
             if f[b"type"] == b"balance_alert"]
    assert got[0].msg_id == f"evt_{alert[0]}"
    doc = json.loads(got[0].body)
    assert doc["type"] == "balance_alert"
    assert doc["data"]["account"] == "c1"
    assert doc["data"]["balance"] == "15.00" and doc["data"]["threshold"] == "20.00"


async def test_a_failing_webhook_is_sent_again_with_the_same_id(
        redis, redis_server, receiver: Buyers) -> None:
    cfg = _config(receiver.url + "/flaky")

    async def quick(ctx: WorkerContext, stop: asyncio.Event) -> None:
        await run_tenant_hooks(ctx.config(), ctx.store, ctx.http, consumer="c-hooks",
                               stop=stop, claim_idle_ms=100, claim_every_ms=50)

    async with running(cfg, redis_server.url, workers=[quick]) as eng:
        await _until_group(redis)
        status, _ = await eng.lead(email="jane@example.com")
        assert status == 200
        await _until_done(redis)
    got = receiver.at("/flaky")
    assert len(got) == 2 and got[0].msg_id == got[1].msg_id  # 500, then 200
    assert all(r.verified for r in got)


async def test_types_not_asked_for_are_not_sent(redis, redis_server, receiver: Buyers) -> None:
    cfg = _config(receiver.url + "/accept", events='["buyer_paused"]')
    async with running(cfg, redis_server.url, workers=[REGISTRY["hooks"]]) as eng:
        await _until_group(redis)
        status, _ = await eng.lead(email="jane@example.com")
        assert status == 200
        await _until_done(redis)  # the balance_alert was read and acked
    assert receiver.at("/accept") == []


@pytest.mark.parametrize(("hook", "path", "why"), [
    ('url = "ftp://x"\nsecret = "SECRET"', "url", "not an http(s) URL"),
    ('url = "https://hooks.example.com/x"', "secret", "required"),
    ('url = "https://hooks.example.com/x"\nsecret = "SECRET"\nevents = ["Bad Type"]',
     "events[0]", "is not an event type"),
    ('url = "https://hooks.example.com/x"\nsecret = "SECRET"\ntimeout_ms = 0', "timeout_ms",
     "1 to"),
])
def test_a_bad_tenant_webhook_is_a_config_error(hook: str, path: str, why: str) -> None:
    toml = BASE_TOML.replace(
        '[tenants.wallet]\nopening_balance = "1000.00"\n',
        '[tenants.wallet]\nopening_balance = "1000.00"\n[tenants.notify.webhook]\n'
        + hook.replace("SECRET", SECRET) + "\n")
    with pytest.raises(ConfigError) as err:
        make_config(campaign(), base=toml)
    assert f"tenants[0].notify.webhook.{path}" in str(err.value)
    assert why in str(err.value)

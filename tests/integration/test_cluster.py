"""The engine on a real Redis Cluster: every script of a tenant stays in one slot."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis

from engine.core import keys
from engine.core.config import Config, ResponseRule
from engine.delivery.worker import DeliveryWorker, WorkerOptions
from engine.store.store import Store, connect
from tests.helpers import sales
from tests.helpers.buyers import SECRET, buyer_servers
from tests.helpers.cluster import redis_cluster
from tests.helpers.harness import buyer, campaign, make_config, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"


async def test_leads_and_money_on_a_cluster(cluster_url):
    t2 = """
[[clients]]
tenant = "t2"
id = "c9"
opening_balance = "50.00"

[[buyers]]
tenant = "t2"
id = "b9"
campaign = "t2camp"
client = "c9"
price = "5.00"
"""
    cfg = make_config(campaign(), buyer("b1", price="10.00"), t2)
    c = redis.Redis(port=int(cluster_url.rsplit(":", 1)[1]))
    slots = {c.cluster("keyslot", keys.tenant_prefix(t)) for t in ("t1", "t2")}
    c.close()
    assert len(slots) == 2  # two tenants, two slots (and here two different nodes)
    async with running(cfg, cluster_url) as eng:
        for i in range(5):
            _, r = await eng.lead(email=f"c{i}@example.com")
            assert r["status"] == "ACCEPTED"
            _, r = await eng.lead(campaign="t2camp", supplier="s2", key="key-s2",
                                  email=f"d{i}@example.com")
            assert r["status"] == "ACCEPTED"
        await eng.redis.script_flush()  # NOSCRIPT on every node: EVAL reloads per node
        _, r = await eng.lead(email="after-flush@example.com")
        assert r["status"] == "ACCEPTED"
        assert await eng.balance("c1") == 40_000_000
        assert await eng.balance("c9", tenant="t2") == 25_000_000
        status, body = await eng.api("GET", "/v1/accounts/c9", token="tok-t2")
        assert status == 200 and body["balance"] == "25.00"
        await eng.assert_reconciled()


async def test_delivery_worker_over_two_tenants_on_a_cluster(cluster_url):
    """Each tenant's delivery stream lives in its own slot: the worker reads them one call
    per tenant (a multi-stream XREADGROUP across slots is refused), and every MULTI it
    sends (decisions, acks after refunds) stays inside one tenant."""
    ok = [ResponseRule(path="status", equals="accepted")]
    b1 = sales.buyer("b1", "", secret=SECRET, accept=ok)
    b2 = sales.buyer("b2", "", tenant="beta", secret=SECRET, accept=ok)
    c = redis.Redis(port=int(cluster_url.rsplit(":", 1)[1]))
    assert c.cluster("keyslot", keys.tenant_prefix(sales.T)) != c.cluster(
        "keyslot", keys.tenant_prefix("beta"))
    c.close()
    store = Store(connect(cluster_url))
    async with buyer_servers() as web:
        b1 = msgspec.structs.replace(b1, delivery=msgspec.structs.replace(
            b1.delivery, url=web.url + "/accept"))
        b2 = msgspec.structs.replace(b2, delivery=msgspec.structs.replace(
            b2.delivery, url=web.url + "/reject"))
        await sales.accounts(store, b1, b2)
        await sales.sell(store, b1, "L1a")
        await sales.sell(store, b2, "L1b")
        w = DeliveryWorker(Config(buyers=[b1, b2]), store, tenants=[sales.T, "beta"],
                           consumer="c1", options=WorkerOptions(block_ms=20))
        # one batch over both tenants: decisions, a refund, acks
        assert await w.process_once(block_ms=20) == 2
        await sales.sell(store, b1, "L2a")
        await sales.sell(store, b2, "L2b")
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))  # one read loop per tenant
        deadline = asyncio.get_running_loop().time() + 10
        while len(web.at("/accept")) + len(web.at("/reject")) < 4:
            assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert sorted(r.msg_id for r in web.at("/accept")) == ["msg_L1a_b1", "msg_L2a_b1"]
        assert sorted(r.msg_id for r in web.at("/reject")) == ["msg_L1b_b2", "msg_L2b_b2"]
        for tenant in (sales.T, "beta"):
            deadline = asyncio.get_running_loop().time() + 10
            while await store.redis.xlen(keys.deliveries(tenant)):
                assert asyncio.get_running_loop().time() < deadline, "not acked in time"
                await w.process_once(block_ms=20)
        assert await sales.balance(store, "c-b2", tenant="beta") == sales.OPENING  # refunded
    await store.redis.aclose()

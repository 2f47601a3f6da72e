"""The engine on a real Redis Cluster: every script of a tenant stays in one slot."""

from __future__ import annotations

import pytest
import redis

from engine import keys
from tests.cluster import redis_cluster
from tests.harness import buyer, campaign, make_config, running

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

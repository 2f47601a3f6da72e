"""2,000 concurrent leads against a buyer whose balance covers 500."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running

CLIENT = '''
[[clients]]
tenant = "t1"
id = "c1"
opening_balance = "500.00"
floor = "-20.00"
alert = "20.00"
auto_recharge = { enabled = true, threshold = "50.00", amount = "100.00" }
'''


async def test_2000_concurrent_leads_never_cross_the_floor(redis, redis_server):
    base = BASE_TOML.replace('[[clients]]\ntenant = "t1"\nid = "c1"\nopening_balance = "100.00"\n', CLIENT)
    cfg = make_config(campaign(), buyer("b1", price="1.00"), base=base)
    async with running(cfg, redis_server.url) as eng:
        conn = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=conn) as http:

            async def post(i: int) -> str:
                body = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1",
                        "email": f"p{i}@example.com"}
                async with http.post(eng.url + "/v1/leads", json=body) as r:
                    return (await r.json())["status"]

            statuses = Counter(await asyncio.gather(*(post(i) for i in range(2_000))))
        # $500 of balance plus $20 of negative floor: exactly 520 one-dollar leads fit
        assert statuses == {"ACCEPTED": 520, "REJECTED": 1_480}
        assert await eng.balance("c1") == -20_000_000
        events = Counter(e["type"] for e in await eng.events() if e["account"] == "c1")
        assert events == {"balance_alert": 1, "recharge_needed": 1, "buyer_paused": 1,
                          "balance_negative": 1}
        await eng.assert_reconciled()

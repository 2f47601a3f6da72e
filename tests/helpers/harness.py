"""Test harness: the real engine (uvicorn + Lua on the tests' redis-server) over real HTTP."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from engine.core import keys
from engine.core.config import Config
from engine.run import configfile
from engine.run.service import Service

BASE_TOML = """
[[tenants]]
id = "t1"
api_token = "tok-t1"
timezone = "UTC"
[tenants.fees]
inbound_lead = "0.10"
outbound_delivery = "0.20"
[tenants.wallet]
opening_balance = "1000.00"

[[tenants]]
id = "t2"
api_token = "tok-t2"

[[clients]]
tenant = "t1"
id = "c1"
opening_balance = "100.00"

[[clients]]
tenant = "t1"
id = "c2"
opening_balance = "100.00"

[[clients]]
tenant = "t2"
id = "other"
opening_balance = "5.00"

[[suppliers]]
tenant = "t1"
id = "s1"
key = "key-s1"
payout = "3.00"

[[suppliers]]
tenant = "t1"
id = "stest"
key = "key-test"
test_mode = true

[[suppliers]]
tenant = "t2"
id = "s2"
key = "key-s2"

[[campaigns]]
tenant = "t2"
id = "t2camp"
fields = [{ name = "email", type = "email", required = true }]
"""

CAMPAIGN_TOML = """
[[campaigns]]
tenant = "t1"
id = "{id}"
distribution = "{distribution}"
sell_limit = {sell_limit}
{extra}
fields = [
  {{ name = "email", type = "email", required = true }},
  {{ name = "phone", type = "phone" }},
  {{ name = "state", type = "state" }},
]
"""

BUYER_TOML = """
[[buyers]]
tenant = "t1"
id = "{id}"
campaign = "{campaign}"
client = "{client}"
price = "{price}"
priority = {priority}
weight = {weight}
{extra}
"""


def campaign(id: str = "camp", distribution: str = "waterfall", sell_limit: int = 3,
             extra: str = "") -> str:
    return CAMPAIGN_TOML.format(id=id, distribution=distribution, sell_limit=sell_limit,
                                extra=extra)


def buyer(id: str, *, campaign: str = "camp", client: str = "c1", price: str = "10.00",
          priority: int = 1, weight: int = 1, extra: str = "") -> str:
    return BUYER_TOML.format(id=id, campaign=campaign, client=client, price=price,
                             priority=priority, weight=weight, extra=extra)


def make_config(*parts: str, base: str = BASE_TOML) -> Config:
    return configfile.loads(base + "\n".join(parts), source="<test>")


class Engine:
    def __init__(self, svc: Service, http: aiohttp.ClientSession) -> None:
        self.svc, self.http = svc, http
        assert svc.store is not None and svc.app is not None
        self.store, self.app, self.redis = svc.store, svc.app, svc.store.redis

    @property
    def url(self) -> str:
        return self.svc.url

    async def post(self, body: dict[str, Any] | None = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None, path: str = "/v1/leads",
                   ) -> tuple[int, Any]:
        data = raw if raw is not None else None
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if data is None:
            kwargs["json"] = body
        else:
            kwargs["data"] = data
        async with self.http.post(self.url + path, **kwargs) as r:
            text = await r.read()
            ctype = r.headers.get("content-type", "")
            if "ndjson" in ctype:
                import msgspec

                return r.status, [msgspec.json.decode(line) for line in text.splitlines() if line]
            return r.status, (await r.json(content_type=None)) if text else None

    async def lead(self, campaign: str = "camp", supplier: str = "s1", key: str = "key-s1",
                   **fields: Any) -> tuple[int, Any]:
        body = {"lp_campaign_id": campaign, "lp_supplier_id": supplier, "lp_key": key, **fields}
        return await self.post(body)

    async def api(self, method: str, path: str, token: str = "tok-t1",
                  **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def balance(self, account: str, tenant: str = "t1") -> int:
        state = await self.store.account(tenant, account)
        assert state is not None
        return state.balance

    async def events(self, tenant: str = "t1") -> list[dict[str, str]]:
        rows = await self.redis.xrange(keys.events(tenant))
        return [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]

    async def assert_reconciled(self) -> None:
        from engine.run.reconcile import reconcile

        _, findings = await reconcile(self.svc.cfg, self.store)
        assert findings == []


@asynccontextmanager
async def running(cfg: Config, redis_url: str, *, workers: list[Any] | None = None,
                  state_dir: str | os.PathLike[str] | None = None) -> AsyncIterator[Engine]:
    """The engine serving on a free port (in-process ``workers``, none by default), its
    state in ``state_dir`` or a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="leadflow-test-") as tmp:
        svc = Service(cfg, redis_url=redis_url, host="127.0.0.1", port=0,
                      state_dir=str(state_dir or tmp), workers=workers)
        await svc.start()
        try:
            async with aiohttp.ClientSession() as http:
                yield Engine(svc, http)
        finally:
            await svc.stop()

"""The portal's tests: a config with two tenants, buyers and card fees; users made through
the identity store (invite accepted); an HTTP client that logs in with a cookie jar."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.core.config import Config
from tests.helpers.harness import Engine, make_config

PASSWORD = "correct horse battery staple"

TOML = """
[settings]
stripe_publishable_key = "pk_test_leadflow"
stripe_js_url = "{stripe_js}"

[[tenants]]
id = "t1"
name = "Acme Leads"
api_token = "tok-t1"
timezone = "UTC"
[tenants.fees]
card_fee_percent = "3"
[tenants.wallet]
opening_balance = "1000.00"

[[tenants]]
id = "t2"
api_token = "tok-t2"

[[clients]]
tenant = "t1"
id = "c1"
billing = "realtime"
opening_balance = "{c1_balance}"
alert = "50.00"

[[clients]]
tenant = "t1"
id = "c2"
billing = "realtime"
opening_balance = "300.00"

[[clients]]
tenant = "t1"
id = "c3"
billing = "manual"
opening_balance = "40.00"

[[clients]]
tenant = "t2"
id = "other"
billing = "realtime"
opening_balance = "70.00"

[[suppliers]]
tenant = "t1"
id = "s1"
key = "key-s1"

[[campaigns]]
tenant = "t1"
id = "camp"
fields = [{{ name = "email", type = "email", required = true }}]

[[buyers]]
tenant = "t1"
id = "b1"
campaign = "camp"
client = "c1"
price = "10.00"

[[buyers]]
tenant = "t1"
id = "b2"
campaign = "camp"
client = "c2"
price = "9.00"
priority = 2

[[campaigns]]
tenant = "t2"
id = "t2camp"
fields = [{{ name = "email", type = "email", required = true }}]

[[buyers]]
tenant = "t2"
id = "ob"
campaign = "t2camp"
client = "other"
price = "5.00"
"""


def portal_config(stripe_js: str = "https://js.stripe.com/v3/", c1_balance: str = "30.00"
                  ) -> Config:
    return make_config(base=TOML.format(stripe_js=stripe_js, c1_balance=c1_balance))


async def make_user(eng: Engine, email: str, accounts: list[str], tenant: str = "t1",
                    password: str = PASSWORD, role: str = "buyer") -> str:
    """A user with its password set (the invite accepted): its id."""
    ids = eng.app.identity
    assert ids is not None
    user, invite = await ids.create_user(tenant, email, accounts, invite_ttl_ms=3_600_000,
                                         role=role)  # type: ignore[arg-type]
    await ids.accept_invite(invite.token, password)
    return user.id


_HIDDEN = re.compile(r'name="(csrf|login_token)" value="([^"]+)"')


def hidden(html: str, name: str) -> str:
    for found, value in _HIDDEN.findall(html):
        if found == name:
            return value
    raise AssertionError(f"no hidden {name} in the page")


@dataclass
class Page:
    status: int
    text: str
    url: str
    headers: Any


class Browserless:
    """A portal client over real HTTP with its own cookie jar (no JavaScript)."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: Any) -> Page:
        async with self.http.get(self.eng.url + path, **kw) as r:
            return Page(r.status, await r.text(), str(r.url), r.headers)

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> Page:
        async with self.http.post(self.eng.url + path, data=data, **kw) as r:
            return Page(r.status, await r.text(), str(r.url), r.headers)

    async def login(self, email: str, password: str = PASSWORD, tenant: str = "t1") -> Page:
        form = await self.get(f"/portal/login?t={tenant}")
        return await self.post("/portal/login", {
            "login_token": hidden(form.text, "login_token"), "tenant": tenant,
            "email": email, "password": password})

    async def csrf(self, path: str) -> str:
        return hidden((await self.get(path)).text, "csrf")

    def session_cookie(self) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == "lf_session":
                return c.value
        return None

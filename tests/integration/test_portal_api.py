"""The portal's identities over HTTP: the tenant API for users, invites and buyer keys, and
what a buyer key may reach (the access matrix over every buyer-capable endpoint of the
route table). Real engine, real HTTP, real redis-server, SQLite in the state dir, Stripe
through localstripe."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.api import openapi
from engine.api.endpoints import ENDPOINTS, Endpoint
from engine.core import keys
from engine.identity import credentials
from engine.run.provision import provision_accounts
from tests.helpers.harness import Engine, make_config, running

HOUR = 3_600_000
GOOD = "correct horse battery"

TOML = """
[[tenants]]
id = "t1"
api_token = "tok-t1"
[tenants.wallet]
opening_balance = "1000.00"

[[tenants]]
id = "t2"
api_token = "tok-t2"

[[clients]]
tenant = "t1"
id = "c1"
billing = "realtime"
opening_balance = "0.00"

[[clients]]
tenant = "t1"
id = "c2"
billing = "realtime"
opening_balance = "0.00"

[[clients]]
tenant = "t1"
id = "c3"
billing = "realtime"
opening_balance = "0.00"

[[clients]]
tenant = "t2"
id = "other"
opening_balance = "5.00"

[[suppliers]]
tenant = "t1"
id = "s1"
key = "key-s1"
"""
CAMPAIGN = """
[[campaigns]]
tenant = "t1"
id = "camp{n}"
fields = [{{ name = "email", type = "email", required = true }}]

[[buyers]]
tenant = "t1"
id = "b{n}"
campaign = "camp{n}"
client = "c{n}"
price = "10.00"
"""


@pytest.fixture
def cfg():
    return make_config(base=TOML + "".join(CAMPAIGN.format(n=n) for n in (1, 2, 3)))


@pytest.fixture
def stripe_env(localstripe, monkeypatch):
    from bench.localstripe import API_KEY

    monkeypatch.setenv("LEADFLOW_STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("LEADFLOW_STRIPE_API_BASE", localstripe.url)
    return localstripe


async def call(eng: Engine, method: str, path: str, token: str | None = None,
               body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    kw: dict[str, Any] = {"headers": h}
    if body is not None:
        kw["json"] = body
    async with eng.http.request(method, eng.url + path, **kw) as r:
        text = await r.read()
        if r.content_type == "application/json" and text:
            return r.status, json.loads(text)
        return r.status, text.decode()


async def new_user(eng: Engine, email: str, accounts: list[str], token: str = "tok-t1"
                   ) -> dict[str, Any]:
    status, body = await call(eng, "POST", "/v1/portal/users", token,
                              {"email": email, "accounts": accounts})
    assert status == 201, body
    return body


async def new_key(eng: Engine, user_id: str, token: str = "tok-t1", name: str = "k") -> str:
    status, body = await call(eng, "POST", f"/v1/portal/users/{user_id}/keys", token,
                              {"name": name})
    assert status == 201, body
    return str(body["key"])


async def sql_rows(eng: Engine, table: str) -> list[tuple[Any, ...]]:
    ids = eng.app.identity
    assert ids is not None
    return await ids._db.fetch(f"SELECT * FROM {table} ORDER BY 1", [])


# ---- the tenant API ------------------------------------------------------------------------


async def test_user_invite_password_and_keys(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        created = await new_user(eng, "Buyer@Example.com", ["c1", "c2"])
        user, invite = created["user"], created["invite"]
        assert user["email"] == "buyer@example.com" and user["status"] == "invited"
        assert user["accounts"] == ["c1", "c2"] and user["id"].startswith("usr_")
        assert invite["invite_url"] == "/portal/invite/" + invite["invite_token"]
        token = invite["invite_token"]
        # only the token's SHA-256 is stored
        invites = await sql_rows(eng, "portal_invites")
        assert [r[0] for r in invites] == [credentials.digest(token)]
        assert token not in repr(invites)

        # weak passwords: 400, and the link still works
        for weak in ("short", "buyer@example.com-and-more", "x" * 257):
            status, body = await call(eng, "POST", f"/v1/portal/invites/{token}",
                                      body={"password": weak})
            assert status == 400 and body["error"]["code"] == "weak_password", body
        status, body = await call(eng, "POST", f"/v1/portal/invites/{token}",
                                  body={"password": GOOD})
        assert status == 200 and body["status"] == "active", body
        stored = await eng.app.identity.password_hash("t1", user["id"])
        assert stored.startswith("$argon2id$") and GOOD not in stored
        assert eng.app.identity.passwords.verify(stored, GOOD)
        # one time
        status, body = await call(eng, "POST", f"/v1/portal/invites/{token}",
                                  body={"password": "another good password"})
        assert status == 410 and body["error"]["code"] == "invite_invalid"
        assert await eng.app.identity.password_hash("t1", user["id"]) == stored

        # keys: shown once, only a hash stored, listed without the secret
        status, made = await call(eng, "POST", f"/v1/portal/users/{user['id']}/keys", "tok-t1",
                                  {"name": "crm"})
        assert status == 201 and credentials.KEY_PATTERN.fullmatch(made["key"])
        secret, view = made["key"], made["api_key"]
        assert view["created_by"] == "tenant" and view["revoked_ms"] is None
        assert secret not in repr(await sql_rows(eng, "api_keys"))
        status, listed = await call(eng, "GET", f"/v1/portal/users/{user['id']}/keys", "tok-t1")
        assert status == 200 and [k["id"] for k in listed["data"]] == [view["id"]]
        assert secret not in json.dumps(listed)
        # no body: a key without a name
        async with eng.http.post(f"{eng.url}/v1/portal/users/{user['id']}/keys",
                                 headers={"Authorization": "Bearer tok-t1"}) as r:
            assert r.status == 201 and (await r.json())["api_key"]["name"] == ""

        # the key works, then is revoked (idempotent) and stops
        assert (await call(eng, "GET", "/v1/accounts/c1", secret))[0] == 200
        status, revoked = await call(eng, "DELETE", f"/v1/portal/keys/{view['id']}", "tok-t1")
        assert status == 200 and revoked["revoked_ms"] is not None
        assert (await call(eng, "DELETE", f"/v1/portal/keys/{view['id']}", "tok-t1")) == (
            200, revoked)
        status, body = await call(eng, "GET", "/v1/accounts/c1", secret)
        assert status == 401 and body["error"]["code"] == "unauthorized"

        # get, list, patch, delete
        status, got = await call(eng, "GET", f"/v1/portal/users/{user['id']}", "tok-t1")
        assert status == 200 and got["status"] == "active"
        status, patched = await call(eng, "PATCH", f"/v1/portal/users/{user['id']}", "tok-t1",
                                     {"accounts": ["c3"]})
        assert status == 200 and patched["accounts"] == ["c3"] and patched["status"] == "active"
        status, patched = await call(eng, "PATCH", f"/v1/portal/users/{user['id']}", "tok-t1",
                                     {"status": "disabled"})
        assert status == 200 and patched["status"] == "disabled"
        status, users = await call(eng, "GET", "/v1/portal/users", "tok-t1")
        assert status == 200 and [u["id"] for u in users["data"]] == [user["id"]]
        key2 = await call(eng, "PATCH", f"/v1/portal/users/{user['id']}", "tok-t1",
                          {"status": "active"})
        assert key2[0] == 200
        live = await new_key(eng, user["id"])
        status, deleted = await call(eng, "DELETE", f"/v1/portal/users/{user['id']}", "tok-t1")
        assert status == 200 and deleted == {"id": user["id"], "deleted": True,
                                             "keys_revoked": 2}
        assert (await call(eng, "GET", "/v1/accounts/c3", live))[0] == 401
        status, body = await call(eng, "GET", f"/v1/portal/users/{user['id']}", "tok-t1")
        assert status == 404 and body["error"]["code"] == "unknown_user"
        # a deleted user's e-mail may be used again
        await new_user(eng, "buyer@example.com", [])


async def test_refusals_of_the_tenant_api(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        user = (await new_user(eng, "a@example.com", ["c1"]))["user"]
        # duplicate e-mail (any case): 409
        status, body = await call(eng, "POST", "/v1/portal/users", "tok-t1",
                                  {"email": "A@EXAMPLE.COM", "accounts": []})
        assert status == 409 and body["error"]["code"] == "email_taken"
        # accounts: clients of this tenant only
        for accounts in (["nope"], ["other"], ["wallet"], ["c1", "c9"]):
            for method, path in (("POST", "/v1/portal/users"),
                                 ("PATCH", f"/v1/portal/users/{user['id']}")):
                status, body = await call(eng, method, path, "tok-t1",
                                          {"email": "b@example.com", "accounts": accounts}
                                          if method == "POST" else {"accounts": accounts})
                assert status == 400 and body["error"]["code"] == "unknown_account", body
        assert (await call(eng, "GET", f"/v1/portal/users/{user['id']}", "tok-t1"))[1][
            "accounts"] == ["c1"]
        status, body = await call(eng, "POST", "/v1/portal/users", "tok-t1",
                                  {"email": "not-an-address", "accounts": []})
        assert status == 400 and body["error"]["code"] == "invalid_email"
        status, body = await call(eng, "PATCH", f"/v1/portal/users/{user['id']}", "tok-t1",
                                  {"status": "invited"})
        assert status == 400 and body["error"]["code"] == "invalid_body"
        status, body = await call(eng, "POST", f"/v1/portal/users/{user['id']}/keys",
                                  "tok-t1", {"name": "x" * 101})
        assert status == 400 and body["error"]["code"] == "invalid_name"
        # another tenant's user and key: 404, nothing changed
        key = await new_key(eng, user["id"])
        key_id = credentials.key_id(key)
        for method, path, body_ in (
                ("GET", f"/v1/portal/users/{user['id']}", None),
                ("PATCH", f"/v1/portal/users/{user['id']}", {"status": "disabled"}),
                ("DELETE", f"/v1/portal/users/{user['id']}", None),
                ("POST", f"/v1/portal/users/{user['id']}/invite", None),
                ("POST", f"/v1/portal/users/{user['id']}/keys", {"name": "x"}),
                ("GET", f"/v1/portal/users/{user['id']}/keys", None),
                ("DELETE", f"/v1/portal/keys/{key_id}", None)):
            status, body = await call(eng, method, path, "tok-t2", body_)
            assert status == 404, (method, path, body)
            assert body["error"]["code"] in ("unknown_user", "unknown_key")
        assert (await call(eng, "GET", "/v1/portal/users", "tok-t2"))[1] == {"data": []}
        assert (await call(eng, "GET", "/v1/accounts/c1", key))[0] == 200
        # no token, a wrong token: 401
        assert (await call(eng, "GET", "/v1/portal/users"))[0] == 401
        assert (await call(eng, "GET", "/v1/portal/users", "tok-nope"))[0] == 401


async def test_expired_and_reissued_invites(redis, redis_server, cfg, tmp_path):
    """The clock is the identity store's (injected): no sleeping."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        ids = eng.app.identity
        now = ids.clock()
        ids.clock = lambda: now
        created = await new_user(eng, "late@example.com", ["c1"])
        assert created["invite"]["expires_ms"] == now + 72 * HOUR  # invite_ttl_hours
        ids.clock = lambda: now + 72 * HOUR
        status, body = await call(eng, "POST",
                                  f"/v1/portal/invites/{created['invite']['invite_token']}",
                                  body={"password": GOOD})
        assert status == 410 and body["error"]["code"] == "invite_invalid"
        assert await ids.password_hash("t1", created["user"]["id"]) is None
        status, again = await call(eng, "POST",
                                   f"/v1/portal/users/{created['user']['id']}/invite", "tok-t1")
        assert status == 201 and again["invite_token"] != created["invite"]["invite_token"]
        status, body = await call(eng, "POST", f"/v1/portal/invites/{again['invite_token']}",
                                  body={"password": GOOD})
        assert status == 200 and body["status"] == "active"
        # a disabled user gets no new link
        await call(eng, "PATCH", f"/v1/portal/users/{created['user']['id']}", "tok-t1",
                   {"status": "disabled"})
        status, body = await call(eng, "POST",
                                  f"/v1/portal/users/{created['user']['id']}/invite", "tok-t1")
        assert status == 409 and body["error"]["code"] == "user_disabled"


async def test_a_buyer_key_money_action_names_its_user(redis, redis_server, cfg, tmp_path,
                                                       stripe_env):
    """Funding, a return and a pause with a buyer key: the ledger entries' user is
    `<user>/key:<id>`, and each action has an audit row."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        user = (await new_user(eng, "funder@example.com", ["c1"]))["user"]
        key = await new_key(eng, user["id"])
        label = f"{user['id']}/key:{credentials.key_id(key)}"
        status, _ = await call(eng, "POST", "/v1/accounts/c1/payment-methods", key,
                               {"payment_method": stripe_env.card()})
        assert status == 201
        status, funded = await call(eng, "POST", "/v1/accounts/c1/funds", key,
                                    {"amount": "100.00"}, {"Idempotency-Key": "fund-1"})
        assert status == 201, funded
        status, lead = await eng.lead(campaign="camp1", email="sold@example.com")
        assert lead["status"] == "ACCEPTED", lead
        status, returned = await call(eng, "POST", f"/v1/leads/{lead['lead_id']}/returns", key,
                                      {"buyer": "b1", "reason": "wrong_number"})
        assert status == 200 and returned["refunded"] == "10.00"
        assert (await call(eng, "POST", "/v1/buyers/b1/pause", key))[0] == 200
        rows = await eng.redis.xrange(keys.ledger("t1"))
        entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]
        by_kind = {e["kind"]: e for e in entries if e["account"] == "c1"}
        assert by_kind["funding"]["user"] == label
        assert by_kind["return"]["user"] == label
        assert "user" not in by_kind["lead"]  # the sale was the engine's
        audit = await eng.app.identity.audit_rows("t1")
        mine = [(r["action"], r["account"]) for r in audit if r["key_id"]]
        assert sorted(mine) == sorted([("attachPaymentMethod", "c1"), ("fundAccount", "c1"),
                                       ("returnLead", "c1"), ("pauseBuyer", "c1")])
        assert all(r["actor"] == user["id"] for r in audit if r["key_id"])
        fund = next(r for r in audit if r["action"] == "fundAccount")
        assert fund["detail"]["idempotency_key"] == "fund-1" and fund["detail"]["status"] == 201


async def test_balance_alert_by_the_tenant_and_a_buyer_key(redis, redis_server, cfg, tmp_path):
    """PUT /alert: the tenant's token and a buyer key on its own account set the account's
    own threshold; one above the balance fires balance_alert (ref api) at once; a reload
    (provisioning the config again) keeps it; null puts the config's back. The key's change
    has its audit row; another buyer's key gets the 404 of an unknown account."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        user = (await new_user(eng, "alerts@example.com", ["c1"]))["user"]
        key = await new_key(eng, user["id"])
        other = await new_key(eng, (await new_user(eng, "n@example.com", ["c2"]))["user"]["id"])
        await call(eng, "POST", "/v1/accounts/c1/credits", "tok-t1", {"amount": "30.00"},
                   {"Idempotency-Key": "alert-credit"})
        status, body = await call(eng, "PUT", "/v1/accounts/c1/alert", key, {"threshold": "25"})
        assert (status, body) == (200, {"threshold": "25.00", "source": "account"})
        assert [e["type"] for e in await eng.events() if e["type"] == "balance_alert"] == []
        status, body = await call(eng, "PUT", "/v1/accounts/c1/alert", key,
                                  {"threshold": "40.00"})
        assert status == 200 and body["threshold"] == "40.00"
        [alert] = [e for e in await eng.events() if e["type"] == "balance_alert"]
        assert (alert["account"], alert["threshold"], alert["balance"], alert["ref"]) == (
            "c1", "40000000", "30000000", "api")
        status, body = await call(eng, "PUT", "/v1/accounts/c1/alert", other,
                                  {"threshold": "1.00"})
        assert (status, body["error"]["code"]) == (404, "unknown_account")
        # a reload keeps the account's own threshold
        await provision_accounts(eng.svc.cfg, eng.svc.billing.store)
        status, view = await call(eng, "GET", "/v1/accounts/c1/overview", key)
        assert (view["alert"], view["alert_source"]) == ("40.00", "account")
        # the tenant's token; then null: the config's (20.00) again
        status, body = await call(eng, "PUT", "/v1/accounts/c1/alert", "tok-t1",
                                  {"threshold": "2.50"})
        assert (status, body) == (200, {"threshold": "2.50", "source": "account"})
        status, body = await call(eng, "PUT", "/v1/accounts/c1/alert", key, {"threshold": None})
        assert (status, body) == (200, {"threshold": "20.00", "source": "config"})
        status, view = await call(eng, "GET", "/v1/accounts/c1/overview", "tok-t1")
        assert (view["alert"], view["alert_source"]) == ("20.00", "config")
        status, body = await call(eng, "PUT", "/v1/accounts/c1/alert", key,
                                  {"threshold": "0.99"})
        assert (status, body["error"]["code"]) == (400, "alert_too_small")
        audit = await eng.app.identity.audit_rows("t1")
        mine = [(r["action"], r["account"], r["actor"]) for r in audit if r["key_id"]]
        assert mine == [("setBalanceAlert", "c1", user["id"])] * 3


async def test_an_operator_user_has_no_account_and_no_key(redis, redis_server, cfg, tmp_path):
    """role operator (the portal's operator page): made with no account (with one: 409
    operator_user, nothing stored), never mapped to one, never given a key; deleting it
    removes its role."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        before = await sql_rows(eng, "portal_users")
        status, body = await call(eng, "POST", "/v1/portal/users", "tok-t1",
                                  {"email": "ops@example.com", "role": "operator",
                                   "accounts": ["c1"]})
        assert (status, body["error"]["code"]) == (409, "operator_user")
        assert await sql_rows(eng, "portal_users") == before
        status, body = await call(eng, "POST", "/v1/portal/users", "tok-t1",
                                  {"email": "ops@example.com", "role": "root"})
        assert (status, body["error"]["code"]) == (400, "invalid_body")
        made = await new_user(eng, "ops@example.com", [])
        assert made["user"]["role"] == "buyer"
        ops = (await call(eng, "POST", "/v1/portal/users", "tok-t1",
                          {"email": "ops2@example.com", "role": "operator"}))[1]["user"]
        assert (ops["role"], ops["accounts"]) == ("operator", [])
        status, body = await call(eng, "POST", f"/v1/portal/users/{ops['id']}/keys", "tok-t1",
                                  {"name": "x"})
        assert (status, body["error"]["code"]) == (409, "operator_user")
        status, body = await call(eng, "PATCH", f"/v1/portal/users/{ops['id']}", "tok-t1",
                                  {"accounts": ["c1"]})
        assert (status, body["error"]["code"]) == (409, "operator_user")
        assert await sql_rows(eng, "api_keys") == []
        status, body = await call(eng, "PATCH", f"/v1/portal/users/{ops['id']}", "tok-t1",
                                  {"status": "disabled"})
        assert (status, body["role"], body["accounts"]) == (200, "operator", [])
        status, users = await call(eng, "GET", "/v1/portal/users", "tok-t1")
        assert [(u["email"], u["role"]) for u in users["data"]] == [
            ("ops@example.com", "buyer"), ("ops2@example.com", "operator")]
        assert (await call(eng, "DELETE", f"/v1/portal/users/{ops['id']}", "tok-t1"))[0] == 200
        assert await sql_rows(eng, "portal_operators") == []


async def test_a_return_needs_the_account_the_sale_charged(redis, redis_server, cfg, tmp_path):
    """A buyer moved to another client after the sale: the key of the new client's user
    cannot return the lead (its refund would credit the old client, which paid)."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        user = (await new_user(eng, "new-owner@example.com", ["c2"]))["user"]
        key = await new_key(eng, user["id"])
        await call(eng, "POST", "/v1/accounts/c1/credits", "tok-t1", {"amount": "50.00"},
                   {"Idempotency-Key": "c1-credit"})
        _, lead = await eng.lead(campaign="camp1", email="moved@example.com")
        assert lead["status"] == "ACCEPTED", lead
        moved = tmp_path / "moved.toml"
        moved.write_text(TOML + "".join(CAMPAIGN.format(n=n) for n in (1, 2, 3)).replace(
            'id = "b1"\ncampaign = "camp1"\nclient = "c1"',
            'id = "b1"\ncampaign = "camp1"\nclient = "c2"'))
        await eng.svc.reload(str(moved))
        assert eng.app.runtime.buyer_client[("t1", "b1")] == "c2"
        before = await redis_dump(eng)
        status, body = await call(eng, "POST", f"/v1/leads/{lead['lead_id']}/returns", key,
                                  {"buyer": "b1", "reason": "wrong_number"})
        assert status == 404 and body["error"]["code"] == "unknown_sale", body
        assert await redis_dump(eng) == before
        # the tenant may (the refund goes to c1, which paid)
        status, body = await call(eng, "POST", f"/v1/leads/{lead['lead_id']}/returns",
                                  "tok-t1", {"buyer": "b1", "reason": "wrong_number"})
        assert status == 200, body
        assert await eng.balance("c1") == 50 * 10**6 and await eng.balance("c2") == 0


async def test_the_document_has_the_portal_and_the_buyer_key():
    doc = openapi.document()
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"tenantToken", "buyerKey"}
    assert schemes["buyerKey"]["scheme"] == "bearer"
    for e in ENDPOINTS:
        op = doc["paths"][e.path][e.method.lower()]
        if e.buyer:
            assert op["security"] == [{"tenantToken": []}, {"buyerKey": []}], e.operation_id
            assert "403" not in op["responses"] or "forbidden_for_buyer_key" not in json.dumps(
                op["responses"]["403"])
        elif e.tenant:
            assert op["security"] == [{"tenantToken": []}], e.operation_id
            assert "forbidden_for_buyer_key" in json.dumps(op["responses"]["403"])
    for path in ("/v1/portal/users", "/v1/portal/users/{id}", "/v1/portal/users/{id}/keys",
                 "/v1/portal/users/{id}/invite", "/v1/portal/keys/{key_id}",
                 "/v1/portal/invites/{token}"):
        assert path in doc["paths"], path
    assert doc["paths"]["/v1/portal/invites/{token}"]["post"]["security"] == []


# ---- the access matrix ---------------------------------------------------------------------

BUYER_OPS = [e for e in ENDPOINTS if e.buyer]
TENANT_ONLY = [e for e in ENDPOINTS if e.tenant and not e.buyer]


@dataclass
class Call:
    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Ctx:
    eng: Engine
    stripe: Any

    async def card(self, account: str) -> str:
        pm = self.stripe.card()
        status, body = await call(self.eng, "POST", f"/v1/accounts/{account}/payment-methods",
                                  "tok-t1", {"payment_method": pm})
        assert status == 201, body
        return pm

    async def credit(self, account: str, amount: str = "100.00") -> None:
        status, body = await call(self.eng, "POST", f"/v1/accounts/{account}/credits",
                                  "tok-t1", {"amount": amount},
                                  {"Idempotency-Key": uuid.uuid4().hex})
        assert status == 201, body

    async def fund(self, account: str) -> None:
        status, body = await call(self.eng, "POST", f"/v1/accounts/{account}/funds", "tok-t1",
                                  {"amount": "100.00"}, {"Idempotency-Key": uuid.uuid4().hex})
        assert status == 201, body


Prepare = Callable[[Ctx, str], Awaitable[Call]]  # (ctx, client account) -> the call


def _n(account: str) -> str:
    return account.removeprefix("c")


def get(path: str) -> Prepare:
    async def prep(ctx: Ctx, a: str) -> Call:
        return Call("GET", path.format(a=a))
    return prep


async def _pause(ctx: Ctx, a: str) -> Call:
    return Call("POST", f"/v1/buyers/b{_n(a)}/pause")


async def _resume(ctx: Ctx, a: str) -> Call:
    await call(ctx.eng, "POST", f"/v1/buyers/b{_n(a)}/pause", "tok-t1")
    return Call("POST", f"/v1/buyers/b{_n(a)}/resume")


async def _return(ctx: Ctx, a: str) -> Call:
    await ctx.credit(a)
    _, lead = await ctx.eng.lead(campaign=f"camp{_n(a)}", email=f"{a}@example.com")
    assert lead["status"] == "ACCEPTED", lead
    return Call("POST", f"/v1/leads/{lead['lead_id']}/returns",
                {"buyer": f"b{_n(a)}", "reason": "wrong_number"})


async def _fund(ctx: Ctx, a: str) -> Call:
    await ctx.card(a)
    return Call("POST", f"/v1/accounts/{a}/funds", {"amount": "100.00"},
                {"Idempotency-Key": f"matrix-{a}"})


async def _attach(ctx: Ctx, a: str) -> Call:
    return Call("POST", f"/v1/accounts/{a}/payment-methods",
                {"payment_method": ctx.stripe.card()})


def card_action(action: str, method: str = "POST") -> Prepare:
    async def prep(ctx: Ctx, a: str) -> Call:
        await ctx.card(a)
        backup = await ctx.card(a)
        if action == "deactivate":
            await call(ctx.eng, "POST", f"/v1/accounts/{a}/payment-methods/{backup}/activate",
                       "tok-t1")
        path = f"/v1/accounts/{a}/payment-methods/{backup}"
        return Call(method, path if action == "detach" else f"{path}/{action}")
    return prep


async def _refund_balance(ctx: Ctx, a: str) -> Call:
    await ctx.card(a)
    await ctx.fund(a)
    return Call("POST", f"/v1/accounts/{a}/refund-balance")


async def _alert(ctx: Ctx, a: str) -> Call:
    return Call("PUT", f"/v1/accounts/{a}/alert", {"threshold": "5.00"})


async def _auto_recharge(ctx: Ctx, a: str) -> Call:
    await ctx.card(a)
    return Call("PUT", f"/v1/accounts/{a}/auto-recharge",
                {"enabled": True, "threshold": "20.00", "amount": "100.00"})


# one per buyer-capable operation of the route table: a new one without a recipe fails
RECIPES: dict[str, Prepare] = {
    "getAccount": get("/v1/accounts/{a}"),
    "getLedger": get("/v1/accounts/{a}/ledger"),
    "pauseBuyer": _pause,
    "resumeBuyer": _resume,
    "returnLead": _return,
    "fundAccount": _fund,
    "listPaymentMethods": get("/v1/accounts/{a}/payment-methods"),
    "attachPaymentMethod": _attach,
    "activatePaymentMethod": card_action("activate"),
    "deactivatePaymentMethod": card_action("deactivate"),
    "primaryPaymentMethod": card_action("primary"),
    "detachPaymentMethod": card_action("detach", "DELETE"),
    "refundBalance": _refund_balance,
    "setAutoRecharge": _auto_recharge,
    "setBalanceAlert": _alert,
    "listTransactions": get("/v1/accounts/{a}/transactions?format=csv"),
    "getOverview": get("/v1/accounts/{a}/overview"),
}
# the 404 of an account, buyer or sale the key does not reach (as of one that does not exist)
NOT_YOURS = {"account": "unknown_account", "buyer": "unknown_buyer", "sale": "unknown_sale"}


async def redis_dump(eng: Engine) -> dict[bytes, bytes]:
    out = {}
    async for key in eng.redis.scan_iter(count=1000):
        out[key] = await eng.redis.dump(key)
    return out


async def sql_dump(eng: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """The ledger archive and every identity table but a key's last use (a valid key's
    call counts as a use, whatever it is answered)."""
    out = {t: await sql_rows(eng, t) for t in ("ledger_entries", "portal_users",
                                               "portal_user_accounts", "portal_invites",
                                               "portal_audit")}
    out["api_keys"] = [r[:8] + r[9:] for r in await sql_rows(eng, "api_keys")]
    return out


@dataclass
class Keys:
    owner: str  # (a) the user mapped to c1
    neighbour: str  # (b) a user of the same tenant mapped to c2
    alien: str  # (c) a user of tenant t2
    revoked: str  # (d) the owner's revoked key
    disabled: str  # (e) a disabled user mapped to c1


async def matrix_keys(eng: Engine) -> Keys:
    owner = (await new_user(eng, "owner@example.com", ["c1"]))["user"]["id"]
    neighbour = (await new_user(eng, "neighbour@example.com", ["c2"]))["user"]["id"]
    alien = (await new_user(eng, "alien@example.com", ["other"], "tok-t2"))["user"]["id"]
    disabled = (await new_user(eng, "disabled@example.com", ["c1"]))["user"]["id"]
    revoked = await new_key(eng, owner)
    status, _ = await call(eng, "DELETE", f"/v1/portal/keys/{credentials.key_id(revoked)}",
                           "tok-t1")
    assert status == 200
    out = Keys(owner=await new_key(eng, owner), neighbour=await new_key(eng, neighbour),
               alien=await new_key(eng, alien, "tok-t2"), revoked=revoked,
               disabled=await new_key(eng, disabled))
    status, _ = await call(eng, "PATCH", f"/v1/portal/users/{disabled}", "tok-t1",
                           {"status": "disabled"})
    assert status == 200
    return out


def test_every_buyer_capable_endpoint_has_a_recipe():
    assert {e.operation_id for e in BUYER_OPS} == set(RECIPES)


@pytest.mark.parametrize("endpoint", BUYER_OPS, ids=lambda e: e.operation_id)
async def test_access_matrix(redis, redis_server, cfg, tmp_path: Path, stripe_env,
                             endpoint: Endpoint):
    """(a) the owner's key and (g) the tenant's token get data; (b) a key of another user
    of the tenant, (c) of another tenant's user: 404 as for an account that does not
    exist; (d) a revoked key, (e) a disabled user's key, (f) no credentials: 401. For
    (b)-(f) not one Redis key and not one SQL row changes."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        ks = await matrix_keys(eng)
        ctx = Ctx(eng, stripe_env)
        mine = await RECIPES[endpoint.operation_id](ctx, "c1")
        route, _, _ = eng.app.router.match(mine.method, mine.path.split("?")[0])
        assert route is not None and (mine.method, route.name) == endpoint.key
        redis_before, sql_before = await redis_dump(eng), await sql_dump(eng)
        refused = {"b": (ks.neighbour, 404), "c": (ks.alien, 404), "d": (ks.revoked, 401),
                   "e": (ks.disabled, 401), "f": (None, 401)}
        for who, (token, want) in refused.items():
            status, body = await call(eng, mine.method, mine.path, token, mine.body,
                                      mine.headers)
            code = NOT_YOURS[endpoint.buyer] if want == 404 else "unauthorized"
            assert (status, body["error"]["code"]) == (want, code), (who, body)
            assert await redis_dump(eng) == redis_before, f"({who}) changed Redis"
            assert await sql_dump(eng) == sql_before, f"({who}) changed SQL"
        # (a) the owner's key
        status, body = await call(eng, mine.method, mine.path, ks.owner, mine.body, mine.headers)
        assert 200 <= status < 300, ("a", body)
        # (g) the tenant's token (on another client, prepared the same way)
        theirs = await RECIPES[endpoint.operation_id](ctx, "c3")
        status, body = await call(eng, theirs.method, theirs.path, "tok-t1", theirs.body,
                                  theirs.headers)
        assert 200 <= status < 300, ("g", body)
        await eng.assert_reconciled()


async def test_tenant_only_endpoints_refuse_a_buyer_key(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        ks = await matrix_keys(eng)
        redis_before, sql_before = await redis_dump(eng), await sql_dump(eng)
        for e in TENANT_ONLY:
            path = e.path.replace("{id}", "c1").replace("{key_id}", "x")
            body = {"amount": "10.00", "account": "c1", "meter": "m", "quantity": 1,
                    "event_id": "e1", "items": [], "email": "z@example.com", "accounts": []}
            # a valid buyer key: 403; a malformed or revoked one: 401
            for token, want in ((ks.owner, (403, "forbidden_for_buyer_key")),
                                (ks.revoked, (401, "unauthorized")),
                                ("lfk_nothing", (401, "unauthorized"))):
                status, answer = await call(eng, e.method, path, token, body,
                                            {"Idempotency-Key": "k1"})
                assert (status, answer["error"]["code"]) == want, (e.operation_id, answer)
        assert await redis_dump(eng) == redis_before
        assert await sql_dump(eng) == sql_before

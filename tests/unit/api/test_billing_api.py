"""The billing HTTP endpoints over real HTTP (uvicorn + aiohttp), redis and localstripe."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import uvicorn

from billing.archive import Archive
from billing.context import BillingContext
from billing.stripe_gateway import StripeGateway
from engine.api.billing import routes
from engine.api.toolkit import Request, Router, error_response, read_body
from engine.core import keys
from engine.store.embedded import free_port
from tests.helpers.billing_fixtures import T, new_ctx
from tests.helpers.stripe_fixture import DECLINES, LocalStripe

TOKEN = "tok-acme"


class _App:
    """The integrator's part, minimal: bearer token -> scope["leadflow.tenant"]."""

    def __init__(self) -> None:
        self.router = Router()

    def mount(self, ctx: BillingContext) -> None:
        self.router = Router()
        for method, path, handler in routes(ctx):
            self.router.add(method, path, handler)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = dict(scope["headers"])
        if headers.get(b"authorization") == f"Bearer {TOKEN}".encode():
            scope["leadflow.tenant"] = T
        route, params, exists = self.router.match(scope["method"], scope["path"])
        if route is None:
            await error_response(405 if exists else 404, "not_found", "no route").send(send)
            return
        body = await read_body(receive, route.body_limit)
        await (await route.handler(Request(scope, body, params))).send(send)


@dataclass
class Api:
    ctx: BillingContext
    http: aiohttp.ClientSession
    base: str

    async def call(self, method: str, path: str, body: Any = None, *, token: str = TOKEN,
                   headers: dict[str, str] | None = None, raw: bytes | None = None
                   ) -> tuple[int, Any]:
        h = {"Authorization": f"Bearer {token}", **(headers or {})}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.base + path, data=data, headers=h) as r:
            text = await r.text()
            if r.content_type == "application/json":
                return r.status, json.loads(text)
            return r.status, text


@pytest.fixture(scope="session")
async def _server() -> AsyncIterator[tuple[_App, str]]:
    """One uvicorn server for the module; each test mounts its own context."""
    app = _App()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           lifespan="off", ws="none", log_level="warning",
                                           access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.005)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
async def api(redis: aioredis.Redis, gateway: StripeGateway, tmp_path: Path,
              _server: tuple[_App, str]) -> AsyncIterator[Api]:
    ctx = await new_ctx(redis, gateway)
    ctx.archive = await Archive.open(str(tmp_path / "ledger.sqlite3"))
    app, base = _server
    app.mount(ctx)
    async with aiohttp.ClientSession() as http:
        yield Api(ctx, http, base)
    await ctx.archive.close()


async def _snapshot(ctx: BillingContext) -> tuple[Any, ...]:
    r = ctx.store.redis
    bal = [await r.hget(keys.acct(T, f"c{i}"), "bal") for i in (1, 2, 3)]
    return (*bal, await r.xlen(keys.ledger(T)))


async def test_full_flow(api: Api, localstripe: LocalStripe) -> None:
    pm = localstripe.card()
    st, body = await api.call("POST", "/v1/accounts/c1/payment-methods", {"payment_method": pm})
    assert st == 201 and body["primary"] and body["last4"] == "4242"
    st, body = await api.call("POST", "/v1/accounts/c1/funds", {"amount": "100.00"},
                              headers={"Idempotency-Key": "ord-1"})
    assert st == 201, body
    assert (body["amount"], body["card_fee"], body["charged"]) == ("100.00", "3.00", "103.00")
    st, again = await api.call("POST", "/v1/accounts/c1/funds", {"amount": "100.00"},
                               headers={"Idempotency-Key": "ord-1"})
    assert st == 201 and again["payment_intent"] == body["payment_intent"]
    st, body = await api.call("PUT", "/v1/accounts/c1/auto-recharge",
                              {"enabled": True, "threshold": "25.00", "amount": "500.00"})
    assert st == 200 and body["threshold"] == "25.00"
    st, body = await api.call("POST", "/v1/usage", {"account": "c1", "meter": "sms",
                                                    "quantity": 10, "event_id": "e1"})
    assert st == 201 and body["cost"] == "0.50"
    st, body = await api.call("POST", "/v1/usage", {"account": "c1", "meter": "sms",
                                                    "quantity": 10, "event_id": "e1"})
    assert st == 200 and body["replay"]
    st, body = await api.call("POST", "/v1/usage/batch", {"items": [
        {"account": "c1", "meter": "sms", "quantity": 1, "event_id": "e2"},
        {"account": "c2", "meter": "sms", "quantity": 1000, "event_id": "e3"}]})
    assert st == 200 and [x["ok"] for x in body["data"]] == [True, False]  # c2: no funds
    st, body = await api.call("GET", "/v1/accounts/c1/overview")
    assert st == 200 and body["balance"] == "99.45"
    assert body["auto_recharge"]["amount"] == "500.00"
    assert [p["type"] for p in body["payment_history"]] == ["funding"]
    assert api.ctx.archive is not None
    await api.ctx.archive.archive_once(api.ctx.store.redis, T, consumer="t")
    st, body = await api.call("GET", "/v1/accounts/c1/transactions?type=usage&limit=1")
    assert st == 200 and len(body["data"]) == 1 and body["next_cursor"]
    st, body = await api.call("GET", "/v1/accounts/c1/transactions?q=sms&from=2020-01-01")
    assert st == 200 and len(body["data"]) == 2
    st, text = await api.call("GET", "/v1/accounts/c1/transactions?format=csv")
    assert st == 200 and text.startswith("id,time_utc") and "103.00" in text
    st, body = await api.call("POST", "/v1/accounts/c1/refund-balance")
    assert st == 200 and body["closed"], body
    st, body = await api.call("GET", "/v1/accounts/c1/overview")
    assert body["balance"] == "0.00" and body["closed"]


async def test_payment_method_endpoints(api: Api, localstripe: LocalStripe) -> None:
    a, b = localstripe.card(), localstripe.card(DECLINES)
    for pm in (a, b):
        st, _ = await api.call("POST", "/v1/accounts/c1/payment-methods", {"payment_method": pm})
        assert st == 201
    st, body = await api.call("POST", f"/v1/accounts/c1/payment-methods/{b}/activate")
    assert st == 200 and all(m["active"] for m in body["data"])
    st, body = await api.call("POST", f"/v1/accounts/c1/payment-methods/{b}/primary")
    assert [m["id"] for m in body["data"]] == [b, a]
    st, body = await api.call("POST", f"/v1/accounts/c1/payment-methods/{a}/deactivate")
    assert st == 200 and body["data"][1]["active"] is False
    st, body = await api.call("POST", f"/v1/accounts/c1/payment-methods/{b}/deactivate")
    assert st == 400 and body["error"]["code"] == "is_primary"
    # primary declines, backup deactivated: a clear 402 and nothing moved
    st, body = await api.call("POST", "/v1/accounts/c1/funds",
                              {"amount": "100.00", "idempotency_key": "x"})
    assert st == 402 and body["error"]["code"] == "payment_failed" and body["error"]["attempt"]
    st, body = await api.call("DELETE", f"/v1/accounts/c1/payment-methods/{b}")
    assert st == 200 and [m["id"] for m in body["data"]] == [a] and body["data"][0]["primary"]
    st, body = await api.call("GET", "/v1/accounts/c1/payment-methods")
    assert st == 200 and len(body["data"]) == 1


BAD: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    ("POST", "/v1/accounts/c1/funds", {"amount": "99.99"}, {"Idempotency-Key": "k"}, 400,
     "amount_too_small"),
    ("POST", "/v1/accounts/c1/funds", {"amount": 100.0}, {"Idempotency-Key": "k"}, 400,
     "invalid_body"),
    ("POST", "/v1/accounts/c1/funds", {"amount": "1e5"}, {"Idempotency-Key": "k"}, 400,
     "invalid_amount"),
    ("POST", "/v1/accounts/c1/funds", {"amount": "-100.00"}, {"Idempotency-Key": "k"}, 400,
     "amount_too_small"),
    ("POST", "/v1/accounts/c1/funds", {"amount": "100.005"}, {"Idempotency-Key": "k"}, 400,
     "invalid_amount"),
    ("POST", "/v1/accounts/c1/funds", {"amount": "100.00"}, {}, 400,
     "invalid_idempotency_key"),
    ("POST", "/v1/accounts/c1/funds", {"amount": "100.00", "extra": 1},
     {"Idempotency-Key": "k"}, 400, "invalid_body"),
    ("POST", "/v1/accounts/c1/funds", b"{not json", {"Idempotency-Key": "k"}, 400,
     "invalid_body"),
    ("POST", "/v1/accounts/nope/funds", {"amount": "100.00"}, {"Idempotency-Key": "k"}, 404,
     "unknown_account"),
    ("POST", "/v1/accounts/c1/funds", {"amount": "100.00"}, {"Idempotency-Key": "k"}, 409,
     "no_payment_method"),
    ("POST", "/v1/accounts/c1/payment-methods", {"payment_method": "4242424242424242"}, {},
     400, "invalid_payment_method"),
    ("POST", "/v1/accounts/c1/payment-methods", {}, {}, 400, "invalid_body"),
    ("POST", "/v1/accounts/c1/payment-methods/pm_nope/activate", None, {}, 404,
     "unknown_payment_method"),
    ("DELETE", "/v1/accounts/c1/payment-methods/pm_nope", None, {}, 404,
     "unknown_payment_method"),
    ("POST", "/v1/accounts/c7/refund-balance", None, {}, 404, "unknown_account"),
    ("PUT", "/v1/accounts/c1/auto-recharge", {"enabled": True, "threshold": "19.99"}, {}, 400,
     "threshold_too_small"),
    ("PUT", "/v1/accounts/c1/auto-recharge", {"enabled": True, "amount": "99.00"}, {}, 400,
     "amount_too_small"),
    ("PUT", "/v1/accounts/c1/auto-recharge", {"enabled": True}, {}, 409, "no_payment_method"),
    ("PUT", "/v1/accounts/c1/auto-recharge", {"enabled": "yes"}, {}, 400, "invalid_body"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": "0.99"}, {}, 400, "alert_too_small"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": "0"}, {}, 400, "alert_too_small"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": "-5.00"}, {}, 400, "alert_too_small"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": 25}, {}, 400, "invalid_body"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": "25.5e1"}, {}, 400, "invalid_amount"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": "1.0000001"}, {}, 400, "invalid_amount"),
    ("PUT", "/v1/accounts/c1/alert", {}, {}, 400, "invalid_body"),
    ("PUT", "/v1/accounts/c1/alert", {"threshold": "5.00", "x": 1}, {}, 400, "invalid_body"),
    ("PUT", "/v1/accounts/c7/alert", {"threshold": "5.00"}, {}, 404, "unknown_account"),
    ("POST", "/v1/usage", {"account": "c1", "meter": "fax", "quantity": 1, "event_id": "e"},
     {}, 400, "unknown_meter"),
    ("POST", "/v1/usage", {"account": "c1", "meter": "sms", "quantity": -1, "event_id": "e"},
     {}, 400, "invalid_quantity"),
    ("POST", "/v1/usage", {"account": "c9", "meter": "sms", "quantity": 1, "event_id": "e"},
     {}, 404, "unknown_account"),
    ("POST", "/v1/usage", {"account": "c1", "meter": "sms", "quantity": 1000,
                           "event_id": "e"}, {}, 402, "insufficient_funds"),
    ("POST", "/v1/usage/batch", {"items": []}, {}, 400, "invalid_batch"),
    ("POST", "/v1/usage/batch", {"items": [
        {"account": "c1", "meter": "sms", "quantity": 1, "event_id": "a"},
        {"account": "c1", "meter": "sms", "quantity": "x", "event_id": "b"}]}, {}, 400,
     "invalid_quantity"),
    ("GET", "/v1/accounts/c1/transactions?type=nope", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?from=yesterday", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?limit=0", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?limit=-1", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?format=xml", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?cursor=abc", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?cursor=99999999999999999999-0", None, {}, 400,
     "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?cursor=1-99999999999999999999", None, {}, 400,
     "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?cursor=%EF%BC%91-0", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?limit=%C2%B2", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?from=%C2%B2", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?to=1%C2%B2", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?sort=asc", None, {}, 400, "invalid_query"),
    # a CSV export reads limit and cursor as the JSON form does (schemathesis: it took any)
    ("GET", "/v1/accounts/c1/transactions?format=csv&limit=%1F", None, {}, 400,
     "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?format=csv&limit=0", None, {}, 400,
     "invalid_query"),
    ("GET", "/v1/accounts/c1/transactions?format=csv&cursor=f%C2%86", None, {}, 400,
     "invalid_query"),
    ("GET", "/v1/accounts/nope/overview", None, {}, 404, "unknown_account"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "code"), BAD,
                         ids=[f"{m} {p} {c}" for m, p, _, _, _, c in BAD])
async def test_bad_input_clear_error_nothing_moved(
        api: Api, method: str, path: str, body: Any, headers: dict[str, str], status: int,
        code: str) -> None:
    before = await _snapshot(api.ctx)
    raw = body if isinstance(body, bytes) else None
    st, out = await api.call(method, path, None if raw else body, headers=headers, raw=raw)
    assert (st, out["error"]["code"]) == (status, code), out
    assert out["error"]["message"]
    assert "4242424242424242" not in out["error"]["message"]  # card data is never echoed
    assert await _snapshot(api.ctx) == before


async def test_unauthenticated_and_wrong_content_type(api: Api) -> None:
    st, out = await api.call("GET", "/v1/accounts/c1/overview", token="wrong")
    assert st == 401 and out["error"]["code"] == "unauthorized"
    st, out = await api.call("POST", "/v1/usage", raw=b"account=c1",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 400 and out["error"]["code"] == "unsupported_media_type"


def test_stripe_idempotency_keys_fit_stripes_limit() -> None:
    """Our keys embed the tenant, the account and the client's own key (up to 255 chars):
    Stripe refuses a key over 255 characters, so a long one is shortened the same way on
    every retry, and two long keys that differ only at the end stay distinct."""
    from billing.stripe_gateway import MAX_STRIPE_KEY, stripe_key

    long_a = "t1:fund:c1:" + "k" * 255 + ":a:0"
    long_b = "t1:fund:c1:" + "k" * 255 + ":b:0"
    assert len(stripe_key(long_a)) <= MAX_STRIPE_KEY
    assert stripe_key(long_a) == stripe_key(long_a) != stripe_key(long_b)
    assert stripe_key("t1:fund:c1:short:0") == "t1:fund:c1:short:0"

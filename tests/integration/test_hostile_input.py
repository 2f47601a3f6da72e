"""Hostile input over real HTTP (issue #14, "No 5xx a client did not earn"): JSON nested past
the decoder's recursion limit, and numbers written in digits of other scripts. Each is a
documented 4xx (or one ERROR line of a batch) and changes nothing; what is around it is
decided as usual."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec
import pytest

from engine.delivery.record import read_decision
from engine.delivery.worker import DeliveryWorker
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.harness import BASE_TOML, Engine, buyer, campaign, make_config, running

LEAD = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}
OPENING = 100_000_000
PRICE = 10_000_000
# t1 with a metered service: 0.25 a unit
METERED = BASE_TOML.replace('opening_balance = "1000.00"\n',
                            'opening_balance = "1000.00"\n[tenants.meters]\nsms = "0.25"\n', 1)
UNICODE_ELEVENS = ["\U0001d7d9\U0001d7d9",  # MATHEMATICAL DOUBLE-STRUCK DIGIT ONE, twice
                   "\uff11\uff11",  # full-width
                   "\u0661\u0661",  # Arabic-Indic
                   "1\u0661", "\u0661.5", "\u00b2"]  # mixed; a superscript (isdigit, not int)


def deep_array(n: int) -> bytes:
    return b"[" * n + b"]" * n


def deep_object(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


def deep_mixed(n: int) -> bytes:
    """A lead whose credentials are fine, with arrays and objects nested in a field."""
    head = msgspec.json.encode(LEAD)[:-1] + b',"email":'
    return head + b'[{"x":' * n + b"0" + b"}]" * n + b"}"


DEEP = [deep_array(1_000), deep_object(1_000), deep_array(10_000), deep_mixed(1_000)]


@pytest.fixture
def cfg() -> Any:
    return make_config(campaign(), buyer("b1", price="10.00"), base=METERED)


async def raw_post(eng: Engine, path: str, body: bytes, ctype: str | None,
                   **headers: str) -> tuple[int, Any]:
    """POST ``body`` as is; ``ctype`` None sends no Content-Type at all. Any answer is
    returned as (status, JSON or the raw bytes): a 500's text is not JSON."""
    h = dict(headers)
    skip = []
    if ctype is None:
        skip = ["Content-Type"]
    else:
        h["Content-Type"] = ctype
    async with eng.http.post(eng.url + path, data=body, headers=h,
                             skip_auto_headers=skip) as r:
        raw = await r.read()
        if "ndjson" in r.headers.get("content-type", ""):
            return r.status, [msgspec.json.decode(x) for x in raw.splitlines() if x]
        try:
            return r.status, msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return r.status, raw


async def raw_api(eng: Engine, method: str, path: str, body: bytes | None = None,
                  **headers: str) -> tuple[int, Any]:
    h = {"Authorization": "Bearer tok-t1", "Content-Type": "application/json", **headers}
    async with eng.http.request(method, eng.url + path, data=body, headers=h) as r:
        raw = await r.read()
        try:
            return r.status, msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return r.status, raw


@pytest.mark.parametrize("ctype", ["application/json", "text/plain", None])
async def test_deep_json_lead_is_error_1000_not_500(redis, redis_server, cfg, ctype) -> None:
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        for body in DEEP:
            status, resp = await raw_post(eng, "/v1/leads", body, ctype)
            assert status == 400, (status, resp)
            assert (resp["status"], resp["code"]) == ("ERROR", 1000), resp
            assert "nested too deeply" in resp["message"], resp
        assert await redis.dbsize() == before
        assert await eng.balance("c1") == OPENING
        status, resp = await eng.lead(email="after@example.com")  # the engine goes on
        assert (status, resp["status"]) == (200, "ACCEPTED"), resp


async def test_a_deep_batch_line_is_one_error_line(redis, redis_server, cfg) -> None:
    """One such line made the whole batch a 500: the valid lines are decided, each deep
    line is an ERROR 1000 line."""
    async with running(cfg, redis_server.url) as eng:
        a = msgspec.json.encode({**LEAD, "email": "a@example.com"})
        b = msgspec.json.encode({**LEAD, "email": "b@example.com"})
        body = b"\n".join([a, deep_array(2_000), b, deep_object(2_000), deep_mixed(1_000)])
        sold = []
        for ctype in ("application/x-ndjson", None):
            status, lines = await raw_post(eng, "/v1/leads/batch", body, ctype)
            assert status == 200, (status, lines)
            assert [(x["status"], x["code"]) for x in lines] == [
                ("ACCEPTED", 0), ("ERROR", 1000), ("ACCEPTED", 0), ("ERROR", 1000),
                ("ERROR", 1000)], lines
            assert all("nested too deeply" in x["message"] for x in lines[1::2]), lines
            sold.append([lines[0]["lead_id"], lines[2]["lead_id"]])
        assert sold[0] == sold[1]  # the second batch (no Content-Type) replays the two leads
        assert await eng.balance("c1") == OPENING - 2 * PRICE
        await eng.assert_reconciled()


TENANT_BODIES = [
    ("POST", "/v1/accounts/c1/credits", {"Idempotency-Key": "deep-credit"}),
    ("POST", "/v1/leads/000000000000000000000000/returns", {}),
    ("POST", "/v1/accounts/c1/funds", {"Idempotency-Key": "deep-fund"}),
    ("POST", "/v1/accounts/c1/payment-methods", {}),
    ("PUT", "/v1/accounts/c1/auto-recharge", {}),
    ("POST", "/v1/usage", {}),
    ("POST", "/v1/usage/batch", {}),
]


async def test_deep_json_on_the_tenant_api_is_invalid_body(redis, redis_server, cfg) -> None:
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        for method, path, headers in TENANT_BODIES:
            for body in (deep_array(5_000), deep_object(5_000),
                         b'{"amount":' + deep_array(5_000) + b"}",
                         b'{"items":' + deep_array(5_000) + b"}"):
                status, resp = await raw_api(eng, method, path, body, **headers)
                assert status == 400 and resp["error"]["code"] == "invalid_body", (
                    path, status, resp)
        assert await redis.dbsize() == before


@pytest.mark.parametrize("quantity", [*UNICODE_ELEVENS, "11\n", " 11", "+11", "1_1"])
async def test_usage_quantity_is_ascii_digits(redis, redis_server, cfg, quantity) -> None:
    """"\uff11\uff11" (full-width) was billed as 11 (2.75 on a 0.25 meter) and the ledger kept the text."""
    async with running(cfg, redis_server.url) as eng:
        before, balance = await redis.dbsize(), await eng.balance("c1")
        one = {"account": "c1", "meter": "sms", "quantity": quantity, "event_id": "u1"}
        status, resp = await eng.api("POST", "/v1/usage", json=one)
        assert status == 400 and resp["error"]["code"] == "invalid_quantity", resp
        ok = {**one, "quantity": "11", "event_id": "u0"}
        status, resp = await eng.api("POST", "/v1/usage/batch", json={"items": [ok, one]})
        assert status == 400 and resp["error"]["code"] == "invalid_quantity", resp
        assert resp["error"]["message"].startswith("items[1]: "), resp
        assert await redis.dbsize() == before and await eng.balance("c1") == balance
        status, resp = await eng.api("POST", "/v1/usage", json=ok)  # ASCII: billed
        assert (status, resp["cost"]) == (201, "2.75"), resp
        assert await eng.balance("c1") == balance - 2_750_000


async def test_ids_are_their_characters_and_no_newline(redis, redis_server, cfg) -> None:
    """A usage event id and a funding idempotency key are 1-128 of A-Z a-z 0-9 _ . : -; the
    pattern's "$" also matched before a final newline: "e1\\n" was billed as an event."""
    async with running(cfg, redis_server.url) as eng:
        before, balance = await redis.dbsize(), await eng.balance("c1")
        one = {"account": "c1", "meter": "sms", "quantity": 1, "event_id": "e1\n"}
        status, resp = await eng.api("POST", "/v1/usage", json=one)
        assert status == 400 and resp["error"]["code"] == "invalid_event_id", resp
        status, resp = await eng.api("POST", "/v1/accounts/c1/funds",
                                     json={"amount": "100.00", "idempotency_key": "k1\n"})
        assert status == 400 and resp["error"]["code"] == "invalid_idempotency_key", resp
        assert await redis.dbsize() == before and await eng.balance("c1") == balance


@pytest.mark.parametrize("limit", ["\uff11\uff10", "\u0661", "\U0001d7d9", "+5", " 5", "5 ",
                                   "1_0", "\u00b2", "0" * 5_000 + "1"],
                         ids=lambda v: ascii(v[:24]))
async def test_ledger_limit_is_ascii_digits(redis, redis_server, cfg, limit) -> None:
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.api("GET", f"/v1/accounts/c1/ledger?limit={quote(limit)}")
        assert status == 400 and body["error"]["code"] == "invalid_limit", (limit, body)
        status, body = await eng.api("GET", "/v1/accounts/c1/ledger?limit=007")
        assert status == 200 and len(body["entries"]) == 1


@pytest.mark.parametrize("query", [
    "limit=" + "9" * 5_000,  # int() of over 4300 digits raises ValueError: it was a 500
    "limit=\uff11\uff10", "limit=\u00b2", "limit=%2B5",
    "from=\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10",
    "from=\u0662\u0660\u0662\u0666-01-01", "to=2026-01-0\u0661", "cursor=\u0661-0",
    "to=" + "9" * 5_000], ids=lambda q: ascii(q[:24]))
async def test_transactions_query_numbers_are_ascii_digits(redis, redis_server, cfg,
                                                          query) -> None:
    async with running(cfg, redis_server.url) as eng:
        name, _, value = query.partition("=")
        status, body = await eng.api(
            "GET", f"/v1/accounts/c1/transactions?{name}={quote(value, safe='%')}")
        assert status == 400 and body["error"]["code"] == "invalid_query", (query, body)


NUMBERS_CAMPAIGN = """
[[campaigns]]
tenant = "t1"
id = "camp"
fields = [
  { name = "email", type = "email", required = true },
  { name = "bill", type = "number", min = 1 },
  { name = "zip", type = "zip" },
  { name = "phone", type = "phone" },
  { name = "dob", type = "dob" },
]
"""


async def test_a_number_field_takes_ascii_digits_only(redis, redis_server) -> None:
    cfg = make_config(NUMBERS_CAMPAIGN, buyer("b1"), base=METERED)
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        for field, value in [("bill", "\u0661\u0665\u0660\u0660"), ("bill", "1\uff15"),
                             ("bill", "\U0001d7d9.5"), ("zip", "\u0661\u0662\u0663\u0664\u0665"),
                             ("phone", "\uff12\uff11\uff12" + "5550123"),
                             ("dob", "\u0661\u0669\u0669\u0660-01-01")]:
            status, resp = await eng.lead(email="n@example.com", **{field: value})
            assert status == 422 and resp["code"] == 1020, (field, value, resp)
            assert resp["errors"][0]["field"] == field, resp
        assert await redis.dbsize() == before
        status, resp = await eng.lead(email="n@example.com", bill="1500")
        assert (status, resp["status"]) == (200, "ACCEPTED"), resp


# --- what buyers answer (their responses are outside input too) ---------------------------

RULES = 'accept = [{ path = "status", equals = "accepted" }]'




def sync_config(buyers: Buyers, first: str, rules: str = RULES) -> Any:
    extra = 'mode = "sync"\nsync_deadline_ms = 5000'
    hooks = [f'delivery = {{ url = "{buyers.url}{path}", secret = "{SECRET}", {r} }}'
             for path, r in ((first, rules), ("/accept", RULES))]
    return make_config(campaign(extra=extra),
                       buyer("b1", client="c1", priority=1, extra=hooks[0]),
                       buyer("b2", client="c2", priority=2, extra=hooks[1]))


@pytest.mark.parametrize(("first", "rules", "b1"), [
    ("/deep", RULES, "REJECTED"),  # its JSON nested too deeply: no rule's path matches
    ("/busy_odd", RULES, "FAILED"),  # 429, Retry-After "²": no verdict (int("²") raised)
    ("/listed", 'accept = [{ path = "data.\\u00b2", equals = "accepted" }]', "REJECTED"),
    ("/listed", 'accept = [{ path = "data.--0", equals = "accepted" }]', "REJECTED"),
])
async def test_a_buyers_odd_answer_is_its_verdict_not_a_500(
        redis, redis_server, buyers, first, rules, b1) -> None:
    async with running(sync_config(buyers, first, rules), redis_server.url) as eng:
        lead = msgspec.json.encode({**LEAD, "email": "sync@example.com"})
        status, resp = await raw_post(eng, "/v1/leads", lead, "application/json")
        assert status == 200, (status, resp)  # it was a 500 (RecursionError, ValueError)
        assert (resp["status"], resp["code"]) == ("ACCEPTED", 0), resp
        decision = await read_decision(eng.store, "t1", resp["lead_id"], "b1")
        assert decision is not None and decision.o == b1, decision
        assert await eng.balance("c1") == OPENING
        assert await eng.balance("c2") == OPENING - PRICE
        await eng.assert_reconciled()


async def test_a_list_index_in_a_rule_still_works(redis, redis_server, buyers) -> None:
    rules = 'accept = [{ path = "data.0", equals = "accepted" }]'
    async with running(sync_config(buyers, "/listed", rules), redis_server.url) as eng:
        status, resp = await eng.lead(email="list@example.com")
        assert (status, resp["status"]) == (200, "ACCEPTED"), resp
        assert await eng.balance("c1") == OPENING - PRICE


async def test_the_delivery_worker_rejects_a_too_deep_answer(redis, redis_server, buyers) -> None:
    """Async delivery: the RecursionError escaped the worker's verdict, the job stayed
    pending (to fail the same way on every claim) and the buyer kept the charge."""
    hooked = f'delivery = {{ url = "{buyers.url}/deep", secret = "{SECRET}", {RULES} }}'
    async with running(make_config(campaign(), buyer("b1", extra=hooked)),
                       redis_server.url) as eng:
        status, resp = await eng.lead(email="worker@example.com")
        assert (status, resp["status"]) == (200, "ACCEPTED"), resp
        assert await eng.balance("c1") == OPENING - PRICE
        w = DeliveryWorker(eng.svc.cfg, eng.store, tenants=["t1"], consumer="w")
        try:
            assert await w.process_once(block_ms=None) == 1
        finally:
            await w.close()
        decision = await read_decision(eng.store, "t1", resp["lead_id"], "b1")
        assert decision is not None and decision.o == "REJECTED", decision
        assert await eng.balance("c1") == OPENING  # the rejected sale is refunded
        await eng.assert_reconciled()

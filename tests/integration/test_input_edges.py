"""Bad input found by fuzzing the running engine: each answers with a documented 4xx (or
a documented ERROR line inside a batch) and changes nothing; valid input around it still
works."""

from __future__ import annotations

import msgspec
import pytest

from engine.core import money
from engine.core.billing_errors import MoneyError
from tests.helpers.harness import buyer, campaign, make_config, running

LEAD = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}


@pytest.fixture
def cfg():
    return make_config(campaign(), buyer("b1", price="10.00"))


@pytest.mark.parametrize("text", [
    "\u0661\u0660", "\uff15.00",  # Arabic-Indic and full-width digits
    "5.00\n", "\t5.00 ", " 5", "5.", ".5", "+5"])
def test_money_is_ascii_digits_and_nothing_around_them(text: str) -> None:
    with pytest.raises(MoneyError):
        money.parse(text)


async def test_ledger_paging_and_bodies_that_used_to_answer_500(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        for q in ("limit=0", "limit=-5", "limit=1001", "limit=x", "before=1%0A",
                  "before=1-2-3", "before=99999999999999999999"):
            status, body = await eng.api("GET", f"/v1/accounts/c1/ledger?{q}")
            assert status == 400 and body["error"]["code"] in (
                "invalid_limit", "invalid_cursor"), (q, status, body)
        for cursor in ("0", "0-0"):  # nothing comes before the first id
            status, body = await eng.api("GET", f"/v1/accounts/c1/ledger?before={cursor}")
            assert (status, body) == (200, {"entries": [], "next_before": None})
        bad = b'{"amount":"1.00","note":"\xff"}'
        status, body = await eng.api("POST", "/v1/accounts/c1/credits", data=bad,
                                     headers={"Content-Type": "application/json",
                                              "Idempotency-Key": "utf-1"})
        assert status == 400 and body["error"]["code"] == "invalid_body"
        status, body = await eng.api("POST", "/v1/leads/000000000000000000000000/returns",
                                     data=b'{"buyer":"\xff","reason":"wrong_number"}',
                                     headers={"Content-Type": "application/json"})
        assert status == 400
        assert await redis.dbsize() == before


async def test_a_credit_past_the_balance_limit_is_refused(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        opening = await eng.balance("c1")
        big = {"amount": "1000000000.00"}  # the largest amount: $1e9
        status, body = await eng.api("POST", "/v1/accounts/c1/credits", json=big,
                                     headers={"Idempotency-Key": "big-1"})
        assert status == 409 and body["error"]["code"] == "balance_limit"
        assert await eng.balance("c1") == opening
        await eng.assert_reconciled()


async def test_batch_content_type_line_ends_and_line_size(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        line = msgspec.json.encode({**LEAD, "email": "png@example.com"})
        status, body = await eng.post(raw=line, path="/v1/leads/batch",
                                      headers={"Content-Type": "image/png"})
        assert status == 415 and body["code"] == 1031
        assert await eng.balance("c1") == 100_000_000  # nothing sold
        # U+2028 is legal inside a JSON string: not a line end (str.splitlines() split it)
        a = msgspec.json.encode({**LEAD, "email": "sep@example.com", "lp_subid1": "a\u2028b"})
        b = msgspec.json.encode({**LEAD, "email": "next@example.com"})
        huge = msgspec.json.encode({**LEAD, "email": "big@example.com", "pad": "x" * 70_000})
        status, lines = await eng.post(raw=a + b"\r\n" + huge + b"\n\n" + b + b"\n",
                                       path="/v1/leads/batch",
                                       headers={"Content-Type": "application/x-ndjson"})
        assert status == 200
        assert [(x["status"], x["code"]) for x in lines] == [
            ("ACCEPTED", 0), ("ERROR", 1030), ("ACCEPTED", 0)]  # blank line: no result


async def test_lp_action_is_test_or_absent_and_subids_have_no_controls(
        redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.lead(email="sub@example.com", lp_subid1="a\x1b[31m")
        assert status == 422 and body["code"] == 1020
        assert body["errors"][0] == {"field": "lp_subid1", "code": "invalid_text",
                                     "message": "must not contain control characters"}
        for bad in ("live", "tset", 1, True, ["test"]):
            status, body = await eng.lead(email="act@example.com", lp_action=bad)
            assert status == 422 and body["errors"][0]["field"] == "lp_action", (bad, body)
        status, body = await eng.lead(email="act@example.com", lp_action="TEST")
        assert status == 200 and body["test"] is True
        assert await eng.balance("c1") == 100_000_000  # a test lead moves no money


async def test_a_form_with_too_many_fields_is_1003(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        body = "&".join(f"f{i}=x" for i in range(1001)).encode()
        status, resp = await eng.post(raw=body, headers={
            "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 400 and resp["code"] == 1003


async def test_a_batch_line_that_is_not_utf8_is_one_error_line(redis, redis_server, cfg):
    """One line with invalid UTF-8 refused the whole batch (400/1000): the lines around it
    were not decided although "a bad line is an ERROR line, the others go on"."""
    async with running(cfg, redis_server.url) as eng:
        a = msgspec.json.encode({**LEAD, "email": "before@example.com"})
        bad = b'{"lp_campaign_id":"camp","lp_supplier_id":"s1","lp_key":"key-s1",' \
              b'"email":"x\xff@example.com"}'
        b = msgspec.json.encode({**LEAD, "email": "after@example.com"})
        status, lines = await eng.post(raw=b"\n".join([a, bad, b"\xc3(", b]),
                                       path="/v1/leads/batch",
                                       headers={"Content-Type": "application/x-ndjson"})
        assert status == 200
        assert [(x["status"], x["code"]) for x in lines] == [
            ("ACCEPTED", 0), ("ERROR", 1000), ("ERROR", 1000), ("ACCEPTED", 0)]
        assert "UTF-8" in lines[1]["message"]
        assert await eng.balance("c1") == 80_000_000  # two leads sold at 10.00
        await eng.assert_reconciled()


@pytest.mark.parametrize("body", [b"", b"\n", b"\r\n \n\t\n"])
async def test_an_empty_batch_answers_an_empty_body(redis, redis_server, cfg, body):
    """No line, no result line: 200 with an empty body (it was a lone "\\n", which an NDJSON
    reader takes for one empty line)."""
    async with running(cfg, redis_server.url) as eng, eng.http.post(
            eng.url + "/v1/leads/batch", data=body,
            headers={"Content-Type": "application/x-ndjson"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        assert await r.read() == b""

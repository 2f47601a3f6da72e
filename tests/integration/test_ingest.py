"""POST /v1/leads end to end: real HTTP, real Lua, real redis-server."""

from __future__ import annotations

import msgspec
import pytest

from engine.core import keys
from engine.store.embedded import EmbeddedRedis
from tests.helpers.harness import buyer, campaign, make_config, running

EMAIL = "jane.doe@example.com"


@pytest.fixture
def cfg():  # one waterfall campaign, two buyers on two clients
    return make_config(
        campaign(extra='dedupe = { fields = ["email", "phone"], match = "any", days = 30 }'),
        buyer("b1", client="c1", price="25.00", priority=1),
        buyer("b2", client="c2", price="20.00", priority=2),
    )


async def test_accepted_lead_charges_buyer_and_wallet(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.lead(email=" Jane.Doe@Example.com ", phone="(415) 555-2671")
        assert status == 200 and body["status"] == "ACCEPTED" and body["code"] == 0
        assert body["payout"] == "3.00" and body["lead_id"]
        assert await eng.balance("c1") == 75_000_000
        assert await eng.balance("wallet") == 1000_000_000 - 100_000 - 200_000
        assert await eng.balance("c2") == 100_000_000
        jobs = await redis.xrange(keys.deliveries("t1"))
        assert len(jobs) == 1 and jobs[0][1][b"buyer"] == b"b1"
        assert jobs[0][1][b"supplier"] == b"s1"  # lp_supplier_id: the lead archive's column
        assert b'"email":"jane.doe@example.com"' in jobs[0][1][b"lead"]
        await eng.assert_reconciled()


async def test_form_encoded_post(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.post(
            raw=f"lp_campaign_id=camp&lp_supplier_id=s1&lp_key=key-s1&email={EMAIL}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 200 and body["status"] == "ACCEPTED"


async def test_duplicate_only_counts_sold_leads(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        await eng.api("POST", "/v1/buyers/b1/pause")
        await eng.api("POST", "/v1/buyers/b2/pause")
        _, first = await eng.lead(email=EMAIL)
        assert first["status"] == "REJECTED"
        await eng.api("POST", "/v1/buyers/b1/resume")
        _, sold = await eng.lead(email=EMAIL, phone="4155552671")
        assert sold["status"] == "ACCEPTED"
        _, dup = await eng.lead(email="other@example.com", phone="415-555-2671")
        assert dup["status"] == "DUPLICATED" and dup["code"] == 100
        assert await eng.balance("c1") == 75_000_000  # charged once


async def test_replay_within_window_returns_first_result(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        _, a = await eng.lead(email=EMAIL)
        _, b = await eng.lead(email=EMAIL)
        assert a == b  # the very same decision, not a DUPLICATED
        assert await eng.balance("c1") == 75_000_000


async def test_idempotency_key_header(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        body = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}
        h = {"Idempotency-Key": "abc-1"}
        _, a = await eng.post({**body, "email": EMAIL}, headers=h)
        _, b = await eng.post({**body, "email": "changed@example.com"}, headers=h)
        assert a == b and a["status"] == "ACCEPTED"
        assert await eng.balance("c1") == 75_000_000


async def test_payload_replay_and_idempotency_key_hold_together(redis, redis_server, cfg):
    """A key switched the 60 s payload rule off: the same lead posted with a key and then
    without it (or with another key) was sold and charged twice."""
    async with running(cfg, redis_server.url) as eng:
        body = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}
        _, a = await eng.post({**body, "email": EMAIL}, headers={"Idempotency-Key": "k-1"})
        _, b = await eng.post({**body, "email": EMAIL})
        _, c = await eng.post({**body, "email": EMAIL}, headers={"Idempotency-Key": "k-2"})
        assert a == b == c and a["status"] == "ACCEPTED"
        # and the other way round: first without a key, then with one
        _, d = await eng.post({**body, "email": "second@example.com"})
        _, e = await eng.post({**body, "email": "second@example.com"},
                              headers={"Idempotency-Key": "k-3"})
        assert d == e and d["status"] == "ACCEPTED" and d["lead_id"] != a["lead_id"]
        assert await eng.balance("c1") == 50_000_000  # two leads, charged once each
        # k-3 met the lead through its payload: it names that lead for its own 24 h, also
        # once the payload's 60 s record is gone (as if expired)
        for k in await eng.redis.keys("*idem:p:*"):
            await eng.redis.delete(k)
        _, f = await eng.post({**body, "email": "second@example.com"},
                              headers={"Idempotency-Key": "k-3"})
        assert f == d and await eng.balance("c1") == 50_000_000


async def test_batch_lines_are_remembered_by_content_not_position(redis, redis_server, cfg):
    """With an Idempotency-Key, batch line n used the key 'KEY:n': the same lead twice in a
    batch was sold twice, a retry of only the failed lines replayed other leads' results,
    and a single post with the key 'KEY:0' got line 0's result without being decided."""
    async with running(cfg, redis_server.url) as eng:
        creds = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}
        line_a = msgspec.json.encode({**creds, "email": "a@example.com"})
        line_b = msgspec.json.encode({**creds, "email": "b@example.com"})
        hdr = {"Idempotency-Key": "batch-1", "Content-Type": "application/x-ndjson"}
        _, first = await eng.post(raw=line_a + b"\n" + line_a + b"\n", headers=hdr,
                                  path="/v1/leads/batch")
        assert first[0] == first[1] and first[0]["status"] == "ACCEPTED"
        _, retry = await eng.post(raw=line_b + b"\n" + line_a + b"\n", headers=hdr,
                                  path="/v1/leads/batch")
        assert retry[1] == first[0] and retry[0]["lead_id"] != first[0]["lead_id"]
        _, single = await eng.post({**creds, "email": "c@example.com"},
                                   headers={"Idempotency-Key": "batch-1:0"})
        assert single["status"] == "ACCEPTED"
        assert single["lead_id"] not in {first[0]["lead_id"], retry[0]["lead_id"]}
        assert await eng.balance("c1") == 25_000_000  # a, b and c: three sales


async def test_test_mode_moves_no_money(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        _, a = await eng.lead(supplier="stest", key="key-test", email=EMAIL)
        _, b = await eng.lead(email="x@example.com", lp_action="test")
        for r in (a, b):
            assert r["status"] == "ACCEPTED" and r["test"] is True
        assert await eng.balance("c1") == 100_000_000
        assert await eng.balance("wallet") == 1000_000_000
        assert await redis.xlen(keys.deliveries("t1")) == 0
        _, real = await eng.lead(email=EMAIL)
        assert real["status"] == "ACCEPTED" and not real["test"]  # test leads are not dupes
        # ... but a test lead gets the full decision: a duplicate of a sold lead is one
        _, again = await eng.lead(email=EMAIL, lp_action="test", lp_subid1="t2")
        assert (again["status"], again["code"], again["test"]) == ("DUPLICATED", 100, True)


async def test_no_buyer_matched_is_rejected_with_reason(redis, redis_server):
    cfg = make_config(campaign(), buyer("b1", extra='filters = [{ field = "state", op = "states", values = ["CA"] }]'))
    async with running(cfg, redis_server.url) as eng:
        _, r = await eng.lead(email=EMAIL, state="TX")
        assert r["status"] == "REJECTED" and r["code"] == 200 and r["message"]
        _, ok = await eng.lead(email="b@example.com", state="ca")
        assert ok["status"] == "ACCEPTED"


def _line(**fields: str) -> bytes:
    """One NDJSON line: a lead of supplier s1 to campaign camp."""
    return msgspec.json.encode(
        {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1", **fields})


async def _post_batch(eng, lines: list[bytes]):
    return await eng.post(raw=b"\n".join(lines), path="/v1/leads/batch",
                          headers={"Content-Type": "application/x-ndjson"})


async def test_batch_ndjson_in_order(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        status, results = await _post_batch(eng, [
            _line(email="a@example.com"), b'{"broken json', _line(email="nope"),
            _line(email="a@example.com", phone="2125550123")])
        assert status == 200
        assert [r["status"] for r in results] == ["ACCEPTED", "ERROR", "ERROR", "DUPLICATED"]
        assert results[1]["code"] == 1000 and results[2]["code"] == 1020


BAD_INPUTS = [
    (b"{not json", "application/json", 400, 1000),
    (b"[1,2,3]", "application/json", 400, 1000),
    (b'{"lp_campaign_id":["camp"],"lp_supplier_id":"s1","lp_key":"key-s1"}', "application/json", 400, 1001),
    (b'{"lp_campaign_id":"nope","lp_supplier_id":"s1","lp_key":"key-s1"}', "application/json", 404, 1010),
    (b'{"lp_campaign_id":"camp","lp_supplier_id":"s1","lp_key":"wrong"}', "application/json", 401, 1011),
    (b'{"lp_campaign_id":"camp","lp_supplier_id":"ghost","lp_key":"x"}', "application/json", 401, 1011),
    (b'{"lp_campaign_id":"t2camp","lp_supplier_id":"s1","lp_key":"key-s1"}', "application/json", 404, 1010),
    (b'{"lp_campaign_id":"camp","lp_supplier_id":"s1","lp_key":"key-s1","email":5}', "application/json", 422, 1020),
    (b'{"lp_campaign_id":"camp","lp_supplier_id":"s1","lp_key":"key-s1","email":"\xff\xfe"}', "application/json", 400, 1000),
    (b"lp_campaign_id=camp&email=%ff", "application/x-www-form-urlencoded", 400, 1000),
    (b"<lead/>", "application/xml", 415, 1031),
    (b'{"lp_campaign_id":"camp","lp_supplier_id":"s1","lp_key":"key-s1","email":"a@example.com","lp_subid1":"' + b"x" * 76 + b'"}', "application/json", 422, 1020),
]


@pytest.mark.parametrize(("raw", "ctype", "status", "code"), BAD_INPUTS)
async def test_bad_input_is_refused_and_changes_nothing(redis, redis_server, cfg, raw, ctype, status, code):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        got, body = await eng.post(raw=raw, headers={"Content-Type": ctype})
        assert (got, body["status"], body["code"]) == (status, "ERROR", code)
        assert body["message"]
        assert await redis.dbsize() == before


async def test_oversized_and_too_many_fields(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        status, body = await eng.post(raw=b'{"a":"' + b"x" * 70_000 + b'"}',
                                      headers={"Content-Type": "application/json"})
        assert status == 413 and body["code"] == 1030
        creds = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1"}
        many = {**creds, **{f"f{i}": "x" for i in range(10_000)}}
        status, body = await eng.post(many)  # 10,000 fields: over the body limit
        assert status == 413 and body["code"] == 1030
        status, lines = await eng.post(raw=msgspec.json.encode(many), path="/v1/leads/batch")
        # a batch line has the single body's size limit: 413 inside the batch's 200
        assert status == 200 and lines[0]["code"] == 1030
        some = {**creds, **{f"f{i}": "x" for i in range(300)}}
        status, body = await eng.post(some)
        assert status == 400 and body["code"] == 1003
        assert await redis.dbsize() == before


async def test_redis_unreachable_is_503_and_nothing_charged(redis, redis_server, cfg, tmp_path):
    server = EmbeddedRedis(tmp_path / "r", persistent=False).start()
    async with running(cfg, server.url) as eng:
        server.stop()
        status, body = await eng.lead(email=EMAIL)
        assert status == 503 and body["code"] == 1040 and body["status"] == "ERROR"


async def test_batch_with_redis_unreachable_answers_each_line(redis, redis_server, cfg,
                                                              tmp_path):
    """A batch whose leads cannot be decided (Redis down) still answers one line per
    lead, in order: each valid lead its 503 ERROR (1040, retry), an invalid one its own
    refusal. The leads are decided together, so one failure must not lose the others."""
    server = EmbeddedRedis(tmp_path / "r", persistent=False).start()
    async with running(cfg, server.url) as eng:
        server.stop()
        status, results = await _post_batch(eng, [
            _line(email="a@example.com"), _line(email="nope"), _line(email="b@example.com")])
        assert status == 200
        assert [(r["status"], r["code"]) for r in results] == [
            ("ERROR", 1040), ("ERROR", 1020), ("ERROR", 1040)]


NUMERIC_IDS = """
[[suppliers]]
tenant = "t1"
id = "27633"
key = "12345"
"""


async def test_lp_ids_may_be_integers_the_key_only_text(redis, redis_server):
    """Lead Prosper's supplier specs type lp_campaign_id and lp_supplier_id Numeric (its
    sellers post {"lp_campaign_id": 13424}) and lp_key Text. An integer id reaches the
    config id of the same digits; the key must be a JSON string: a number (which used to
    be turned into text and accepted) is 400 / 1001, as a float or boolean id is."""
    cfg = make_config(campaign(id="13424"), buyer("b1", campaign="13424"), NUMERIC_IDS)
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        refused = [
            {"lp_campaign_id": 13424, "lp_supplier_id": 27633, "lp_key": 12345},
            {"lp_campaign_id": 13424.0, "lp_supplier_id": 27633, "lp_key": "12345"},
            {"lp_campaign_id": 13424, "lp_supplier_id": True, "lp_key": "12345"},
            {"lp_campaign_id": 13424, "lp_supplier_id": 27633, "lp_key": None},
        ]
        for creds in refused:
            status, body = await eng.post({**creds, "email": "n@example.com"})
            assert (status, body["code"]) == (400, 1001), (creds, body)
            assert "lp_key (text)" in body["message"]
        assert await redis.dbsize() == before
        status, body = await eng.post({"lp_campaign_id": 13424, "lp_supplier_id": 27633,
                                       "lp_key": "12345", "email": "n@example.com"})
        assert (status, body["status"]) == (200, "ACCEPTED"), body
        status, body = await eng.post({"lp_campaign_id": "13424", "lp_supplier_id": "27633",
                                       "lp_key": "12345", "email": "m@example.com"})
        assert (status, body["status"]) == (200, "ACCEPTED"), body
        # an integer that names no campaign is the usual 404, the id as posted
        status, body = await eng.post({"lp_campaign_id": 1, "lp_supplier_id": 27633,
                                       "lp_key": "12345", "email": "o@example.com"})
        assert (status, body["code"], body["message"]) == (404, 1010, "unknown campaign '1'")
        await eng.assert_reconciled()

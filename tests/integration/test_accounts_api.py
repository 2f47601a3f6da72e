"""The tenant API: auth, isolation, ledger paging, manual credits, pause/resume."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.core import keys
from tests.helpers.harness import buyer, campaign, make_config, running


@pytest.fixture
def cfg():
    return make_config(campaign(), buyer("b1", price="10.00"))


async def test_account_view_and_tenant_isolation(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.api("GET", "/v1/accounts/c1")
        assert status == 200 and body["balance"] == "100.00" and body["floor"] == "-20.00"
        assert body["status"] == "active" and body["thresholds"]["alert"] == "20.00"
        # t2's token cannot see t1's accounts, and no token sees nothing
        assert (await eng.api("GET", "/v1/accounts/c1", token="tok-t2"))[0] == 404
        assert (await eng.api("GET", "/v1/accounts/c1", token="wrong"))[0] == 401
        async with eng.http.get(eng.url + "/v1/accounts/c1") as r:
            assert r.status == 401
        assert (await eng.api("GET", "/v1/accounts/other", token="tok-t2"))[0] == 200
        assert (await eng.api("POST", "/v1/buyers/b1/pause", token="tok-t2"))[0] == 404


async def test_ledger_is_paged_newest_first(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        for i in range(5):
            await eng.lead(email=f"l{i}@example.com")
        status, page = await eng.api("GET", "/v1/accounts/c1/ledger?limit=2")
        assert status == 200 and len(page["entries"]) == 2
        assert page["entries"][0]["balance_after"] == "50.00"
        assert page["entries"][0]["kind"] == "lead" and page["entries"][0]["lead_id"]
        seen = [e["id"] for e in page["entries"]]
        while page["next_before"]:
            _, page = await eng.api("GET", f"/v1/accounts/c1/ledger?limit=2&before={page['next_before']}")
            seen += [e["id"] for e in page["entries"]]
        assert len(seen) == 6 and seen == sorted(seen, reverse=True)  # 5 leads + opening
        assert (await eng.api("GET", "/v1/accounts/c1/ledger?before=junk"))[0] == 400
        # a cursor Redis takes but SQL cannot hold (seq 2^63): 400, it used to be a 500
        # once the page went on into the archive
        status, body = await eng.api("GET", "/v1/accounts/c1/ledger?before=1-9999999999999999999")
        assert status == 400 and body["error"]["code"] == "invalid_cursor", body


async def test_ledger_limit_is_1_to_1000_as_documented(redis, redis_server, cfg):
    """README: `limit` 1-1000 (as /transactions); the code refused anything above 500."""
    async with running(cfg, redis_server.url) as eng:
        for i in range(3):
            await eng.lead(email=f"m{i}@example.com")
        for limit in ("1000", "501", "1"):
            status, page = await eng.api("GET", f"/v1/accounts/c1/ledger?limit={limit}")
            assert status == 200, page
            assert len(page["entries"]) == min(int(limit), 4)
        for limit in ("1001", "0", "-1", "x"):  # refused, never clamped
            status, body = await eng.api("GET", f"/v1/accounts/c1/ledger?limit={limit}")
            assert status == 400 and body["error"]["code"] == "invalid_limit", body
            assert "1 to 1000" in body["error"]["message"]


@pytest.mark.parametrize("body", [
    {"amount": 10}, {"amount": "1e3"}, {"amount": "-5.00"}, {"amount": "0"},
    {"amount": "10.0000001"}, {"amount": "10.00", "surprise": 1}, "not an object",
])
async def test_bad_credit_is_refused_and_changes_nothing(redis, redis_server, cfg, body):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize(), await eng.balance("c1")
        status, resp = await eng.api("POST", "/v1/accounts/c1/credits", json=body,
                                     headers={"Idempotency-Key": "bad-1"})
        assert status == 400 and resp["error"]["code"] and resp["error"]["message"]
        assert (await redis.dbsize(), await eng.balance("c1")) == before


async def test_credit_is_idempotent_with_key(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        h = {"Idempotency-Key": "wire-778"}
        s1, a = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "40.00"}, headers=h)
        s2, b = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "40.00"}, headers=h)
        assert (s1, s2) == (201, 200) and a["balance"] == b["balance"] == "140.00" and b["replay"]
        assert (await eng.api("POST", "/v1/accounts/nope/credits", json={"amount": "1.00"},
                              headers=h))[0] == 404
        # no key: refused, nothing credited (a blind retry would credit twice)
        for headers in ({}, {"Idempotency-Key": "k" * 256}):
            status, resp = await eng.api("POST", "/v1/accounts/c1/credits",
                                         json={"amount": "1.00"}, headers=headers)
            assert status == 400 and resp["error"]["code"] == "missing_idempotency_key"
        assert await eng.balance("c1") == 140_000_000


async def test_credit_key_reused_with_another_amount_is_a_conflict(redis, redis_server, cfg):
    """The same Idempotency-Key with another amount (99.00 after 10.00) is refused as /funds
    refuses it (400 idempotency_conflict), nothing moved; it silently returned the first
    result. The same key with the same amount is still a replay."""
    async with running(cfg, redis_server.url) as eng:
        h = {"Idempotency-Key": "same"}
        status, first = await eng.api("POST", "/v1/accounts/c1/credits",
                                      json={"amount": "10.00"}, headers=h)
        assert status == 201 and first["balance"] == "110.00"
        before = await _money_state(eng, redis, "c1")
        for amount in ("99.00", "10.000001", "9.99"):
            status, body = await eng.api("POST", "/v1/accounts/c1/credits",
                                         json={"amount": amount}, headers=h)
            assert status == 400 and body["error"]["code"] == "idempotency_conflict", body
            assert "10.00" in body["error"]["message"]
            assert await _money_state(eng, redis, "c1") == before
        status, again = await eng.api("POST", "/v1/accounts/c1/credits",
                                      json={"amount": "10.0"}, headers=h)  # same amount
        assert status == 200 and again["replay"] and again["entry"] == first["entry"]
        # the key is per account: c2 may use it for its own credit
        status, _ = await eng.api("POST", "/v1/accounts/c2/credits",
                                  json={"amount": "99.00"}, headers=h)
        assert status == 201 and await eng.balance("c2") == 199_000_000
        assert await eng.balance("c1") == 110_000_000


async def test_a_credit_body_must_be_json_as_on_the_billing_endpoints(redis, redis_server, cfg):
    """/credits read any body as JSON whatever its Content-Type (text/xml got 201); the
    billing endpoints (/funds, /auto-recharge, /usage) refuse anything but JSON with 400
    unsupported_media_type, and so does /credits now (the same helper), nothing moved."""
    async with running(cfg, redis_server.url) as eng:
        before = await _money_state(eng, redis, "c1")
        body = b'{"amount": "5.00"}'
        for ctype in ("text/xml", "application/x-www-form-urlencoded", "text/plain"):
            for path in ("/v1/accounts/c1/credits", "/v1/accounts/c1/funds"):
                status, resp = await eng.api("POST", path, data=body, headers={
                    "Content-Type": ctype, "Idempotency-Key": f"ct-{ctype}"})
                assert (status, resp["error"]["code"]) == (400, "unsupported_media_type"), (
                    path, ctype, resp)
        assert await _money_state(eng, redis, "c1") == before
        status, resp = await eng.api("POST", "/v1/accounts/c1/credits", data=body, headers={
            "Content-Type": "application/json; charset=utf-8", "Idempotency-Key": "ct-ok"})
        assert status == 201 and resp["balance"] == "105.00"
        await eng.assert_reconciled()


async def test_unknown_routes(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        assert (await eng.api("GET", "/v1/nothing"))[0] == 404
        assert (await eng.api("DELETE", "/v1/accounts/c1"))[0] == 405
        async with eng.http.get(eng.url + "/v1/leads") as r:
            assert r.status == 405
        async with eng.http.get(eng.url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"


async def test_reload_under_load_drops_and_double_charges_nothing(redis, redis_server, tmp_path):
    from tests.helpers.harness import BASE_TOML

    path = tmp_path / "cfg.toml"
    path.write_text(BASE_TOML + campaign() + buyer("b1", price="1.00"))
    cfg = make_config(campaign(), buyer("b1", price="1.00"))
    cfg.source = str(path)
    async with running(cfg, redis_server.url) as eng:
        path.write_text(BASE_TOML + campaign() + buyer("b1", price="2.00"))
        leads = [eng.lead(email=f"r{i}@example.com") for i in range(60)]
        results = await asyncio.gather(*leads, eng.svc.reload())
        statuses = [r[1]["status"] for r in results[:-1]]
        assert statuses == ["ACCEPTED"] * 60
        spent = 100_000_000 - await eng.balance("c1")
        assert 60_000_000 <= spent <= 120_000_000  # each lead at the old or the new price
        _, _r = await eng.lead(email="after@example.com")
        assert 100_000_000 - await eng.balance("c1") == spent + 2_000_000
        await eng.assert_reconciled()


async def test_returns_within_five_days_for_approved_reasons(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        _, lead = await eng.lead(email="r@example.com")
        path = f"/v1/leads/{lead['lead_id']}/returns"
        status, body = await eng.api("POST", path, json={"buyer": "b1", "reason": "not_interested"})
        assert status == 422 and body["error"]["code"] == "reason_not_accepted"
        assert await eng.balance("c1") == 90_000_000
        status, body = await eng.api("POST", path, json={"buyer": "b1", "reason": "wrong_number"})
        assert status == 200 and body["refunded"] == "10.00" and body["state"] == "refunded"
        assert await eng.balance("c1") == 100_000_000
        status, again = await eng.api("POST", path, json={"buyer": "b1", "reason": "wrong_number"})
        assert status == 200 and again["replay"] and await eng.balance("c1") == 100_000_000
        old = "000000000001" + lead["lead_id"][12:]  # decided in 1970: window closed
        status, body = await eng.api("POST", f"/v1/leads/{old}/returns",
                                     json={"buyer": "b1", "reason": "wrong_number"})
        assert status == 404 and body["error"]["code"] == "unknown_sale"  # never sold
        sale = await redis.hget(keys.lead("t1", lead["lead_id"]), "b1")
        await redis.hset(keys.lead("t1", old), "b1", sale)  # a real sale, that old
        status, body = await eng.api("POST", f"/v1/leads/{old}/returns",
                                     json={"buyer": "b1", "reason": "wrong_number"})
        assert status == 409 and body["error"]["code"] == "return_window_closed"
        status, _ = await eng.api("POST", "/v1/leads/nope/returns", json={"buyer": "b1", "reason": "wrong_number"})
        assert status == 404
        entries = (await eng.api("GET", "/v1/accounts/c1/ledger"))[1]["entries"]
        assert entries[0]["kind"] == "return"
        await eng.assert_reconciled()


async def test_a_return_must_be_json_as_every_billing_body(redis, redis_server, cfg):
    """POST /returns took any Content-Type (a form post was read as JSON) while /credits
    and the billing endpoints answer 400 unsupported_media_type: now it does too, and
    moves nothing."""
    async with running(cfg, redis_server.url) as eng:
        _, lead = await eng.lead(email="form@example.com")
        path = f"/v1/leads/{lead['lead_id']}/returns"
        body = b'{"buyer": "b1", "reason": "wrong_number"}'
        before = await eng.balance("c1")
        for ctype in ("application/x-www-form-urlencoded", "text/plain"):
            status, err = await eng.api("POST", path, data=body,
                                        headers={"Content-Type": ctype})
            assert status == 400 and err["error"]["code"] == "unsupported_media_type", err
        status, err = await eng.api("POST", path, data=b"{nope",
                                    headers={"Content-Type": "application/json"})
        assert status == 400 and err["error"]["code"] == "invalid_body", err
        assert await eng.balance("c1") == before
        status, ok = await eng.api("POST", path, data=body,
                                   headers={"Content-Type": "application/json"})
        assert status == 200 and ok["state"] == "refunded", ok


async def test_readyz_reports_a_dead_worker(redis, redis_server, cfg, tmp_path):
    async def broken(svc, stop):
        raise RuntimeError("worker bug")

    from engine.run.service import Service

    svc = Service(cfg, redis_url=redis_server.url, host="127.0.0.1", port=0, workers=[broken],
                  state_dir=str(tmp_path))
    await svc.start()
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # the worker task fails on its first step
                async with http.get(svc.url + "/readyz") as r:
                    body = await r.json()
                if body["checks"]["failed_workers"]:
                    break
            assert r.status == 503 and body["checks"]["failed_workers"] == ["broken"]
    finally:
        await svc.stop()


async def test_one_http_client_session_per_process(redis, redis_server, cfg, monkeypatch,
                                                   tmp_path):
    """Sync-mode deliveries and the in-process delivery worker share the service's one
    aiohttp session (one connection pool with its limits); stop closes it once."""
    from engine.delivery import worker as worker_module
    from engine.run.service import Service
    from engine.run.workers import delivery_worker

    seen: list[object] = []
    real = worker_module.DeliveryWorker.start

    async def spy(self: worker_module.DeliveryWorker) -> None:
        await real(self)
        seen.append(self.session)

    svc = Service(cfg, redis_url=redis_server.url, host="127.0.0.1", port=0,
                  workers=[delivery_worker], state_dir=str(tmp_path))
    monkeypatch.setattr(worker_module.DeliveryWorker, "start", spy)
    try:
        await svc.start()
        session = svc.http
        assert session is not None and svc.sync is not None
        await svc.sync.start()  # as a sync lead would: must not open a second session
        assert svc.sync._session is session
        for _ in range(200):  # the worker task starts on the loop's next turns
            if seen:
                break
            await asyncio.sleep(0.005)
        assert seen == [session]
        # the worker's lanes (64 per endpoint) leave sync tries a reserve of connections
        assert session.connector is not None
        assert (session.connector.limit, session.connector.limit_per_host) == (544, 96)
    finally:
        await svc.stop()
    assert session.closed and svc.http is None


async def test_archived_history_is_served_by_the_transactions_api(redis, redis_server, cfg,
                                                                   tmp_path):
    """With the ledger worker archiving (as in `leadflow run`), entries leave the Redis
    ledger for SQL; the transactions API reads them there (it used to answer 503)."""
    import aiohttp

    from engine.run.service import Service
    from engine.run.workers import ledger_worker

    svc = Service(cfg, redis_url=redis_server.url, host="127.0.0.1", port=0,
                  workers=[ledger_worker], state_dir=str(tmp_path))
    await svc.start()
    try:
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": "Bearer tok-t1"}
            body = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1",
                    "email": "arch@example.com"}
            async with http.post(svc.url + "/v1/leads", json=body) as r:
                lead_id = (await r.json())["lead_id"]
            url = svc.url + "/v1/accounts/c1/transactions"
            for _ in range(500):  # the worker archives within its idle period
                async with http.get(url, headers=auth) as r:
                    page = await r.json()
                assert r.status == 200, page
                if any(lead_id in (e.get("ref"), e.get("lead_id")) for e in page["data"]):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"lead {lead_id} never reached the archive: {page}")
    finally:
        await svc.stop()


ZERO_CLIENT = """
[[clients]]
tenant = "t1"
id = "zero"
opening_balance = "0.00"
"""


async def _closed_zero(eng) -> None:
    """refund-balance on an account at $0.00 and no card: nothing to refund, it closes."""
    status, body = await eng.api("POST", "/v1/accounts/zero/refund-balance")
    assert status == 200 and body["closed"], body


async def _money_state(eng, redis, account: str) -> tuple[object, ...]:
    state = await eng.store.account("t1", account)
    assert state is not None
    return (state.balance, state.closed, (await eng.store.ledger_sum("t1", account))[1],
            await redis.xlen(keys.ledger("t1")), await redis.xlen(keys.events("t1")))


async def test_credit_to_a_closed_account_is_refused_as_funds_is(redis, redis_server):
    """refund-balance refunded the account and closed it: a manual credit is refused with
    /funds' code (409 account_closed), nothing moved. It was 201 and the balance went up on
    the still-closed account. Also on the EVAL path after a SCRIPT FLUSH (adjust.lua)."""
    cfg = make_config(campaign(), buyer("b1", price="10.00"), ZERO_CLIENT)
    async with running(cfg, redis_server.url) as eng:
        await _closed_zero(eng)
        before = await _money_state(eng, redis, "zero")
        for flush in (False, True):
            if flush:
                await redis.script_flush()  # NOSCRIPT: the script is sent again
            status, body = await eng.api("POST", "/v1/accounts/zero/credits",
                                         json={"amount": "50.00"},
                                         headers={"Idempotency-Key": f"k-closed-{flush}"})
            assert status == 409 and body["error"]["code"] == "account_closed", body
            assert await _money_state(eng, redis, "zero") == before
        status, body = await eng.api("POST", "/v1/accounts/zero/funds",
                                     json={"amount": "100.00"},
                                     headers={"Idempotency-Key": "f-closed"})
        assert status == 409 and body["error"]["code"] == "account_closed"  # the same code
        _, view = await eng.api("GET", "/v1/accounts/zero")
        assert view["status"] == "closed" and view["balance"] == "0.00"
        # an open account is still credited, on the reloaded script too
        await redis.script_flush()
        status, body = await eng.api("POST", "/v1/accounts/c1/credits",
                                     json={"amount": "5.00"}, headers={"Idempotency-Key": "o"})
        assert status == 201 and body["balance"] == "105.00"
        await eng.assert_reconciled()


async def test_a_close_racing_a_credit_wins(redis, redis_server, monkeypatch):
    """The account closes after the credit handler looked it up and before the credit's
    script runs: the script itself refuses the closed account, so the credit cannot slip
    through onto it."""
    cfg = make_config(campaign(), buyer("b1", price="10.00"), ZERO_CLIENT)
    async with running(cfg, redis_server.url) as eng:
        real = eng.store.adjust
        closes: list[str] = []

        async def close_first(tenant, account, *args, **kw):
            if account == "zero" and not closes:  # the refund's close lands just now
                closes.append(account)
                await _closed_zero(eng)
            return await real(tenant, account, *args, **kw)

        monkeypatch.setattr(eng.store, "adjust", close_first)
        status, body = await eng.api("POST", "/v1/accounts/zero/credits",
                                     json={"amount": "50.00"}, headers={"Idempotency-Key": "r"})
        assert closes == ["zero"]
        assert status == 409 and body["error"]["code"] == "account_closed", body
        state = await eng.store.account("t1", "zero")
        assert state is not None and state.closed and state.balance == 0
        assert await eng.store.ledger_sum("t1", "zero") == (0, 0)  # no credit entry
        await eng.assert_reconciled()


async def _metric(eng, line_start: str) -> float:
    async with eng.http.get(eng.url + "/metrics") as r:
        text = await r.text()
    [line] = [ln for ln in text.splitlines() if ln.startswith(line_start + " ")]
    return float(line.split()[-1])


PAUSED_MANUAL = 'leadflow_buyers_paused_total{reason="manual"}'
PAUSED_EVENTS = 'leadflow_events_emitted_total{type="buyer_paused"}'
RESUMED_EVENTS = 'leadflow_events_emitted_total{type="buyer_resumed"}'


async def test_manual_pause_emits_buyer_paused_once_and_counts_it(redis, redis_server, cfg):
    """A manual pause emits one buyer_paused (as decide.lua's: account, balance, buyer,
    reason "manual") and counts leadflow_buyers_paused_total{reason="manual"}; pausing a
    paused buyer (even many requests at once) emits and counts nothing more. A resume
    emits one buyer_resumed. The pause emitted nothing and counted nothing."""
    async with running(cfg, redis_server.url) as eng:
        counts = [await _metric(eng, m) for m in (PAUSED_MANUAL, PAUSED_EVENTS, RESUMED_EVENTS)]
        results = await asyncio.gather(*(eng.api("POST", "/v1/buyers/b1/pause")
                                         for _ in range(8)))
        assert {(s, b["status"]) for s, b in results} == {(200, "paused")}
        events = await eng.events()
        assert [{k: v for k, v in e.items() if k != "ts"} for e in events] == [
            {"type": "buyer_paused", "account": "c1", "balance": "100000000", "buyer": "b1",
             "reason": "manual"}]
        assert await _metric(eng, PAUSED_MANUAL) == counts[0] + 1
        assert await _metric(eng, PAUSED_EVENTS) == counts[1] + 1
        _, lead = await eng.lead(email="p@example.com")
        assert lead["status"] == "REJECTED" and lead["code"] == 202  # paused: no sale
        await redis.script_flush()  # NOSCRIPT: the script is sent again
        for _ in range(2):
            status, body = await eng.api("POST", "/v1/buyers/b1/resume")
            assert status == 200 and body["status"] == "active"
        events = await eng.events()
        assert [e["type"] for e in events] == ["buyer_paused", "buyer_resumed"]
        assert events[1]["buyer"] == "b1" and events[1]["reason"] == "manual"
        assert await _metric(eng, RESUMED_EVENTS) == counts[2] + 1
        assert await _metric(eng, PAUSED_MANUAL) == counts[0] + 1
        _, lead = await eng.lead(email="q@example.com")
        assert lead["status"] == "ACCEPTED"
        # paused again: a new pause, a new event
        assert (await eng.api("POST", "/v1/buyers/b1/pause"))[0] == 200
        assert [e["type"] for e in await eng.events()][-1] == "buyer_paused"
        assert await _metric(eng, PAUSED_MANUAL) == counts[0] + 2


async def test_resume_says_when_the_buyers_account_is_paused(redis, redis_server, cfg):
    """/resume answered "active" for a buyer whose client account is paused at its floor
    (it gets no lead until funded): the answer now names the account's state too."""
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.api("POST", "/v1/buyers/b1/resume")
        assert status == 200 and body["account"] == {"id": "c1", "status": "active"}
        await redis.hset(keys.acct("t1", "c1"), "paused", "floor")  # as decide.lua pauses
        status, body = await eng.api("POST", "/v1/buyers/b1/resume")
        assert status == 200 and body["status"] == "active"
        assert body["account"] == {"id": "c1", "status": "paused", "paused_reason": "floor"}


async def test_resume_of_a_buyer_the_config_pauses_is_refused(redis, redis_server):
    """The config says status = "paused": routing skips the buyer before any flag is read,
    so /resume answered "active" while the next lead was REJECTED "no buyer matched". It is
    now 409 paused_by_config and changes nothing; a manual pause still works on top."""
    cfg = make_config(campaign(), buyer("b1", price="10.00", extra='status = "paused"'))
    async with running(cfg, redis_server.url) as eng:
        dbsize = await redis.dbsize()
        status, body = await eng.api("POST", "/v1/buyers/b1/resume")
        assert status == 409 and body["error"]["code"] == "paused_by_config", body
        assert 'status = "active"' in body["error"]["message"]
        assert await redis.dbsize() == dbsize and await eng.events() == []
        _, lead = await eng.lead(email="c@example.com")
        assert lead["status"] == "REJECTED"
        # a manual pause is its own hold: it outlives the config's status
        assert (await eng.api("POST", "/v1/buyers/b1/pause"))[0] == 200
        assert await redis.hget(keys.buyer("t1", "b1"), "paused") == b"manual"
        status, body = await eng.api("POST", "/v1/buyers/b1/resume")
        assert status == 409 and body["error"]["code"] == "paused_by_config"
        assert await redis.hget(keys.buyer("t1", "b1"), "paused") == b"manual"
        assert [e["type"] for e in await eng.events()] == ["buyer_paused"]


async def test_tenant_api_answers_503_when_redis_is_down(redis, redis_server, cfg, tmp_path):
    """Reads made with redis-py directly (account, ledger, payment methods, returns) used to
    answer a plain 500 when Redis was down; every tenant endpoint answers the documented
    503, as the lead endpoints do."""
    from engine.store.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "r", persistent=False).start()
    async with running(cfg, server.url) as eng:
        server.stop()
        lead_id = f"{int(time.time() * 1000):012x}" + "0" * 14  # a lead id of now
        calls = [
            ("GET", "/v1/accounts/c1", {}),
            ("GET", "/v1/accounts/c1/ledger", {}),
            ("GET", "/v1/accounts/c1/payment-methods", {}),
            ("POST", "/v1/accounts/c1/credits",
             {"json": {"amount": "5.00"}, "headers": {"Idempotency-Key": "k1"}}),
            ("POST", f"/v1/leads/{lead_id}/returns",
             {"json": {"buyer": "b1", "reason": "wrong_number"}}),
        ]
        for method, path, kw in calls:
            status, body = await eng.api(method, path, **kw)
            assert (status, body.get("error", {}).get("code", body.get("code"))) == (
                503, "unavailable"), (path, body)


async def test_events_of_balance_changes_outside_decide_are_counted(redis, redis_server, cfg):
    """adjust.lua's events (a usage debit crossing the alert, a credit resuming an account)
    reached the events stream but not leadflow_events_emitted_total: only decide.lua's were
    counted."""
    from engine.obs.metrics import METRICS

    def alerts() -> float:
        return METRICS.events_emitted("balance_alert")._value.get()  # type: ignore[no-any-return]

    async with running(cfg, redis_server.url) as eng:
        before = alerts()
        res = await eng.store.adjust("t1", "c1", -90_000_000, "usage", op_id="u-1")
        assert res.ok and "balance_alert" in res.events, res
        assert alerts() == before + 1
        await eng.store.adjust("t1", "c1", -90_000_000, "usage", op_id="u-1")  # a replay
        assert alerts() == before + 1


async def test_the_tenant_cannot_credit_its_own_platform_wallet(redis, redis_server, cfg):
    """The wallet is what the tenant owes the platform in fees: a manual credit with the
    tenant's own token was free money against them."""
    async with running(cfg, redis_server.url) as eng:
        before = await eng.balance("wallet")
        status, body = await eng.api("POST", "/v1/accounts/wallet/credits",
                                     json={"amount": "500.00"},
                                     headers={"Idempotency-Key": "free-money"})
        assert status == 403 and body["error"]["code"] == "wallet_not_creditable", body
        assert await eng.balance("wallet") == before
        assert (await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "5.00"},
                              headers={"Idempotency-Key": "c1-wire"}))[0] == 201


async def test_events_of_refunds_are_counted(redis, redis_server, cfg):
    """A refund that lifts an account's pause emits buyer_resumed from refund.lua; it
    reached the events stream but not leadflow_events_emitted_total."""
    from engine.obs.metrics import METRICS

    def resumed() -> float:
        return METRICS.events_emitted("buyer_resumed")._value.get()  # type: ignore[no-any-return]

    async with running(cfg, redis_server.url) as eng:
        _, lead = await eng.lead(email="refund-events@example.com")
        assert lead["status"] == "ACCEPTED", lead
        [sold] = [b for b in ("b1", "b2") if await redis.hexists(
            keys.lead("t1", lead["lead_id"]), b)]
        client = {"b1": "c1", "b2": "c2"}[sold]
        await redis.hset(keys.acct("t1", client), "paused", "floor")  # as decide.lua pauses
        before = resumed()
        res = await eng.store.refund_sale("t1", lead["lead_id"], sold, "rejected")
        assert res.ok and "buyer_resumed" in res.events, res
        assert resumed() == before + 1
        await eng.store.refund_sale("t1", lead["lead_id"], sold, "rejected")  # a replay
        assert resumed() == before + 1

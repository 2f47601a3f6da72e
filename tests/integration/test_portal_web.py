"""The browser portal over HTTP (no JavaScript): logins, sessions, CSRF, throttling, invites,
the access matrix of the pages. Real engine, real HTTP, SQLite in the state dir."""

from __future__ import annotations

import html
import re

import pytest

from engine.core import keys
from engine.identity import credentials
from tests.helpers.harness import make_config, running
from tests.helpers.portal import PASSWORD, Browserless, hidden, make_user, portal_config


@pytest.fixture
def cfg():
    return portal_config()


async def test_login_dashboard_logout(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        await make_user(eng, "buyer@example.com", ["c1"])
        web = Browserless(eng)
        try:
            page = await web.get("/portal/a/c1")
            assert page.url.endswith("/portal/login"), page.url
            page = await web.login("buyer@example.com")
            assert page.status == 200 and page.url.endswith("/portal/a/c1"), page.text
            assert 'id="balance">$30.00' in page.text
            assert "Your balance is below $50.00" in page.text
            csp = page.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            assert page.headers["x-content-type-options"] == "nosniff"
            assert page.headers["referrer-policy"] == "same-origin"
            token = web.session_cookie()
            assert token
            rows = await eng.app.identity._db.fetch("SELECT token_hash FROM portal_sessions", [])
            assert rows == [(credentials.digest(token),)]
            csrf = await web.csrf("/portal/a/c1")
            page = await web.post("/portal/logout", {"csrf": csrf})
            assert page.url.endswith("/portal/login?done=logout")
            assert await eng.app.identity._db.fetch("SELECT * FROM portal_sessions", []) == []
            # the old cookie replayed: no session
            page = await web.get("/portal/a/c1", cookies={"lf_session": token})
            assert page.url.endswith("/portal/login")
        finally:
            await web.close()


def _now(eng, start: int = 1_900_000_000_000) -> list[int]:
    """The identity store's clock (sessions, locks, the address throttle), moved by hand."""
    now = [start]
    eng.app.identity.clock = lambda: now[0]
    return now


async def test_csrf_a_form_without_its_token_changes_nothing(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        await make_user(eng, "buyer@example.com", ["c1"])
        web = Browserless(eng)
        try:
            await web.login("buyer@example.com")
            for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}):
                page = await web.post("/portal/a/c1/campaigns/b1/pause", data)
                assert page.status == 403 and "nothing was done" in page.text
                page = await web.post("/portal/keys", {**data, "name": "x"})
                assert page.status == 403
                page = await web.post("/portal/logout", data)
                assert page.status == 403
            assert await eng.redis.hget("t1:buyer:b1", "paused") is None
            assert await eng.app.identity.keys("t1", (await eng.app.identity.users("t1"))[0].id) == []
            assert (await web.get("/portal/a/c1")).url.endswith("/portal/a/c1")  # still in
            # the right token works; a token of another session does not
            other = Browserless(eng)
            await other.login("buyer@example.com")
            theirs = await other.csrf("/portal/a/c1/campaigns")
            await other.close()
            page = await web.post("/portal/a/c1/campaigns/b1/pause", {"csrf": theirs})
            assert page.status == 403
            page = await web.post("/portal/a/c1/campaigns/b1/pause",
                                  {"csrf": await web.csrf("/portal/a/c1/campaigns")})
            assert page.status == 200 and "Campaign b1 paused" in page.text
            # a post from another origin, even with the token
            page = await web.post("/portal/a/c1/campaigns/b1/resume",
                                  {"csrf": await web.csrf("/portal/a/c1/campaigns")},
                                  headers={"Origin": "https://evil.example"})
            assert page.status == 403
            # the login form's own token (double submit)
            page = await web.post("/portal/login", {"tenant": "t1", "email": "buyer@example.com",
                                                    "password": PASSWORD})
            assert page.status == 403
        finally:
            await web.close()


async def test_login_throttling(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        user_id = await make_user(eng, "buyer@example.com", ["c1"])
        now = _now(eng)
        web = Browserless(eng)
        try:
            for _ in range(cfg.settings.login_max_failures):
                page = await web.login("buyer@example.com", "wrong password, surely")
                assert page.status == 401 and "Wrong e-mail or password" in page.text
            # locked: the right password is refused too, with the same answer
            page = await web.login("buyer@example.com")
            assert page.status == 401 and web.session_cookie() is None
            rows = await eng.app.identity._db.fetch(
                "SELECT locked_until_ms FROM portal_users WHERE id = ?", [user_id])
            assert rows[0][0] == now[0] + cfg.settings.login_lock_minutes * 60_000
            assert next(r["action"] for r in await eng.app.identity.audit_rows("t1")) == \
                "login.locked"
            now[0] += cfg.settings.login_lock_minutes * 60_000 + 1
            page = await web.login("buyer@example.com")
            assert page.status == 200 and page.url.endswith("/portal/a/c1")

            # the address: 20 failures in 15 minutes (any users, the older ones have left the
            # window), then 429 for a while, whatever the password
            other = Browserless(eng)
            for i in range(20):
                page = await other.login(f"nobody{i}@example.com", "whatever it is")
                assert page.status == 401
            page = await other.login("buyer@example.com")
            assert page.status == 429 and int(page.headers["retry-after"]) > 0
            assert "Too many failed logins" in page.text
            now[0] += 15 * 60_000 + 1
            page = await other.login("buyer@example.com")
            assert page.status == 200
            await other.close()
        finally:
            await web.close()


async def test_invite_link_password_rules_and_reuse(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        status, made = await eng.api("POST", "/v1/portal/users",
                                     json={"email": "new@example.com", "accounts": ["c1"]})
        assert status == 201
        link = made["invite"]["invite_url"]
        web = Browserless(eng)
        try:
            page = await web.get(link)
            assert page.status == 200 and page.headers["referrer-policy"] == "no-referrer"

            async def send(password: str, confirm: str | None = None):
                form = await web.get(link)
                return await web.post(link, {
                    "login_token": hidden(form.text, "login_token"), "password": password,
                    "confirm": password if confirm is None else confirm})

            for weak, says in (("short", "at least 12"), ("x" * 257, "at most 256"),
                               ("new@example.com-is-mine", "e-mail address")):
                page = await send(weak)
                assert page.status == 400 and says in page.text, page.text
            page = await send(PASSWORD, "something else entirely")
            assert page.status == 400 and "differ" in page.text
            page = await send(PASSWORD)
            assert page.status == 200 and page.url.endswith("/portal/login?t=t1&done=password")
            assert "Your password is set" in page.text
            page = await send("another good password")
            assert page.status == 410 and "unknown, used or expired" in page.text
            fresh = Browserless(eng)
            assert (await fresh.login("new@example.com", "another good password")).status == 401
            await fresh.close()
            assert (await web.login("new@example.com")).url.endswith("/portal/a/c1")
        finally:
            await web.close()


async def test_session_expiry_idle_and_absolute(redis, redis_server, cfg, tmp_path):
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        await make_user(eng, "buyer@example.com", ["c1"])
        now = _now(eng)
        s = cfg.settings
        web = Browserless(eng)
        try:
            await web.login("buyer@example.com")
            now[0] += s.session_idle_minutes * 60_000 - 1
            assert (await web.get("/portal/a/c1")).url.endswith("/portal/a/c1")  # touched
            now[0] += s.session_idle_minutes * 60_000
            page = await web.get("/portal/a/c1")
            assert page.url.endswith("/portal/login")
            assert await eng.app.identity._db.fetch("SELECT * FROM portal_sessions", []) == []

            # active all along, it still ends session_hours after the login
            await web.login("buyer@example.com")
            end = now[0] + s.session_hours * 3_600_000
            while now[0] + 20 * 60_000 < end:
                now[0] += 20 * 60_000
                assert (await web.get("/portal/a/c1")).url.endswith("/portal/a/c1")
            now[0] = end
            assert (await web.get("/portal/a/c1")).url.endswith("/portal/login")

            # a disabled user's session ends at once
            await web.login("buyer@example.com")
            user_id = (await eng.app.identity.users("t1"))[0].id
            status, _ = await eng.api("PATCH", f"/v1/portal/users/{user_id}",
                                      json={"status": "disabled"})
            assert status == 200
            assert (await web.get("/portal/a/c1")).url.endswith("/portal/login")
        finally:
            await web.close()


GET_PAGES = ["", "/transactions", "/transactions.csv", "/campaigns", "/funds", "/card",
             "/returns", "/leads", "/leads.csv", "/leads/b1/0123456789abmatx", "/analytics"]
CSV_PAGES = ("/transactions.csv", "/leads.csv")


async def archive_sale(eng, lead_id: str = "0123456789abmatx", *, account: str = "c1",
                       buyer: str = "b1", price: int = 30_000_000, ts: int | None = None,
                       outcome: str = "accepted", returned: bool = False) -> None:
    """A sale in the lead archive, as the leads worker writes it (billing.leads)."""
    import time

    import msgspec

    arc = eng.svc.billing.leads
    ts = ts if ts is not None else int(time.time() * 1000)
    await arc._db.insert(arc._upsert_sql, [(
        "t1", lead_id, buyer, ts, "camp", "s1", account, price, 500_000,
        msgspec.json.encode({"state": "CA"}).decode(),
        msgspec.json.encode({"email": "lead@example.com"}).decode(), 1)])
    p = arc._db.ph
    await arc._db.fetch(f"UPDATE sold_leads SET outcome = {p}, returned_ts = {p}, "
                        f"return_reason = {p} WHERE lead_id = {p}",
                        [outcome, ts + 1 if returned else None,
                         "wrong_number" if returned else "", lead_id])
    await arc._db.insert(arc._attempts_sql, [
        ("t1", lead_id, buyer, ts, 1, "timeout", 0, 5000, "timeout; retry at 1", ""),
        ("t1", lead_id, buyer, ts + 9, 2, "accepted", 200, 41, "", '{"status":"ok"}')])


POSTS = {  # every form that changes something, with what a real one would send
    "/campaigns/b1/pause": {}, "/campaigns/b1/resume": {},
    "/funds/preview": {"amount": "100"},
    "/funds/pay": {"amount": "100.00", "key": "portal-matrix"},
    "/funds/auto-recharge": {"enabled": "on", "mode": "threshold", "threshold": "25",
                             "amount": "100"},
    "/funds/refund": {"confirm": "on"},
    "/funds/alert": {"threshold": "25"},
    "/funds/cards": {"setup_intent": "seti_x"},
    "/funds/cards/pm_x/remove": {}, "/funds/cards/pm_x/primary": {},
    "/returns": {"lead": "0123456789ab0000", "buyer": "b1", "reason": "wrong_number"},
}


async def _state(eng) -> tuple[dict[bytes, bytes], list[list[tuple]]]:
    """Every Redis key's DUMP, and the SQL tables an action could change."""
    redis_state = {k: await eng.redis.dump(k) for k in sorted(await eng.redis.keys("*"))}
    db = eng.app.identity._db
    tables = [await db.fetch(f"SELECT * FROM {t} ORDER BY 1", [])
              for t in ("api_keys", "portal_audit", "portal_users", "portal_user_accounts")]
    return redis_state, tables


async def test_access_matrix_of_the_pages(redis, redis_server, cfg, tmp_path, localstripe,
                                          monkeypatch):
    """The owner sees c1's pages; another user of the tenant, a user of another tenant,
    an expired session and no session get nothing, and none of their posts (each with a
    valid CSRF token of its own session) moves anything."""
    from bench.localstripe import API_KEY

    monkeypatch.setenv("LEADFLOW_STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("LEADFLOW_STRIPE_API_BASE", localstripe.url)
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        owner_id = await make_user(eng, "owner@example.com", ["c1"])
        await make_user(eng, "neighbour@example.com", ["c2"])
        await make_user(eng, "stranger@example.com", ["other"], tenant="t2")
        await make_user(eng, "late@example.com", ["c1"])
        owner_key, _ = await eng.app.identity.create_key("t1", owner_id, "mine")
        await archive_sale(eng)  # a lead c1 bought, for $30.00
        clients: dict[str, Browserless] = {}
        for name, email, tenant in (("owner", "owner@example.com", "t1"),
                                    ("neighbour", "neighbour@example.com", "t1"),
                                    ("stranger", "stranger@example.com", "t2"),
                                    ("expired", "late@example.com", "t1")):
            clients[name] = Browserless(eng)
            page = await clients[name].login(email, tenant=tenant)
            assert page.status == 200, page.text
        clients["anonymous"] = Browserless(eng)
        try:
            # their CSRF tokens, while each session is valid
            tokens = {n: await c.csrf("/portal/keys") for n, c in clients.items()
                      if n != "anonymous"}
            tokens["anonymous"] = ""
            expired = clients["expired"].session_cookie()
            await eng.app.identity._db.fetch(
                "UPDATE portal_sessions SET expires_ms = 0 WHERE token_hash = ? RETURNING 1",
                [credentials.digest(expired)])

            for path in GET_PAGES:
                page = await clients["owner"].get(f"/portal/a/c1{path}")
                assert page.status == 200, (path, page.text)
                assert "owner@example.com" in page.text or path in CSV_PAGES
                if path.startswith("/leads"):
                    assert "0123456789abmatx" in page.text and "30.00" in page.text, path
            before = await _state(eng)
            for name in ("neighbour", "stranger", "expired", "anonymous"):
                web = clients[name]
                for account in ("c1", "c2", "other", "wallet", "nope"):
                    if (name, account) in (("neighbour", "c2"), ("stranger", "other")):
                        continue  # their own
                    for path in GET_PAGES:
                        page = await web.get(f"/portal/a/{account}{path}")
                        if name in ("expired", "anonymous"):
                            assert page.url.endswith("/portal/login"), (name, path)
                        else:
                            assert page.status == 404, (name, account, path, page.status)
                        assert "$100.00" not in page.text and "$30.00" not in page.text
                    for path, data in POSTS.items():
                        page = await web.post(f"/portal/a/{account}{path}",
                                              {**data, "csrf": tokens[name]})
                        assert page.status in (404, 200), (name, path, page.status)
                        if page.status == 200:  # to the login page
                            assert page.url.endswith("/portal/login"), (name, path)
                page = await web.post(f"/portal/keys/{owner_key.id}/revoke",
                                      {"csrf": tokens[name]})
                assert page.status == 404 or page.url.endswith("/portal/login")
            assert await _state(eng) == before
            # and the owner's posts do move things (the matrix is not vacuous)
            page = await clients["owner"].post("/portal/a/c1/campaigns/b1/pause",
                                               {"csrf": tokens["owner"]})
            assert page.status == 200 and await _state(eng) != before
        finally:
            for c in clients.values():
                await c.close()


async def test_leads_list_filters_pages_detail_csv_and_analytics(redis, redis_server, cfg,
                                                               tmp_path):
    """The Leads page: only c1's sales, newest first, a page of 25, the time range in the
    tenant's days, a detail view, the CSV streamed; Analytics: leads and spend per day as
    SVG, the returns rate."""
    import datetime as dt

    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        await make_user(eng, "buyer@example.com", ["c1"])
        day = int(dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC).timestamp() * 1000)
        for i in range(30):  # 30 sales to c1 over 3 days, every tenth returned
            await archive_sale(eng, f"lead{i:04d}", price=10_000_000,
                               ts=day + (i // 10) * 86_400_000 + i, returned=i % 10 == 0)
        await archive_sale(eng, "theirs", account="c2", buyer="b2", price=77_000_000, ts=day)
        web = Browserless(eng)
        try:
            await web.login("buyer@example.com")
            page = await web.get("/portal/a/c1/leads")
            assert page.status == 200 and page.text.count('class="lead"') == 25
            assert '<td class="supplier">s1</td>' in page.text
            assert page.text.index("lead0029") < page.text.index("lead0028")
            assert "theirs" not in page.text and "77.00" not in page.text
            nxt = re.search(r'href="([^"]+)" id="next"', page.text)
            assert nxt is not None
            nxt = html.unescape(nxt.group(1))
            page = await web.get("/portal/a/c1/leads" + nxt)
            assert page.text.count('class="lead"') == 5 and "lead0000" in page.text
            page = await web.get("/portal/a/c1/leads?from=2026-03-11&to=2026-03-11")
            assert page.text.count('class="lead"') == 10 and "lead0015" in page.text
            page = await web.get("/portal/a/c1/leads?from=nope")
            assert page.status == 400
            page = await web.get("/portal/a/c1/leads/b1/lead0010")
            assert page.status == 200 and "wrong_number" in page.text
            attempts = page.text.split('id="attempts"', 1)[1].split("</table>", 1)[0]
            assert attempts.count("<tr>") == 3 and "timeout; retry at 1" in attempts
            assert "&#34;status&#34;:&#34;ok&#34;" in attempts  # escaped, not markup
            assert "lead@example.com" in page.text and "kept 30 days" in page.text
            assert '<td id="supplier">s1</td>' in page.text
            assert (await web.get("/portal/a/c1/leads/b2/theirs")).status == 404
            page = await web.get("/portal/a/c1/leads.csv?from=2026-03-10")
            rows = page.text.strip().split("\r\n")
            assert len(rows) == 31 and rows[0].startswith("lead_id,time_utc,campaign,buyer")
            assert ",camp,b1," in rows[1] and rows[1].endswith(",s1")
            assert "theirs" not in page.text
            page = await web.get("/portal/a/c1/analytics?from=2026-03-09&to=2026-03-13")
            assert page.status == 200
            assert 'id="total-leads">30<' in page.text
            assert 'id="total-spend">$270.00<' in page.text  # the 3 returned not spent
            assert 'id="returns-rate">10.0 %<' in page.text
            assert page.text.count('class="bar"') == 10  # 5 days, 2 charts
            assert "<script" not in page.text
        finally:
            await web.close()


async def test_balance_alert_form_in_manual_and_realtime_not_none(redis, redis_server,
                                                                   tmp_path):
    """The Funds page's balance alert: in billing modes realtime (c1) and manual (c3: the
    balance and the alert only, no card funding), not none (c4); CSRF as every form; a
    threshold under $1.00 refused, nothing changed; "use the default" puts the config's
    back."""
    from tests.helpers.portal import TOML

    base = TOML.format(stripe_js="https://js.stripe.com/v3/", c1_balance="30.00")
    cfg = make_config(base=base + '\n[[clients]]\ntenant = "t1"\nid = "c4"\n'
                                  'billing = "none"\n')
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        await make_user(eng, "buyer@example.com", ["c1", "c3", "c4"])
        web = Browserless(eng)
        try:
            await web.login("buyer@example.com")
            page = await web.get("/portal/a/c3/funds")
            assert page.status == 200 and 'id="alert-form"' in page.text
            assert 'id="add-funds"' not in page.text and 'id="cards"' not in page.text
            assert "(the default)" in page.text and 'href="/portal/a/c3/funds"' in page.text
            assert (await web.get("/portal/a/c3/card")).status == 404
            csrf = hidden(page.text, "csrf")
            before = await eng.redis.hgetall(keys.acct("t1", "c3"))
            assert before[b"alert"] == b"20000000"
            page = await web.post("/portal/a/c3/funds/alert", {"threshold": "45"})
            assert page.status == 403
            page = await web.post("/portal/a/c3/funds/alert", {"threshold": "0.50",
                                                               "csrf": csrf})
            assert page.status == 400 and "the minimum is $1.00" in page.text
            assert await eng.redis.hgetall(keys.acct("t1", "c3")) == before
            page = await web.post("/portal/a/c3/funds/alert", {"threshold": "$45.00",
                                                               "csrf": csrf})
            assert page.status == 200, page.text
            assert "drops under $45.00." in page.text and "(your own)" in page.text
            [e] = [e for e in await eng.events() if e["type"] == "balance_alert"]
            assert (e["account"], e["threshold"], e["balance"]) == ("c3", "45000000",
                                                                    "40000000")
            page = await web.post("/portal/a/c3/funds/alert", {"reset": "1", "csrf": csrf})
            assert "drops under $20.00 (the default)." in page.text
            # realtime: the alert beside the card funding
            page = await web.get("/portal/a/c1/funds")
            assert 'id="alert-form"' in page.text and 'id="add-funds"' in page.text
            # billing none: no Funds page, no alert
            page = await web.get("/portal/a/c4")
            assert page.status == 200 and "/portal/a/c4/funds" not in page.text
            assert (await web.get("/portal/a/c4/funds")).status == 404
            page = await web.post("/portal/a/c4/funds/alert", {"threshold": "45",
                                                               "csrf": csrf})
            assert page.status == 404
            assert await eng.redis.hget(keys.acct("t1", "c4"), "ualert") is None
        finally:
            await web.close()


async def test_the_operator_page_and_who_reaches_it(redis, redis_server, cfg, tmp_path):
    """An operator (a portal user with the operator role, made through the tenant API) logs
    in as any user and sees its tenant's clients with balance, available and status, and
    its users with their mappings. Buyers get the 404 of a page that does not exist;
    another tenant's operator sees its own tenant only; no session or an expired one goes
    to the login page. An operator reaches no account page and has no keys page."""
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        status, made = await eng.api("POST", "/v1/portal/users", json={
            "email": "ops@example.com", "role": "operator"})
        assert status == 201 and made["user"]["role"] == "operator", made
        token = made["invite"]["invite_token"]
        assert (await eng.api("POST", f"/v1/portal/invites/{token}",
                              json={"password": PASSWORD}))[0] == 200
        await make_user(eng, "buyer@example.com", ["c1", "c2"])
        await make_user(eng, "t2ops@example.com", [], tenant="t2", role="operator")
        ops, buyer, t2ops, nobody = (Browserless(eng) for _ in range(4))
        try:
            page = await ops.login("ops@example.com")
            assert page.status == 200 and page.url.endswith("/portal/operator"), page.url
            text = page.text
            assert 'id="client-c1"' in text and 'id="client-c3"' in text
            assert 'id="client-wallet"' in text and 'id="client-other"' not in text
            assert "$70.00" not in text  # t2's client
            assert "$30.00" in text and "$300.00" in text and "$1,000.00" in text
            assert "buyer@example.com" in text and "c1, c2" in text
            assert "ops@example.com" in text and "t2ops@example.com" not in text
            assert 'href="/portal/keys"' not in text
            for path in ("/portal/a/c1", "/portal/a/c1/funds", "/portal/keys"):
                assert (await ops.get(path)).status == 404, path
            before = await _state(eng)
            csrf = await ops.csrf("/portal/operator")
            for path in ("/portal/a/c1/campaigns/b1/pause", "/portal/keys",
                         "/portal/a/c1/funds/alert"):
                page = await ops.post(path, {"csrf": csrf, "threshold": "5", "name": "x"})
                assert page.status == 404, path
            assert await _state(eng) == before
            # a buyer: 404; another tenant's operator: its own tenant only
            await buyer.login("buyer@example.com")
            page = await buyer.get("/portal/operator")
            assert page.status == 404 and "buyer@example.com" not in page.text.split(
                "</header>")[-1]
            page = await t2ops.login("t2ops@example.com", tenant="t2")
            assert page.url.endswith("/portal/operator")
            assert 'id="client-other"' in page.text and "$70.00" in page.text
            assert 'id="client-c1"' not in page.text and "$30.00" not in page.text
            assert "buyer@example.com" not in page.text and ">ops@example.com<" not in page.text
            # no session; an ended one
            assert (await nobody.get("/portal/operator")).url.endswith("/portal/login")
            await ops.post("/portal/logout", {"csrf": csrf})
            assert (await ops.get("/portal/operator")).url.endswith("/portal/login")
        finally:
            for c in (ops, buyer, t2ops, nobody):
                await c.close()

"""The browser portal over HTTP (no JavaScript): logins, sessions, CSRF, throttling, invites,
the access matrix of the pages. Real engine, real HTTP, SQLite in the state dir."""

from __future__ import annotations

import pytest

from engine.identity import credentials
from tests.helpers.harness import running
from tests.helpers.portal import PASSWORD, Browserless, make_user, portal_config


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
            assert page.headers["referrer-policy"] == "no-referrer"
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

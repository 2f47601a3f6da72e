"""The portal in a real headless Chromium: a buyer logs in, sees its balance, filters and
exports transactions, pauses and resumes a campaign, adds a card through (localstripe's
fake) Stripe.js, adds $100 and is charged $103 at 3 %, sets auto-recharge and a balance
alert, returns a lead, manages an API key and logs out. Every page checked is saved as a
screenshot."""

from __future__ import annotations

import csv
import io

import aiohttp
import pytest
from selenium.webdriver.common.by import By

from engine.core import keys
from engine.run.workers import delivery_worker, leads_worker, ledger_worker
from tests.helpers.harness import running
from tests.helpers.portal import PASSWORD, make_user, portal_config

pytestmark = pytest.mark.browser


@pytest.fixture
def stripe_env(localstripe, monkeypatch):
    from bench.localstripe import API_KEY

    monkeypatch.setenv("LEADFLOW_STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("LEADFLOW_STRIPE_API_BASE", localstripe.url)
    return localstripe


async def login(browser, url: str, email: str, password: str = PASSWORD) -> None:
    await browser.get(url + "/portal/login?t=t1")
    await browser.type("#email", email)
    await browser.type("#password", password)
    await browser.submit_and_wait("#login")


async def test_buyer_flow(redis, redis_server, tmp_path, stripe_env, browser):
    cfg = portal_config(stripe_js=stripe_env.url + "/js.stripe.com/v3/")
    async with running(cfg, redis_server.url, state_dir=tmp_path,
                       workers=[ledger_worker]) as eng:
        user_id = await make_user(eng, "buyer@example.com", ["c1"])
        status, sold = await eng.lead(campaign="camp", email="lead@example.com")
        assert status == 200 and sold["status"] == "ACCEPTED", sold
        lead_id = sold["lead_id"]

        # log in: the dashboard of the one account, its balance after the $10 lead
        await login(browser, eng.url, "buyer@example.com")
        assert browser.url.endswith("/portal/a/c1")
        assert await browser.text("#balance") == "$20.00"
        assert "below $50.00" in await browser.text("#low-balance")
        assert await browser.text("#status") == "active"
        await browser.shot("dashboard")

        # transactions: the lead, once the archive has it; filter by type; CSV export
        await browser.get(eng.url + "/portal/a/c1/transactions")

        async def archived(text: str, selector: str = "#transactions") -> None:
            def shown(driver):
                if text in driver.find_element(By.CSS_SELECTOR, selector).text:
                    return True
                driver.refresh()
                return False

            await browser.wait(shown)

        await archived(lead_id)
        await browser.select("#type", "lead")
        await browser.submit_and_wait("#filter")
        assert "type=lead" in browser.url
        rows = await browser.run(lambda: browser.driver.find_elements(By.CSS_SELECTOR, "tr.tx"))
        assert len(rows) == 1 and "-$10.00" in await browser.run(lambda: rows[0].text)
        await browser.shot("transactions-filtered")
        href = await browser.run(lambda: browser.driver.find_element(
            By.CSS_SELECTOR, "#csv").get_attribute("href"))
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            jar.update_cookies({"lf_session": browser.cookie("lf_session")},
                               response_url=aiohttp.client.URL(eng.url + "/portal/"))
            async with http.get(href) as r:
                assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
                table = list(csv.DictReader(io.StringIO(await r.text())))
        assert [(t["type"], t["amount"], t["ref"]) for t in table] == [
            ("lead", "-10.00", lead_id)]

        # campaigns: pause and resume b1
        await browser.get(eng.url + "/portal/a/c1/campaigns")
        assert await browser.text("#buyer-b1 .status") == "active"
        await browser.submit_and_wait("#buyer-b1 button.toggle")
        assert await browser.text("#buyer-b1 .status") == "paused"
        assert "paused" in await browser.text("#message")
        await browser.shot("campaign-paused")
        await browser.submit_and_wait("#buyer-b1 button.toggle")
        assert await browser.text("#buyer-b1 .status") == "active"
        await browser.shot("campaign-resumed")

        # a card through the fake Stripe.js and a SetupIntent
        await browser.get(eng.url + "/portal/a/c1/funds")
        await browser.shot("funds-no-card")
        await browser.click("#add-card")
        await browser.css("#card-element input")
        for field, value in (("number", "4242424242424242"), ("exp_month", "12"),
                             ("exp_year", "34"), ("cvc", "123"), ("postal_code", "10001")):
            await browser.type(f"#card-element input[placeholder={field}]", value, clear=False)
        await browser.shot("card-entry")
        await browser.submit_and_wait("#save-card")
        assert "ending 4242 added" in await browser.text("#message")
        assert "primary" in await browser.text("#cards tr.pm .use")
        await browser.shot("card-added")

        # add funds: $100 at 3 % is $103, shown before paying
        await browser.type("#amount", "100")
        await browser.submit_and_wait("#preview")
        assert await browser.text("#confirm-total") == "$103.00"
        assert await browser.text("#confirm-fee") == "$3.00"
        await browser.shot("fund-confirm")
        await browser.submit_and_wait("#pay")
        assert "Charged $103.00" in await browser.text("#message")
        assert await browser.text("#balance") == "$120.00"
        await browser.shot("funded")
        customer = await eng.redis.hget(keys.pay("t1", "c1"), "customer") or b""
        intents = stripe_env.intents(customer=customer.decode())
        assert [(i.amount, i.status) for i in intents] == [(10300, "succeeded")]

        # auto-recharge: below $25, $100
        await browser.click("#ar-enabled")
        await browser.click("#ar-threshold")
        await browser.type("#threshold", "25.00")
        await browser.type("#ar-amount", "100.00")
        await browser.submit_and_wait("#save-auto-recharge")
        assert await browser.text("#message") == "Auto-recharge saved."
        await browser.get(eng.url + "/portal/a/c1")
        assert await browser.text("#auto-recharge") == \
            "On: $100.00 when the balance falls below $25.00"
        await browser.shot("dashboard-auto-recharge")

        # a balance alert of its own, above the balance ($120): balance_alert at once
        await browser.get(eng.url + "/portal/a/c1/funds")
        assert "(the default)" in await browser.text("#alert-now")
        await browser.type("#alert-threshold", "150.00")
        await browser.submit_and_wait("#save-alert")
        assert await browser.text("#message") == \
            "Balance alert saved: an e-mail when the balance drops under $150.00."
        assert "$150.00 (your own)" in await browser.text("#alert-now")
        await browser.shot("balance-alert")
        alerts = [e for e in await eng.events() if e["type"] == "balance_alert"]
        assert [(e["threshold"], e["balance"], e["ref"]) for e in alerts] == [
            ("150000000", "120000000", "api")]

        # return the lead
        await browser.get(eng.url + "/portal/a/c1/returns")
        await browser.type("#lead", lead_id)
        await browser.select("#return-buyer", "b1")
        await browser.select("#reason", "wrong_number")
        await browser.submit_and_wait("#return")
        assert "$10.00 credited" in await browser.text("#message")
        await archived(lead_id, "#past-returns")
        assert f"{user_id}/portal" in await browser.text("#past-returns")
        await browser.shot("returned")

        # an API key of its own, shown once
        await browser.get(eng.url + "/portal/keys")
        await browser.type("#key-name", "crm")
        await browser.submit_and_wait("#create-key")
        key = await browser.text("#new-key")
        assert key.startswith("lfk_")
        await browser.shot("key-created")
        assert (await eng.api("GET", "/v1/accounts/c1", token=key))[0] == 200

        # log out: the session is gone
        await browser.submit_and_wait("#logout")
        assert browser.url.endswith("/portal/login?done=logout")
        assert await browser.text("#message") == "You are logged out."
        await browser.shot("logged-out")
        await browser.get(eng.url + "/portal/a/c1")
        assert browser.url.endswith("/portal/login")


async def test_leads_and_analytics(redis, redis_server, tmp_path, browser):
    """A lead sold through the engine reaches the Leads page (delivery worker, then the lead
    archive), its detail view shows its fields and outcome, Analytics draws it."""
    cfg = portal_config()
    async with running(cfg, redis_server.url, state_dir=tmp_path,
                       workers=[delivery_worker, leads_worker]) as eng:
        await make_user(eng, "buyer@example.com", ["c1"])
        status, sold = await eng.lead(campaign="camp", email="lead@example.com")
        assert status == 200 and sold["status"] == "ACCEPTED", sold
        lead_id = sold["lead_id"]
        await login(browser, eng.url, "buyer@example.com")
        await browser.get(eng.url + "/portal/a/c1/leads")

        def delivered(driver):
            text = driver.find_element(By.CSS_SELECTOR, "#leads").text
            if lead_id in text and "accepted" in text:
                return True
            driver.refresh()
            return False

        await browser.wait(delivered)
        await browser.shot("leads")
        await browser.click(f"a[href$='/{lead_id}']")
        assert (await browser.text("#outcome")).startswith("accepted")
        assert await browser.text("#price") == "$10.00"
        assert "lead@example.com" in await browser.text("#fields")
        await browser.shot("lead-detail")
        await browser.get(eng.url + "/portal/a/c1/analytics")
        assert await browser.text("#total-leads") == "1"
        assert await browser.text("#total-spend") == "$10.00"
        assert await browser.text("#returns-rate") == "0.0 %"
        bars = await browser.run(lambda: browser.driver.find_elements(
            By.CSS_SELECTOR, "#leads-chart rect.bar"))
        assert len(bars) == 30
        await browser.shot("analytics")


async def test_operator_page(redis, redis_server, tmp_path, browser):
    """The tenant's operator (a portal user with the operator role) logs in and sees its
    clients with balance, available and status, and its users with their mappings."""
    cfg = portal_config()
    async with running(cfg, redis_server.url, state_dir=tmp_path) as eng:
        await make_user(eng, "buyer@example.com", ["c1", "c2"])
        await make_user(eng, "ops@example.com", [], role="operator")
        status, sold = await eng.lead(campaign="camp", email="lead@example.com")
        assert status == 200 and sold["status"] == "ACCEPTED", sold
        await login(browser, eng.url, "ops@example.com")
        assert browser.url.endswith("/portal/operator")
        assert await browser.text("#client-c1 .balance") == "$20.00"
        assert await browser.text("#client-c1 .available") == "$20.00"
        assert await browser.text("#client-c2 .status") == "active"
        assert "$1,000.00" in await browser.text("#client-wallet")
        users = await browser.text("#users")
        assert "buyer@example.com buyer active c1, c2" in users
        assert "ops@example.com operator active" in users
        await browser.shot("operator")
        await browser.get(eng.url + "/portal/a/c1")
        assert "no such page" in await browser.text("main")

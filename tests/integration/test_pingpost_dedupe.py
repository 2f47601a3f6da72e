"""The duplicate check at ping on hashed values (#17, docs/pingpost.md "Duplicates at
ping"): a seller sends ``<field>_md5`` / ``<field>_sha256`` of a dedupe field (e-mail
trimmed and lower-cased, phone as digits-only E.164, hex), and a ping whose hash matches a
sale's mark is answered DUPLICATED (100; buyer-scope: 101 when every matching buyer bought
it) before any buyer is asked, with nothing held or charged."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from engine.core.errors import ConfigError
from tests.helpers.buyers import Buyers
from tests.helpers.harness import buyer, campaign, make_config, running
from tests.integration.test_pingpost import (
    _fresh,
    fixed,
    held,
    ping,
    post,
)

LEAD = {"email": "  Ann@Example.COM ", "phone": "(415) 555-0123", "state": "CA"}
EMAIL_MD5 = hashlib.md5(b"ann@example.com").hexdigest()
PHONE_SHA256 = hashlib.sha256(b"14155550123").hexdigest()


def pp(dedupe: str, hashes: str = "") -> str:
    return campaign("pp", extra=f"dedupe = {{ {dedupe} }}\n"
                    f'ping_post = {{ ping_fields = ["state"]{hashes} }}')


async def direct(eng: Any, **over: Any) -> dict[str, Any]:
    status, d = await eng.post({"lp_campaign_id": "pp", "lp_supplier_id": "s1",
                                "lp_key": "key-s1", **LEAD, **over})
    assert status == 200, d
    return dict(d)


async def test_a_hashed_email_or_phone_of_a_sold_lead_is_a_duplicate(redis_server,
                                                                     buyers: Buyers):
    cfg = make_config(pp('fields = ["email", "phone"], match = "any"'),
                      fixed("fx", "10.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        _, r = await ping(eng, email_md5=EMAIL_MD5)
        assert r["status"] == "ACCEPTED"  # nothing sold yet
        await post(eng, r["ping_id"], **LEAD)  # sold through ping-post: marked
        wallet, c1 = await eng.balance("wallet"), await held(eng, "c1")
        status, r = await ping(eng, email_md5=EMAIL_MD5)
        assert (status, r["status"], r["code"]) == (200, "DUPLICATED", 100), r
        assert "ping_id" not in r and not r.get("bids")
        # the phone as digits-only E.164, hex in any case
        status, r = await ping(eng, phone_sha256=PHONE_SHA256.upper())
        assert (r["status"], r["code"]) == ("DUPLICATED", 100), r
        # nothing held or charged for a duplicate ping
        assert await eng.balance("wallet") == wallet and await held(eng, "c1") == c1
        # another person
        _, r = await ping(eng, email_md5=hashlib.md5(b"bob@example.com").hexdigest())
        assert r["status"] == "ACCEPTED"
        # a test ping gets the check too
        _, r = await ping(eng, email_md5=EMAIL_MD5, lp_action="test")
        assert (r["status"], r["code"], r["test"]) == ("DUPLICATED", 100, True)


async def test_a_direct_sale_is_checked_too_and_malformed_hashes_are_refused(redis_server,
                                                                            buyers: Buyers):
    cfg = make_config(pp('fields = ["email", "phone"], match = "any"'),
                      fixed("fx", "10.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        assert (await direct(eng))["status"] == "ACCEPTED"
        _, r = await ping(eng, email_sha256=hashlib.sha256(b"ann@example.com").hexdigest())
        assert (r["status"], r["code"]) == ("DUPLICATED", 100), r
        # the direct post's own dedupe is unchanged (another payload: not a replay)
        assert (await direct(eng, lp_subid1="again"))["code"] == 100
        status, r = await ping(eng, email_md5="not-a-hash", phone_sha256=EMAIL_MD5)
        assert (status, r["code"]) == (422, 1020)
        assert sorted(e["field"] for e in r["errors"]) == ["email_md5", "phone_sha256"]
        assert {e["code"] for e in r["errors"]} == {"invalid_hash"}


async def test_match_all_needs_every_field_hashed_with_one_algorithm(redis_server,
                                                                     buyers: Buyers):
    cfg = make_config(pp('fields = ["email", "phone"], match = "all"'),
                      fixed("fx", "10.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        await direct(eng)
        _, r = await ping(eng, email_md5=EMAIL_MD5)  # one of the two: no check
        assert r["status"] == "ACCEPTED"
        phone_md5 = hashlib.md5(b"14155550123").hexdigest()
        _, r = await ping(eng, email_md5=EMAIL_MD5, phone_md5=phone_md5)
        assert (r["status"], r["code"]) == ("DUPLICATED", 100), r
        _, r = await ping(eng, email_md5=EMAIL_MD5, phone_sha256=PHONE_SHA256)
        assert r["status"] == "ACCEPTED"  # two algorithms make no complete fingerprint


async def test_buyer_scope_leaves_out_the_buyers_that_bought_it(redis_server,
                                                               buyers: Buyers):
    cfg = make_config(pp('fields = ["email"], scope = "buyer"'),
                      fixed("fx", "10.00", client="c1"),
                      fixed("gx", "9.00", client="c2", priority=2))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        await direct(eng)  # sold to fx
        _, r = await ping(eng, email_md5=EMAIL_MD5)
        assert r["status"] == "ACCEPTED" and r["bids"][0]["price"] == "9.00"  # gx only
        assert await held(eng, "c1") == 0 and await held(eng, "c2") == 9_000_000
        d = await direct(eng, lp_subid1="again")  # another payload: not a replay
        assert d["status"] == "ACCEPTED"  # now gx bought it too
        _, r = await ping(eng, email_md5=EMAIL_MD5)
        assert (r["status"], r["code"]) == ("DUPLICATED", 101), r


async def test_no_hashes_configured_means_no_check(redis_server, buyers: Buyers):
    cfg = make_config(pp('fields = ["email"]', ", dedupe_hashes = []"), fixed("fx", "10.00"))
    async with running(cfg, redis_server.url) as eng:
        await _fresh(eng, cfg)
        await direct(eng)
        _, r = await ping(eng, email_md5=EMAIL_MD5)
        assert r["status"] == "ACCEPTED"


def test_an_unknown_hash_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(pp('fields = ["email"]', ', dedupe_hashes = ["sha1"]'),
                    buyer("b1", campaign="pp"))
    assert info.value.path.startswith("campaigns[1].ping_post.dedupe_hashes"), info.value

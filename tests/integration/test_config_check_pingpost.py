"""`config check` of the ping-post settings (#17, docs/pingpost.md): every bad value is a
ConfigError naming the path inside the file and the reason, and the good ones pass."""

from __future__ import annotations

import pytest

from engine.core.errors import ConfigError
from tests.helpers.harness import buyer, campaign, make_config

SECRET = "whsec_dGVzdHRlc3R0ZXN0dGVzdA=="
URL = "https://buyer.example/ping"
CAMP = "campaigns[1].ping_post"  # the harness's base config has one campaign before it


def pp(settings: str = "") -> str:
    return campaign("pp", extra="ping_post = { ping_fields = [\"state\"]"
                    + (", " + settings if settings else "") + " }")


def bidder(lines: str, campaign_id: str = "pp") -> str:
    return buyer("b1", campaign=campaign_id, extra="[buyers.ping]\n" + lines)


def refused(*parts: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(*parts)
    err = info.value
    assert (err.source, err.path) == ("<test>", path), str(err)
    assert reason in err.reason, str(err)


def test_good_ping_post_settings_pass() -> None:
    make_config(pp('ping_deadline_ms = 10000, ping_ttl_s = 3600, auction = "shared", '
                   'sell_limit = 1, margin = { percent = "99.99" }, min_bid = "0.00"'),
                bidder(f'url = "{URL}"\nsecret = "{SECRET}"\nbid_path = "bid"\n'
                       'timeout_ms = 30000\nheaders = { X-Key = "abc" }\n'
                       'margin = { fixed = "1.50" }\n'))
    make_config(pp(), bidder(""))  # a fixed-price bidder: no request


@pytest.mark.parametrize(("settings", "path", "reason"), [
    ('ping_fields = ["nope"]', "ping_fields[0]", "unknown field 'nope'"),
    ('ping_fields = ["state", "email"]', "ping_fields[1]", "'email' is personal data"),
    ('ping_fields = ["phone"]', "ping_fields[0]", "personal data"),
    ("ping_deadline_ms = 0", "ping_deadline_ms", "1 to 10000 ms"),
    ("ping_deadline_ms = 10001", "ping_deadline_ms", "1 to 10000 ms"),
    ("ping_ttl_s = 0", "ping_ttl_s", "1 to 3600 s"),
    ("ping_ttl_s = 3601", "ping_ttl_s", "1 to 3600 s"),
    ("sell_limit = 0", "sell_limit", "at least 1"),
    ('margin = { percent = "10", fixed = "1.00" }', "margin", "percent or fixed, not both"),
    ('margin = { percent = "100" }', "margin.percent", "0 to below 100"),
    ('margin = { percent = "ten" }', "margin.percent", ""),
    ('margin = { fixed = "-1.00" }', "margin.fixed", "must not be negative"),
    ('margin = { fixed = "1.5.0" }', "margin.fixed", ""),
    ('min_bid = "-0.01"', "min_bid", "must not be negative"),
    ('min_bid = "lots"', "min_bid", ""),
])
def test_bad_campaign_ping_post_settings(settings: str, path: str, reason: str) -> None:
    # ping_fields given twice would be a TOML error: the case replaces the default
    camp = (campaign("pp", extra="ping_post = { " + settings + " }")
            if settings.startswith("ping_fields") else pp(settings))
    refused(camp, bidder(""), path=f"{CAMP}.{path}", reason=reason)


@pytest.mark.parametrize(("lines", "path", "reason"), [
    ('bid_path = "bid"\n', "buyers[0].ping", "bid_path/bid_regex need a url"),
    (f'url = "{URL}"\nbid_path = "bid"\n', "buyers[0].ping.secret", "required"),
    (f'url = "ftp://x.example/"\nsecret = "{SECRET}"\nbid_path = "bid"\n',
     "buyers[0].ping.url", ""),
    (f'url = "{URL}"\nsecret = "{SECRET}"\nbid_path = "bid"\ntimeout_ms = 0\n',
     "buyers[0].ping.timeout_ms", "1 to 30000 ms"),
    (f'url = "{URL}"\nsecret = "{SECRET}"\nbid_path = "bid"\ntimeout_ms = 30001\n',
     "buyers[0].ping.timeout_ms", "1 to 30000 ms"),
    (f'url = "{URL}"\nsecret = "{SECRET}"\n', "buyers[0].ping",
     "bid_path or bid_regex (one of them)"),
    (f'url = "{URL}"\nsecret = "{SECRET}"\nbid_path = "bid"\nbid_regex = "(\\\\d+)"\n',
     "buyers[0].ping", "bid_path or bid_regex (one of them)"),
    (f'url = "{URL}"\nsecret = "{SECRET}"\nbid_regex = "(unclosed"\n', "buyers[0].ping",
     "bid_regex"),
    (f'url = "{URL}"\nsecret = "{SECRET}"\nbid_path = "bid"\nheaders = {{ "X A" = "1" }}\n',
     "buyers[0].ping.headers", "not a valid header name"),
    (f'url = "{URL}"\nsecret = "{SECRET}"\nbid_path = "bid"\n'
     'headers = { X-A = "a\\r\\nX-B: b" }\n', "buyers[0].ping.headers.X-A",
     "control characters"),
    ('margin = { percent = "150" }\n', "buyers[0].ping.margin.percent", "0 to below 100"),
])
def test_bad_buyer_ping_settings(lines: str, path: str, reason: str) -> None:
    refused(pp(), bidder(lines), path=path, reason=reason)


def test_a_ping_buyer_needs_a_ping_post_campaign() -> None:
    refused(campaign("plain"), bidder("", campaign_id="plain"), path="buyers[0].ping",
            reason="campaign 'plain' has no ping_post section")

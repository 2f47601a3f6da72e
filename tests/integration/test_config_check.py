"""`config check` refusals: every bad config is a ConfigError naming the file, the path
inside it and the reason (exit 2 from `leadflow config check`), never another exception."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from engine.core.errors import ConfigError
from engine.run import configfile
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config


def _refused(toml: str, path: str, reason: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        make_config(base=toml)
    err = info.value
    assert (err.source, err.path) == ("<test>", path), str(err)
    assert reason in err.reason, str(err)
    return err


# -- opening balance and floor ---------------------------------------------------------------

def test_a_client_cannot_open_below_its_floor() -> None:
    toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                             'id = "c1"\nopening_balance = "-500.00"')
    _refused(toml, "clients[0].opening_balance", "below the floor -20.00")


def test_the_wallet_cannot_open_below_its_floor() -> None:
    toml = BASE_TOML.replace('opening_balance = "1000.00"',
                             'opening_balance = "-100.00"')
    _refused(toml, "tenants[0].wallet.opening_balance", "below the floor -20.00")


def test_an_opening_balance_at_the_floor_or_of_a_none_account_is_accepted() -> None:
    make_config(base=BASE_TOML.replace('opening_balance = "100.00"',
                                       'opening_balance = "-20.00"'))
    # billing "none" has no floor (its debits are never refused; reconcile skips it)
    make_config(base=BASE_TOML.replace('opening_balance = "5.00"',
                                       'opening_balance = "-500.00"\nbilling = "none"'))
    _refused(BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                               'id = "c1"\nopening_balance = "-5.00"\nfloor = "0.00"'),
             "clients[0].opening_balance", "below the floor 0.00")


def test_the_harness_config_passes() -> None:
    make_config(campaign(), buyer("b1"))


# -- nothing but ConfigError -----------------------------------------------------------------

SECRET = "whsec_dGVzdHRlc3R0ZXN0dGVzdA=="


def _webhook(**kw: str) -> str:
    fields = {"url": '"http://127.0.0.1:9/"', "secret": f'"{SECRET}"', **kw}
    return "delivery = { " + ", ".join(f"{k} = {v}" for k, v in fields.items()) + " }"


def test_a_bad_ipv6_webhook_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(campaign(), buyer("b1", extra=_webhook(url='"http://[::1/leads"')))
    assert info.value.path == "buyers[0].delivery.url"
    assert "not an http(s) URL" in info.value.reason


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(b"\xff" + BASE_TOML.encode())
    with pytest.raises(ConfigError) as info:
        configfile.load(f)
    assert (info.value.source, info.value.path) == (str(f), "")
    assert "not valid UTF-8" in info.value.reason and "byte 0" in info.value.reason


def test_deeply_nested_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        configfile.loads(b"a = " + b"[" * 5000 + b"]" * 5000, source="deep.toml")
    assert (info.value.source, info.value.path) == ("deep.toml", "")
    assert "nested too deeply" in info.value.reason


def test_config_check_exits_2_with_file_path_and_reason(tmp_path: Path) -> None:
    """The command an operator runs: exit 2 and one line, no traceback (exit 1)."""
    cases = {
        "ipv6.toml": ((BASE_TOML + campaign() + buyer(
            "b1", extra=_webhook(url='"http://[::1"'))).encode(), "buyers[0].delivery.url"),
        "latin1.toml": (b"\xff" + BASE_TOML.encode(), "not valid UTF-8"),
        "deep.toml": (b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    }
    for name, (raw, expected) in cases.items():
        f = tmp_path / name
        f.write_bytes(raw)
        r = subprocess.run([sys.executable, "-m", "engine.run.cli", "config", "check", str(f)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2, (name, r.stderr)
        assert f"{f}: " in r.stderr and expected in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr


# -- the platform wallet has no minimum balance ----------------------------------------------

def test_a_tenant_wallet_has_no_minimum_balance() -> None:
    """Seed 001: a minimum balance is what a tenant asks of its buyers ("below the minimum
    balance, that user's campaigns will automatically be paused"); the tenant's own wallet
    (seed 000) has alerts, auto-recharge and the -$20.00 accrual, no minimum. On a wallet it
    paused the wallet and every lead was REJECTED 203 "at its floor" while far above it."""
    toml = BASE_TOML.replace('opening_balance = "1000.00"',
                             'opening_balance = "1000.00"\nmin_balance = "50.00"')
    _refused(toml, "tenants[0].wallet.min_balance", "clients only")


# -- weights: the rotation goes with every lead ----------------------------------------------

@pytest.mark.parametrize("weight", [0, 101, 2_000_000, 9_223_372_036_854_775_807])
def test_a_weight_is_1_to_100(weight: int) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(campaign(distribution="weighted_round_robin"), buyer("b1", weight=weight))
    assert info.value.path == "buyers[0].weight" and "1 to 100" in info.value.reason


def test_the_weights_of_a_wrr_campaign_add_up_to_at_most_1000() -> None:
    """Smooth WRR is unrolled to one entry per unit of weight, and every lead sends that
    rotation to decide.lua: a weight of 2,000,000 took seconds to load and ~1 s per lead."""
    ok = [buyer(f"b{i}", weight=100) for i in range(10)]
    make_config(campaign(distribution="weighted_round_robin"), *ok)  # exactly 1000
    with pytest.raises(ConfigError) as info:
        make_config(campaign(distribution="weighted_round_robin"), *ok, buyer("b10"))
    assert info.value.path == "buyers[10].weight"
    assert "add up to 1001" in info.value.reason and "at most 1000" in info.value.reason
    # other methods never unroll weights (waterfall only breaks ties with them)
    make_config(campaign(), *ok, buyer("b10"))


# -- webhook headers: what aiohttp (or the buyer's server) would refuse at every delivery ---

@pytest.mark.parametrize("name", ["bad header", "x:y", "", "é", "a\nb", "a(b)"])
def test_a_header_name_is_an_http_token(name: str) -> None:
    toml_name = name.replace("\n", "\\n")
    with pytest.raises(ConfigError) as info:
        make_config(campaign(), buyer("b1", extra=_webhook(headers=f'{{ "{toml_name}" = "1" }}')))
    assert info.value.path == "buyers[0].delivery.headers"
    assert "not a valid header name" in info.value.reason


@pytest.mark.parametrize("value", ["a\\nb", "a\\rb", "a\\r\\nX-Evil: 1", "a\\u0000b", "\\u007f"])
def test_a_header_value_has_no_cr_lf_or_control_characters(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(campaign(), buyer("b1", extra=_webhook(headers=f'{{ X-Api-Key = "{value}" }}')))
    assert info.value.path == "buyers[0].delivery.headers.X-Api-Key"
    assert "control characters" in info.value.reason
    assert "X-Evil" not in str(info.value)  # a value may be a secret: never echoed


def test_a_header_value_from_the_environment_is_checked_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LF_TEST_HEADER", "token\r\nX-Evil: 1")
    with pytest.raises(ConfigError) as info:
        make_config(campaign(), buyer("b1", extra=_webhook(
            headers='{ Authorization = "env:LF_TEST_HEADER" }')))
    assert info.value.path == "buyers[0].delivery.headers.Authorization"
    assert "X-Evil" not in str(info.value)


def test_valid_headers_are_accepted() -> None:
    make_config(campaign(), buyer("b1", extra=_webhook(
        headers='{ "X-Api-Key" = "k e y\\twith tab", "x_custom.v2" = "café", "#!~" = "" }')))


# -- auto-recharge: the billing API's rule (billing.policy.validate) -----------------------

@pytest.mark.parametrize(("setting", "path", "reason"), [
    ("max_per_day = 0", "max_per_day", "1 to 100"),
    ("max_per_day = 101", "max_per_day", "1 to 100"),
    ('max_amount_per_day = "99.00"', "max_amount_per_day", "at least one recharge amount"),
    ("every_days = 9223372036854775807", "every_days", "1 to 366"),
    ('amount = "2000000.00"', "amount", "the maximum is"),
])
def test_auto_recharge_is_checked_by_the_billing_api_rule(setting: str, path: str,
                                                          reason: str) -> None:
    """PUT /auto-recharge refuses these (billing.policy.validate); the config took them,
    and a max_per_day of 0 then refused every recharge as over the daily cap."""
    toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                             'id = "c1"\nopening_balance = "100.00"\n'
                             f"auto_recharge = {{ enabled = true, {setting} }}")
    _refused(toml, f"clients[0].auto_recharge.{path}", reason)
    wallet = BASE_TOML.replace('opening_balance = "1000.00"',
                               'opening_balance = "1000.00"\n'
                               f"auto_recharge = {{ enabled = true, {setting} }}")
    _refused(wallet, f"tenants[0].wallet.auto_recharge.{path}", reason)


def test_auto_recharge_config_and_api_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one rule: whatever the API's validate refuses, config check refuses (and the
    other way round), for the same settings."""
    from billing.policy import validate
    from engine.core.billing_errors import BillingError
    from engine.core.config import AutoRecharge

    cases = [AutoRecharge(enabled=True), AutoRecharge(enabled=True, threshold="19.99"),
             AutoRecharge(enabled=True, amount="99.99"), AutoRecharge(amount="100.001"),
             AutoRecharge(enabled=True, every_days=0), AutoRecharge(enabled=False, max_per_day=0),
             AutoRecharge(enabled=True, max_amount_per_day="100.00"),
             AutoRecharge(enabled=True, every_days=30, threshold="0.00")]
    for ar in cases:
        try:
            validate(ar)
            api_ok = True
        except BillingError:
            api_ok = False
        inline = ", ".join(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str)
                           else f"{k} = {str(v).lower()}"
                           for k, v in msgspec.structs.asdict(ar).items() if v is not None)
        toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                                 'id = "c1"\nopening_balance = "100.00"\n'
                                 f"auto_recharge = {{ {inline} }}")
        try:
            make_config(base=toml)
            config_ok = True
        except ConfigError:
            config_ok = False
        assert config_ok == api_ok, ar


# -- lifetimes that become a Redis EX inside decide.lua ----------------------------------------

def test_the_dedupe_look_back_is_at_most_3650_days() -> None:
    """decide.lua stores the fingerprints with EX days x 86400 after debiting the buyer:
    10**12 days made that SET fail, so the lead was charged, queued for delivery and
    answered 500 with no idempotency record (a retry charged again)."""
    dedupe = 'dedupe = {{ fields = ["email"], days = {} }}'
    make_config(campaign(extra=dedupe.format(3650)), buyer("b1"))
    with pytest.raises(ConfigError) as info:
        make_config(campaign(extra=dedupe.format(1_000_000_000_000)), buyer("b1"))
    assert info.value.path == "campaigns[1].dedupe.days"
    assert "1 to 3650" in info.value.reason


@pytest.mark.parametrize(("setting", "most"), [
    ("idempotency_ttl_s", 2_592_000), ("replay_window_s", 86_400)])
def test_idempotency_lifetimes_are_bounded(setting: str, most: int) -> None:
    """The decision's idempotency record is SET with this EX at the end of decide.lua,
    after the debit: at 2**63-1 the lead was charged and answered 500."""
    make_config(base=BASE_TOML + f"\n[settings]\n{setting} = {most}\n")
    for value in (most + 1, 9_223_372_036_854_775_807):
        with pytest.raises(ConfigError) as info:
            make_config(base=BASE_TOML + f"\n[settings]\n{setting} = {value}\n")
        assert info.value.path == f"settings.{setting}" and f"1 to {most}" in info.value.reason


def test_the_idempotency_key_outlives_the_payload_window() -> None:
    """A keyed lead's payload record points to its key's record: a pointer outliving what
    it points to let a sync lead go unclaimed (and be delivered twice)."""
    with pytest.raises(ConfigError) as info:
        make_config(base=BASE_TOML + "\n[settings]\nidempotency_ttl_s = 30\n"
                    "replay_window_s = 600\n")
    assert info.value.path == "settings.idempotency_ttl_s"
    assert "replay_window_s" in info.value.reason


def test_the_breaker_cooldown_is_at_most_a_day() -> None:
    """The open breaker is a Redis key with PX cooldown x 1000: Redis refuses 2**62 s."""
    make_config(campaign(), buyer("b1", extra=_webhook(breaker_cooldown_s="86400")))
    with pytest.raises(ConfigError) as info:
        make_config(campaign(), buyer("b1", extra=_webhook(
            breaker_cooldown_s=str(2**62))))
    assert info.value.path == "buyers[0].delivery.breaker_cooldown_s"
    assert "at most 86400" in info.value.reason


def test_a_tenant_token_cannot_look_like_a_buyer_key() -> None:
    _refused(BASE_TOML.replace('api_token = "tok-t2"', 'api_token = "lfk_tenant"'),
             "tenants[1].api_token", "must not start with 'lfk_'")


@pytest.mark.parametrize(("line", "path", "reason"), [
    ("invite_ttl_hours = 0", "settings.invite_ttl_hours", "1 to 720 hours"),
    ("invite_ttl_hours = 721", "settings.invite_ttl_hours", "1 to 720 hours"),
    ("api_key_cache_s = -1", "settings.api_key_cache_s", "0 to 60 seconds"),
    ("api_key_cache_s = 61", "settings.api_key_cache_s", "0 to 60 seconds"),
])
def test_portal_settings_are_bounded(line: str, path: str, reason: str) -> None:
    _refused(BASE_TOML + f"\n[settings]\n{line}\n", path, reason)
    make_config(base=BASE_TOML + "\n[settings]\ninvite_ttl_hours = 720\napi_key_cache_s = 60\n")


@pytest.mark.parametrize("port", [-1, 65_536, 99_999])
def test_the_port_is_0_to_65535(port: int) -> None:
    """A port past 65535 was accepted, and uvloop bound 99999 as 34463 (99999 % 65536)
    while the log said :99999."""
    _refused(BASE_TOML + f"\n[settings]\nport = {port}\n", "settings.port", "0 to 65535")


async def test_port_0_in_the_config_serves_on_a_free_port(redis, redis_server, tmp_path: Path
                                                          ) -> None:
    """settings.port = 0 (what config check allows besides 1-65535) binds a free port, and
    the service knows which one (it logs its URL)."""
    import aiohttp

    from engine.run.service import Service

    make_config(base=BASE_TOML + "\n[settings]\nport = 65535\n")
    cfg = make_config(base=BASE_TOML + "\n[settings]\nport = 0\n")
    svc = Service(cfg, redis_url=redis_server.url, state_dir=str(tmp_path))
    await svc.start()
    try:
        assert svc.port != 0
        async with aiohttp.ClientSession() as http, http.get(svc.url + "/healthz") as r:
            assert r.status == 200
    finally:
        await svc.stop()


# -- e-mail notifications (#19) ----------------------------------------------------------------

_NOTIFY = """
[tenants.notify]
operators = ["ops@acme.example"]
[tenants.notify.smtp]
host = "smtp.acme.example"
sender = "Acme Leads <billing@acme.example>"
"""


def _with_notify(extra: str = "", contacts: str = '["ap@bright.example"]') -> str:
    toml = BASE_TOML.replace('[tenants.wallet]\nopening_balance = "1000.00"\n',
                             '[tenants.wallet]\nopening_balance = "1000.00"\n'
                             + _NOTIFY + extra)
    return toml.replace('id = "c1"\nopening_balance = "100.00"',
                        f'id = "c1"\nopening_balance = "100.00"\ncontacts = {contacts}')


def test_a_notify_table_passes_with_its_defaults() -> None:
    cfg = make_config(base=_with_notify())
    smtp = cfg.tenants[0].notify.smtp
    assert smtp is not None and (smtp.port, smtp.security) == (587, "starttls")
    assert cfg.clients[0].contacts == ["ap@bright.example"]
    assert cfg.tenants[1].notify.smtp is None  # none: no e-mail


@pytest.mark.parametrize(("extra", "contacts", "path", "reason"), [
    ("", '["not an address"]', "clients[0].contacts[0]", "not an e-mail address"),
    ("port = 70000\n", '[]', "tenants[0].notify.smtp.port", "1 to 65535"),
    ('username = "u"\n', '[]', "tenants[0].notify.smtp.password", "needs a password"),
    ('username = "u"\npassword = "env:LEADFLOW_TEST_UNSET_SMTP_PW"\n', '[]',
     "tenants[0].notify.smtp.password", "empty"),
    ("timeout_s = 0\n", '[]', "tenants[0].notify.smtp.timeout_s", "more than 0"),
])
def test_bad_notify_settings_are_refused(extra: str, contacts: str, path: str,
                                         reason: str) -> None:
    _refused(_with_notify(extra, contacts), path, reason)


def test_a_sender_cannot_add_a_header() -> None:
    toml = _with_notify().replace('sender = "Acme Leads <billing@acme.example>"',
                                  'sender = "x@acme.example\\nBcc: all@evil.example"')
    _refused(toml, "tenants[0].notify.smtp.sender", "an e-mail address")


def test_an_smtp_password_is_not_in_the_config_repr() -> None:
    toml = _with_notify('username = "u"\npassword = "hunter2-secret"\n')
    assert "hunter2-secret" not in repr(make_config(base=toml).tenants[0].notify)


_SENDGRID = """
[tenants.notify]
operators = ["ops@acme.example"]
[tenants.notify.sendgrid]
api_key = "env:LEADFLOW_TEST_SENDGRID_KEY"
sender = "Acme Leads <billing@acme.example>"
"""


def _with_sendgrid(extra: str = "") -> str:
    return BASE_TOML.replace('[tenants.wallet]\nopening_balance = "1000.00"\n',
                             '[tenants.wallet]\nopening_balance = "1000.00"\n'
                             + _SENDGRID + extra)


def test_a_sendgrid_table_passes_with_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.test-key")
    sendgrid = make_config(base=_with_sendgrid()).tenants[0].notify.sendgrid
    assert sendgrid is not None
    assert (sendgrid.base_url, sendgrid.timeout_s) == ("https://api.sendgrid.com", 30.0)


@pytest.mark.parametrize(("extra", "path", "reason"), [
    ('base_url = "ftp://api.sendgrid.com"\n', "base_url", "http(s) URL"),
    ('base_url = "https://user:pw@api.sendgrid.com"\n', "base_url", "nothing else"),
    ('base_url = "https://api.sendgrid.com/v3/mail/send"\n', "base_url", "nothing else"),
    ('base_url = "https://[::1"\n', "base_url", "not an http(s) URL"),
    ("timeout_s = 301\n", "timeout_s", "at most 300"),
])
def test_bad_sendgrid_settings_are_refused(monkeypatch: pytest.MonkeyPatch, extra: str,
                                           path: str, reason: str) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.test-key")
    _refused(_with_sendgrid(extra), f"tenants[0].notify.sendgrid.{path}", reason)


def test_a_sendgrid_key_must_be_set_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEADFLOW_TEST_SENDGRID_KEY", raising=False)
    _refused(_with_sendgrid(), "tenants[0].notify.sendgrid.api_key", "empty")
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.hunter2 secret")
    err = _refused(_with_sendgrid(), "tenants[0].notify.sendgrid.api_key", "not an API key")
    assert "hunter2" not in str(err)
    toml = _with_sendgrid().replace("env:LEADFLOW_TEST_SENDGRID_KEY", "SG.literal-hunter2")
    assert "hunter2" not in repr(make_config(base=toml).tenants[0].notify)


def test_smtp_and_sendgrid_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.test-key")
    toml = _with_sendgrid('[tenants.notify.smtp]\nhost = "smtp.acme.example"\n'
                          'sender = "billing@acme.example"\n')
    _refused(toml, "tenants[0].notify.sendgrid", "smtp or sendgrid, not both")


def test_a_sendgrid_sender_cannot_add_a_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.test-key")
    toml = _with_sendgrid().replace('sender = "Acme Leads <billing@acme.example>"',
                                    'sender = "x@acme.example\\nBcc: all@evil.example"')
    _refused(toml, "tenants[0].notify.sendgrid.sender", "an e-mail address")


@pytest.mark.parametrize("url", ["https://leads.acme.example", "http://127.0.0.1:8080",
                                 "https://acme.example/leadflow/"])
def test_a_public_url_is_accepted(url: str) -> None:
    cfg = make_config(base=BASE_TOML + f'\n[settings]\npublic_url = "{url}"\n')
    assert cfg.settings.public_url == url


@pytest.mark.parametrize("url", ["leads.acme.example", "ftp://acme.example",
                                 "https://acme.example/?x=1", "https://acme.example/#x",
                                 "https://u:p@acme.example", "https://acme.example/a b",
                                 "https://acme.example/<x>", "https://acme.example:99999",
                                 "https://acme.example/\u00e9", "https://" + "a" * 200])
def test_a_public_url_goes_into_a_mail_header_as_it_is(url: str) -> None:
    """The base of unsubscribe links, sent in List-Unsubscribe: printable ASCII, no query
    (the token's), no user info."""
    _refused(BASE_TOML + f'\n[settings]\npublic_url = "{url}"\n', "settings.public_url",
             "http(s) URL")


def test_a_reload_applies_the_public_url_at_once() -> None:
    """It is read from the config in force at each use (the worker, the API): a reload that
    changes it does not log 'settings take effect at the next restart'."""
    from engine.core.config import Settings
    from engine.run.service import _changed_settings

    old, new = Settings(), Settings(public_url="https://leads.acme.example")
    assert _changed_settings(old, new) == []
    assert _changed_settings(old, Settings(port=9000)) == ["port"]

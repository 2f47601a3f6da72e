"""engine.delivery building blocks without Redis: signing, payload, verdicts, retry, breaker."""

from __future__ import annotations

import base64
import hmac
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qsl

import msgspec
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from engine.core.config import Delivery, ResponseRule
from engine.core.errors import ConfigError
from engine.delivery.breaker import Breaker, BreakerState
from engine.delivery.payload import RequestBuilder
from engine.delivery.retry import backoff_ms, parse_retry_after, retry_delay_ms
from engine.delivery.signing import Signer, SigningError, webhook_id
from engine.delivery.verdict import BuyerVerdict, ResponseMapper, RuleError, is_retryable
from tests.helpers.buyers import SECRET
from tests.helpers.harness import buyer, campaign, make_config

LEAD = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com"}


def test_signature_verifies_with_standardwebhooks() -> None:
    body = b'{"a":"1"}'
    ts = int(datetime.now(UTC).timestamp())
    headers = Signer(SECRET).headers(webhook_id("L1", "b1"), ts, body)
    assert headers["webhook-id"] == "msg_L1_b1"
    assert Webhook(SECRET).verify(body, headers) == {"a": "1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"a":"2"}', headers)


@pytest.mark.parametrize("key_len", [1, 24, 32, 64, 65, 200])
def test_signature_is_hmac_sha256_for_any_key_length(key_len: int) -> None:
    """Signer keeps the padded-key SHA-256 states (RFC 2104) instead of calling hmac: the
    result must be hmac's, including keys longer than the 64-byte block (hashed first)."""
    key = bytes(range(256))[:key_len]
    secret = "whsec_" + base64.b64encode(key).decode()
    body = b'{"lead_id":"L1"}'
    want = base64.b64encode(hmac.digest(key, b"msg_L1_b1.1700000000." + body, "sha256"))
    assert Signer(secret).signature("msg_L1_b1", 1_700_000_000, body) == "v1," + want.decode()


def test_bad_and_empty_secrets() -> None:
    with pytest.raises(SigningError):
        Signer("whsec_not*base64")
    unsigned = Signer("").headers("m", 1, b"")
    assert "webhook-signature" not in unsigned and unsigned["webhook-id"] == "m"
    assert "key" not in repr(Signer(SECRET)).lower()


def test_json_template_static_values_and_secret_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUYER_TOKEN", "s3cret")
    d = Delivery(url="http://b/x", template={"name": "{first_name} {last_name}",
                                             "src": "leadflow", "id": "{lead_id}",
                                             "missing": "{nope}", "lit": "{{x}}"},
                 headers={"Authorization": "env:BUYER_TOKEN"}, secret=SECRET)
    b = RequestBuilder("b1", d)
    req = b.build(LEAD, lead_id="L1", timestamp=int(datetime.now(UTC).timestamp()))
    assert msgspec.json.decode(req.body) == {"name": "Ada Lovelace", "src": "leadflow",
                                             "id": "L1", "missing": "", "lit": "{x}"}
    assert req.headers["Authorization"] == "s3cret"
    assert req.headers["Content-Type"] == "application/json"
    assert "s3cret" not in repr(b)
    Webhook(SECRET).verify(req.body, req.headers)


def test_form_and_get_and_default_fields() -> None:
    ts = int(datetime.now(UTC).timestamp())
    form = RequestBuilder("b1", Delivery(url="http://b/x", format="form", secret=SECRET))
    req = form.build(LEAD, lead_id="L1", timestamp=ts)
    assert dict(parse_qsl(req.body.decode())) == LEAD
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    get = RequestBuilder("b1", Delivery(url="http://b/x?k=1", method="GET", secret=SECRET,
                                        template={"e": "{email}"}))
    req = get.build(LEAD, lead_id="L1", timestamp=ts)
    # the query as yarl sends it (it turns "%40" back into "@"), which is what is signed:
    # test_put_form_template_headers_and_get_reach_a_real_buyer checks it on the wire
    assert req.body == b"" and str(req.url) == "http://b/x?k=1&e=ada@example.com"
    Webhook(SECRET).verify("k=1&e=ada@example.com", req.headers, json_parse=False)


def test_stored_lead_bytes_are_the_json_body_or_decoded_for_other_shapes() -> None:
    """The worker hands over the lead as stored with the sale: sent as is for a plain JSON
    POST (the same bytes the mapping would encode), decoded for templates, form and GET."""
    ts = int(datetime.now(UTC).timestamp())
    stored = msgspec.json.encode(LEAD)
    plain = RequestBuilder("b1", Delivery(url="http://b/x", secret=SECRET))
    req = plain.build(stored, lead_id="L1", timestamp=ts)
    assert req.body == stored == plain.build(LEAD, lead_id="L1", timestamp=ts).body
    Webhook(SECRET).verify(req.body, req.headers)
    form = RequestBuilder("b1", Delivery(url="http://b/x", format="form", secret=SECRET))
    assert dict(parse_qsl(form.build(stored, lead_id="L1", timestamp=ts).body.decode())) == LEAD
    tpl = RequestBuilder("b1", Delivery(url="http://b/x", template={"e": "{email}"}))
    assert msgspec.json.decode(tpl.build(stored, lead_id="L1", timestamp=ts).body) == {
        "e": "ada@example.com"}


def _mapper(**kw: object) -> ResponseMapper:
    return ResponseMapper(Delivery(url="http://b", **kw), buyer_price=25_000_000)  # type: ignore[arg-type]


def test_verdict_rules() -> None:
    m = _mapper(accept=[ResponseRule(path="result", equals="success")],
                duplicate=[ResponseRule(status=[409]), ResponseRule(contains="already")])
    assert m.classify(200, b'{"result": "SUCCESS"}').outcome is BuyerVerdict.ACCEPTED
    assert m.classify(200, b'{"result": "fail"}').outcome is BuyerVerdict.REJECTED
    assert m.classify(409, b"").outcome is BuyerVerdict.DUPLICATED
    assert m.classify(200, b"lead already exists").outcome is BuyerVerdict.DUPLICATED
    assert m.classify(200, b"garbage{").outcome is BuyerVerdict.REJECTED
    plain = _mapper()
    assert plain.classify(201, b"").outcome is BuyerVerdict.ACCEPTED
    assert plain.classify(400, b"").outcome is BuyerVerdict.REJECTED
    rx = _mapper(accept=[ResponseRule(regex=r"^OK\b", status=[200])])
    assert rx.classify(200, b"OK 123").outcome is BuyerVerdict.ACCEPTED
    assert rx.classify(202, b"OK 123").outcome is BuyerVerdict.REJECTED
    nested = _mapper(accept=[ResponseRule(path="$.data.items.0.ok", equals="true")])
    assert nested.classify(200, b'{"data":{"items":[{"ok":true}]}}').outcome is BuyerVerdict.ACCEPTED
    assert all(is_retryable(s) for s in (500, 503, 429)) and not is_retryable(404)
    with pytest.raises(RuleError):
        _mapper(accept=[ResponseRule(regex="(")])
    with pytest.raises(RuleError):
        _mapper(accept=[ResponseRule()])


def test_realtime_price_is_decimal_exact_and_capped() -> None:
    m = _mapper(price_path="bid.price", max_price="30.00")
    assert m.classify(200, b'{"bid":{"price":18.123456}}').price == 18_123_456
    assert m.classify(200, b'{"bid":{"price":"99"}}').price == 30_000_000
    assert m.classify(200, b'{"bid":{"price":-1}}').price is None
    assert m.classify(200, b'{"bid":{}}').price is None
    # without max_price the buyer's configured price caps it
    assert _mapper(price_path="p").classify(200, b'{"p": 40}').price == 25_000_000


def test_backoff_full_jitter_and_retry_after() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        d = backoff_ms(attempt, 100, 5_000, rng=rng)
        assert 0 <= d <= min(5_000, 100 * 2 ** (attempt - 1))
    now = 1_700_000_000_000
    assert parse_retry_after("1", now) == 1_000
    when = datetime.fromtimestamp(now / 1000, UTC) + timedelta(seconds=30)
    assert parse_retry_after(format_datetime(when, usegmt=True), now) == 30_000
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    assert retry_delay_ms(1, 10, 10, 1_000, rng=rng) == 1_000  # Retry-After is a floor


def test_breaker_state_machine() -> None:
    b = Breaker(failures_to_open=3, cooldown_ms=1_000)
    assert b.allow(0) == 0
    assert not b.failure(1) and not b.failure(2)
    assert b.failure(3) and b.state is BreakerState.OPEN
    assert b.allow(500) == 1_003
    assert b.allow(1_003) == 0 and b.state is BreakerState.HALF_OPEN  # the probe
    assert b.allow(1_004) > 1_004  # only one probe at a time
    assert b.failure(1_010) and b.state is BreakerState.OPEN  # a failed probe re-opens
    assert b.allow(2_010) == 0
    assert b.success() and b.state is BreakerState.CLOSED and b.allow(2_011) == 0


# -- delivery settings are checked when the config is loaded ---------------------------

_URL = 'url = "https://buyer.example/leads"'
_GOOD = _URL + f', secret = "{SECRET}"'


@pytest.mark.parametrize(("delivery", "path", "reason"), [
    ('url = "ftp://buyer.example/x"', "buyers[0].delivery.url", "http(s) URL"),
    ('url = "https:///no-host"', "buyers[0].delivery.url", "with a host"),
    ('url = "http://buyer.example:99999/"', "buyers[0].delivery.url", "port"),
    (_URL, "buyers[0].delivery.secret", "required"),
    (_URL + ', secret = ""', "buyers[0].delivery.secret", "required"),
    (_URL + ', secret = "not-a-secret"', "buyers[0].delivery.secret", "whsec_"),
    (_URL + ', secret = "whsec_***"', "buyers[0].delivery.secret", "base64"),
    (_URL + ', secret = "env:LEADFLOW_TEST_UNSET_SECRET"', "buyers[0].delivery.secret",
     "environment variable"),
    (_GOOD + ', headers = { Authorization = "env:LEADFLOW_TEST_UNSET_TOKEN" }',
     "buyers[0].delivery.headers.Authorization", "environment variable"),
    (_GOOD + ', accept = [{ regex = "(" }]', "buyers[0].delivery.accept[0].regex",
     "invalid regex"),
    (_GOOD + ', duplicate = [{ status = [409], equals = "x" }]', "buyers[0].delivery.duplicate[0].equals",
     "needs a 'path'"),
    (_GOOD + ", accept = [{}]", "buyers[0].delivery.accept[0]", "needs status"),
    (_GOOD + ", accept = [{ status = [700] }]", "buyers[0].delivery.accept[0].status[0]",
     "HTTP status"),
    (_GOOD + ', max_price = "1.5.0"', "buyers[0].delivery.max_price", ""),
    (_GOOD + ', max_price = "-1.00"', "buyers[0].delivery.max_price", "negative"),
    (_GOOD + ", timeout_ms = 0", "buyers[0].delivery.timeout_ms", "positive"),
    (_GOOD + ", timeout_ms = 30001", "buyers[0].delivery.timeout_ms", "at most 30000"),
    (_GOOD + ", max_attempts = 0", "buyers[0].delivery.max_attempts", "positive"),
    (_GOOD + ", breaker_cooldown_s = -1", "buyers[0].delivery.breaker_cooldown_s", "positive"),
    (_GOOD + ", retry_base_ms = 500, retry_max_ms = 100", "buyers[0].delivery.retry_max_ms",
     "retry_base_ms"),
])
def test_bad_delivery_config_fails_at_load(delivery: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(campaign(), buyer("b1", extra=f"delivery = {{ {delivery} }}"))
    assert err.value.path == path and reason in err.value.reason
    assert "<test>" in str(err.value) and path in str(err.value)


def test_good_delivery_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_WHSEC", SECRET)
    cfg = make_config(campaign(), buyer("b1", extra=(
        'delivery = { url = "http://127.0.0.1:8081/x?src=lf", secret = "env:LEADFLOW_TEST_WHSEC",'
        ' accept = [{ path = "status", equals = "ok" }, { regex = "^acc" }],'
        ' duplicate = [{ status = [409] }], max_price = "30.00" }')))
    assert cfg.buyers[0].delivery is not None


@pytest.mark.parametrize(("extra", "path", "reason"), [
    ("sync_deadline_ms = 0", "campaigns[1].sync_deadline_ms", "between"),
    ('mode = "sync"', "campaigns[1].mode", "send_to_all"),
])
def test_bad_sync_campaign_config(extra: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(campaign(distribution="send_to_all", extra=extra))
    assert err.value.path == path and reason in err.value.reason

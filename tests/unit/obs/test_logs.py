"""engine.obs.logs: one JSON object per record; extras are whitelisted; exceptions keep their
class and code locations, never their message."""

from __future__ import annotations

import logging
import sys

import msgspec

from engine.obs.logs import JsonFormatter
from engine.run import configfile


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("leadflow.test", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_only_whitelisted_extras_are_written() -> None:
    line = JsonFormatter().format(_record(
        "lead decided\nsecond line", tenant="t1", lead_id="L1", email="jane@example.com",
        lp_key="k-secret", api_token="tok-secret"))
    assert "\n" not in line
    rec = msgspec.json.decode(line)
    assert rec["msg"] == "lead decided\nsecond line"
    assert (rec["tenant"], rec["lead_id"], rec["level"]) == ("t1", "L1", "warning")
    assert "jane@example.com" not in line and "secret" not in line


def test_exceptions_keep_class_and_location_not_message() -> None:
    try:
        raise ValueError("card 4242424242424242 for jane@example.com")
    except ValueError:
        rec = _record("payment failed")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    out = msgspec.json.decode(line)
    assert out["error"] == "ValueError"
    assert out["trace"][-1].startswith("tests/unit/obs/test_logs.py:")
    assert "4242" not in line and "jane" not in line


def test_reprs_and_config_errors_show_no_secret() -> None:
    """A %r in a log line, a debugger or a failed assertion showed every secret of the
    config (tokens, lp_keys, webhook secrets and headers, URLs with credentials); a config
    error echoed a webhook URL with its user info and query."""
    import pytest

    from engine.core.errors import ConfigError
    from engine.routing.runtime import Runtime
    from tests.helpers.harness import BASE_TOML, buyer, campaign

    hook = ('delivery = { url = "https://u:URLPW@buyer.example/l?api_key=URLQ", '
            'secret = "whsec_c2VjcmV0c2VjcmV0c2VjcmV0", '
            'headers = { Authorization = "Bearer HDRSECRET" } }')
    toml = (BASE_TOML.replace("tok-t1", "TOKSECRET").replace("key-s1", "LPKSECRET")
            + "[settings]\nredis_url = 'redis://:RPW@h:6379'\nsql_url = 'postgresql://u:SPW@h/db'\n"
            + campaign() + buyer("b1", extra=hook))
    secrets = ["TOKSECRET", "LPKSECRET", "URLPW", "URLQ", "c2VjcmV0", "HDRSECRET", "RPW", "SPW"]
    cfg = configfile.loads(toml, source="<test>")
    shown = repr(cfg) + repr(list(Runtime(cfg).suppliers.values()))
    for s in secrets:
        assert s not in shown, s
    bad = toml.replace("https://u:URLPW", "htps://u:URLPW")
    with pytest.raises(ConfigError) as err:
        configfile.loads(bad, source="<test>")
    assert "URLPW" not in str(err.value) and "URLQ" not in str(err.value)

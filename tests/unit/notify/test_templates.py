"""engine.notify.templates: defaults, the sandbox, escaping, money, validation."""

from __future__ import annotations

import pytest

from engine.core.errors import LeadflowError
from engine.notify import TemplateError
from engine.notify import templates as t

OK_TEXT = "Hello {{ client_name }}"
OK_HTML = "<p>{{ client_name }}</p>"


@pytest.mark.parametrize("kind", t.KINDS)
def test_every_kind_renders_its_default_with_its_sample(kind: str) -> None:
    tpl = t.default(kind)
    rendered = t.validate(kind, tpl.subject, tpl.text, tpl.html)
    assert rendered == t.render(kind, t.sample(kind))
    assert rendered.subject and "\n" not in rendered.subject
    assert "Bright Solar LLC" in rendered.text
    assert rendered.html.startswith("<!DOCTYPE html>")
    assert "{{" not in rendered.text + rendered.html + rendered.subject


def test_kinds_and_samples_agree() -> None:
    assert set(t.KINDS) == set(t.SAMPLES)
    assert len(t.KINDS) == 15


def test_html_is_escaped_and_text_is_not() -> None:
    data = t.sample("account_resumed") | {"client_name": "<script>alert(1)</script> & Co"}
    rendered = t.render("account_resumed", data)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in rendered.html
    assert "<script>" not in rendered.html
    assert "<script>alert(1)</script> & Co" in rendered.text


def test_subject_is_one_line() -> None:
    data = t.sample("account_resumed") | {"account_id": "c-1\r\nBcc: victim@example.com"}
    subject = t.render("account_resumed", data).subject
    assert "\n" not in subject and "\r" not in subject
    assert subject == "Your account c-1 Bcc: victim@example.com is active again"


def test_amounts_from_micros() -> None:
    rendered = t.render("recharge_succeeded", t.sample("recharge_succeeded") | {
        "amount": 100_000_000, "fee": 3_000_000, "balance": -125_000})
    assert rendered.subject == "Recharge of 100.00 USD succeeded"
    assert "We charged 103.00 USD" in rendered.text  # amount + fee, summed in the template
    assert "a card fee of 3.00 USD" in rendered.text
    assert "New balance: -0.125 USD" in rendered.text
    assert t.validate("balance_alert", "{{ 103_000_000|money }}", OK_TEXT, OK_HTML).subject \
        == "103.00"


@pytest.mark.parametrize("value", ["1.5", "'103'", "True", "none"])
def test_money_refuses_what_is_not_integer_micros(value: str) -> None:
    with pytest.raises(TemplateError, match="not an amount in integer micros"):
        t.validate("balance_alert", "{{ " + value + "|money }}", OK_TEXT, OK_HTML)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ client_name.__init__.__globals__ }}",
    "{{ balance.__class__ }}",
    "{% for c in ''.__class__.__mro__ %}{{ c }}{% endfor %}",
])
def test_sandbox_refuses_attribute_escapes(source: str) -> None:
    with pytest.raises(TemplateError, match="not allowed") as info:
        t.validate("balance_alert", "s", OK_TEXT, source)
    assert info.value.part == "html" and info.value.kind == "balance_alert"
    assert isinstance(info.value, LeadflowError)


def test_syntax_error_is_refused() -> None:
    with pytest.raises(TemplateError, match=r"balance_alert\.text: syntax error on line 2"):
        t.validate("balance_alert", "s", "ok\n{% if balance %}unclosed", OK_HTML)


def test_unknown_variable_is_refused() -> None:
    with pytest.raises(TemplateError, match="unknown variable: 'balanse' is undefined"):
        t.validate("balance_alert", "{{ balanse|money }}", OK_TEXT, OK_HTML)
    # a variable of another kind is unknown here too
    with pytest.raises(TemplateError, match="unknown variable"):
        t.validate("balance_alert", "s", "{{ buyer_name }}", OK_HTML)


def test_runtime_error_is_refused() -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        t.validate("balance_alert", "s", "{{ 1 // 0 }}", OK_HTML)


def test_template_over_64_kib_is_refused() -> None:
    at_limit = "x" * t.MAX_TEMPLATE_BYTES
    assert t.validate("balance_alert", "s", at_limit, OK_HTML).text == at_limit
    with pytest.raises(TemplateError, match="65537 bytes, more than 65536"):
        t.validate("balance_alert", "s", at_limit + "x", OK_HTML)
    # bytes, not characters
    with pytest.raises(TemplateError, match="more than 65536"):
        t.validate("balance_alert", "s", OK_TEXT, "é" * (t.MAX_TEMPLATE_BYTES // 2 + 1))


def test_empty_subject_is_refused() -> None:
    with pytest.raises(TemplateError, match="subject: renders empty"):
        t.validate("balance_alert", "{% if false %}x{% endif %}  ", OK_TEXT, OK_HTML)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(TemplateError, match="unknown message kind"):
        t.render("balance_alerts", {})
    with pytest.raises(TemplateError, match="unknown message kind"):
        t.sample("nope")

"""Unsubscribe links in messages: the default footer of the optional kinds, validate()
without the link, and the List-Unsubscribe headers (RFC 2369, RFC 8058) as a real SMTP
server receives them."""

from __future__ import annotations

import pytest

from engine.notify import NotifyError, TemplateError
from engine.notify import templates as t
from engine.notify.prefs import CATEGORY_OF, OPTIONAL
from engine.notify.transport import SmtpSettings, SmtpTransport, build_message
from tests.helpers.smtp import SmtpServer

# a long link: the default policy would fold it into RFC 2047 encoded words
LINK = ("https://leads.acme.example/v1/notify/unsubscribe?t="
        + "dDEKcmVwb3J0cwo5ZjNhYzQ3OGQ1YjE0NjFlOWMyM2E3YjE2ZDBlMmY0Mw" * 2
        + ".q3Xv7dN0kzv2Lx8iW1f5bRk5s1V9oS6J2FQeQm3Hn4A")


def test_the_samples_of_optional_kinds_and_only_those_have_a_link() -> None:
    for kind in t.KINDS:
        optional = CATEGORY_OF[kind] in OPTIONAL
        assert ("unsubscribe_url" in t.sample(kind)) is optional, kind


@pytest.mark.parametrize("kind", [k for k in t.KINDS if CATEGORY_OF[k] in OPTIONAL])
def test_an_optional_kinds_default_shows_the_link_only_when_there_is_one(kind: str) -> None:
    with_link = t.render(kind, t.sample(kind) | {"unsubscribe_url": LINK})
    assert LINK in with_link.text and f'href="{LINK}"' in with_link.html
    assert with_link.unsubscribe_url == LINK
    bare = t.sample(kind)
    del bare["unsubscribe_url"]
    without = t.render(kind, bare)
    assert "unsubscribe" not in (without.text + without.html).lower()
    assert without.unsubscribe_url is None


def test_validate_refuses_a_template_that_needs_the_link() -> None:
    d = t.default("weekly_report")
    with pytest.raises(TemplateError) as err:
        t.validate("weekly_report", d.subject, "Stop: {{ unsubscribe_url }}", d.html)
    assert err.value.part == "text" and "without unsubscribe_url" in err.value.reason
    ok = t.validate("weekly_report", d.subject,
                    "{% if unsubscribe_url is defined %}{{ unsubscribe_url }}{% endif %}",
                    d.html)
    assert ok.text == t.SAMPLE_UNSUBSCRIBE_URL


def test_a_kind_without_a_link_in_its_sample_cannot_use_it() -> None:
    d = t.default("balance_alert")
    with pytest.raises(TemplateError):
        t.validate("balance_alert", d.subject, "{{ unsubscribe_url }}", d.html)


def test_headers_are_added_only_with_a_link_and_stay_on_one_line() -> None:
    plain = t.render("balance_alert", t.sample("balance_alert"))
    msg = build_message("billing@acme.example", "ap@bright.example", plain, key="k")
    assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None
    linked = t.render("cap_reached", t.sample("cap_reached") | {"unsubscribe_url": LINK})
    msg = build_message("billing@acme.example", "ap@bright.example", linked, key="k")
    wire = msg.as_bytes().decode()
    assert f"List-Unsubscribe: <{LINK}>\n" in wire
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n" in wire


@pytest.mark.parametrize("url", ["javascript:alert(1)", "https://a.example/x y",
                                 "https://a.example/\r\nBcc: x@evil.example",
                                 "https://a.example/<x>"])
def test_a_link_that_is_not_a_plain_url_is_refused(url: str) -> None:
    rendered = t.Rendered("s", "t", "h", unsubscribe_url=url)
    with pytest.raises(NotifyError):
        build_message("billing@acme.example", "ap@bright.example", rendered, key="k")


async def test_the_server_receives_the_headers_unfolded(smtp_server: SmtpServer) -> None:
    transport = SmtpTransport(SmtpSettings(host=smtp_server.host, port=smtp_server.port,
                                           sender="billing@acme.example", security="plain",
                                           timeout_s=5.0))
    linked = t.render("weekly_report", t.sample("weekly_report") | {"unsubscribe_url": LINK})
    await transport.send("ap@bright.example", linked, key="k1")
    [got] = smtp_server.received
    assert got.message["List-Unsubscribe"] == f"<{LINK}>"
    assert got.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got.message["Subject"] == linked.subject

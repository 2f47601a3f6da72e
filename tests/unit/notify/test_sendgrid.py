"""engine.notify.sendgrid against a real local HTTP server (tests/helpers/sendgrid.py): the
request has the shape SendGrid documents for POST /v3/mail/send, and its answers are sent,
tried again or refused for good; the API key and the addresses never reach a log."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.notify import NotifyError, PermanentTransportError, TransportError
from engine.notify import templates as t
from engine.notify.outbox import Outbox, SendOutcome
from engine.notify.sendgrid import ENTRY_ARG, SendGridSettings, SendGridTransport
from engine.notify.transport import message_id
from tests.helpers.sendgrid import SendGridServer

KEY = "SG.test-key-hunter2"
SENDER = "Acme Leads <billing@acme.example>"
TO = "ap@bright.example"


def transport(server: SendGridServer, **kw: object) -> SendGridTransport:
    settings = SendGridSettings(api_key=KEY, sender=SENDER, base_url=server.url,
                                **kw)  # type: ignore[arg-type]
    return SendGridTransport(settings)


def message(kind: str = "balance_alert") -> t.Rendered:
    return t.render(kind, t.sample(kind))


async def test_the_request_is_sendgrids_v3_mail_send(sendgrid_server: SendGridServer) -> None:
    tr = transport(sendgrid_server)
    rendered = message()
    try:
        await tr.send(TO, rendered, key="k1")
    finally:
        await tr.close()
    [req] = sendgrid_server.requests
    assert (req.method, req.path) == ("POST", "/v3/mail/send")
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["Content-Type"] == "application/json"
    body = req.json()
    assert body["personalizations"] == [{"to": [{"email": TO}]}]
    assert body["from"] == {"email": "billing@acme.example", "name": "Acme Leads"}
    assert body["subject"] == rendered.subject == "Your balance is under 20.00 USD"
    # text/plain first, then text/html: the order SendGrid requires
    assert body["content"] == [{"type": "text/plain", "value": rendered.text},
                               {"type": "text/html", "value": rendered.html}]
    assert body["headers"] == {"Message-ID": "<notify.k1@acme.example>"}
    assert body["headers"]["Message-ID"] == message_id("k1", SENDER)
    assert body["custom_args"] == {ENTRY_ARG: "k1"}
    assert set(body) == {"personalizations", "from", "subject", "content", "headers",
                         "custom_args"}


async def test_an_optional_kind_carries_the_unsubscribe_headers_as_smtp_does(
        sendgrid_server: SendGridServer) -> None:
    """Found by review: SendGrid messages had no List-Unsubscribe headers."""
    url = "https://leads.acme.example/v1/notify/unsubscribe?t=abc.def"
    rendered = t.render("weekly_report", {**t.sample("weekly_report"), "unsubscribe_url": url})
    assert rendered.unsubscribe_url == url
    tr = transport(sendgrid_server)
    try:
        await tr.send(TO, rendered, key="k1")
    finally:
        await tr.close()
    [req] = sendgrid_server.requests
    assert req.json()["headers"] == {
        "Message-ID": "<notify.k1@acme.example>", "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


async def test_a_bare_sender_has_no_name(sendgrid_server: SendGridServer) -> None:
    tr = SendGridTransport(SendGridSettings(api_key=KEY, sender="billing@acme.example",
                                            base_url=sendgrid_server.url + "/"))
    try:
        await tr.send(TO, message(), key="k2")
    finally:
        await tr.close()
    [req] = sendgrid_server.requests
    assert req.path == "/v3/mail/send"
    assert req.json()["from"] == {"email": "billing@acme.example"}


@pytest.mark.parametrize(("status", "permanent"), [
    (500, False), (503, False), (429, False), (408, False),
    (400, True), (401, True), (403, True), (413, True),
])
async def test_answers_are_retried_or_refused_for_good(
        sendgrid_server: SendGridServer, caplog: pytest.LogCaptureFixture, status: int,
        permanent: bool) -> None:
    sendgrid_server.answer(status, b'{"errors": [{"message": "bad address ap@bright.example",'
                                   b' "field": "personalizations.0.to.0.email", "help": null}]}')
    tr = transport(sendgrid_server)
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(TransportError) as info:
            await tr.send(TO, message(), key="k3")
    finally:
        await tr.close()
    assert isinstance(info.value, PermanentTransportError) is permanent
    error = str(info.value)
    assert f"HTTP {status}" in error and "personalizations.0.to.0.email" in error
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"HTTP {status}" in logged
    for secret in ("hunter2", "ap@bright", "bad address"):
        assert secret not in error and secret not in logged


async def test_a_202_is_sent_and_any_2xx_too(sendgrid_server: SendGridServer) -> None:
    sendgrid_server.answer(200)
    tr = transport(sendgrid_server)
    try:
        await tr.send(TO, message(), key="k4")  # 200
        await tr.send(TO, message(), key="k5")  # 202
    finally:
        await tr.close()
    assert len(sendgrid_server.requests) == 2


async def test_a_server_that_never_answers_is_a_timeout_tried_again(
        sendgrid_server: SendGridServer) -> None:
    sendgrid_server.hold = True
    tr = transport(sendgrid_server, timeout_s=0.2)
    try:
        with pytest.raises(TransportError) as info:
            await tr.send(TO, message(), key="k6")
    finally:
        sendgrid_server.release()
        await tr.close()
    assert not isinstance(info.value, PermanentTransportError)
    assert "Timeout" in str(info.value)
    assert sendgrid_server.held.is_set()


async def test_no_server_is_a_network_error_tried_again(
        sendgrid_server: SendGridServer) -> None:
    url = sendgrid_server.url
    await sendgrid_server.stop()
    tr = SendGridTransport(SendGridSettings(api_key=KEY, sender=SENDER, base_url=url,
                                            timeout_s=5))
    try:
        with pytest.raises(TransportError) as info:
            await tr.send(TO, message(), key="k7")
    finally:
        await tr.close()
    assert not isinstance(info.value, PermanentTransportError)
    assert "hunter2" not in str(info.value)


async def test_the_key_is_in_no_repr_and_no_log(
        sendgrid_server: SendGridServer, caplog: pytest.LogCaptureFixture) -> None:
    tr = transport(sendgrid_server)
    assert "hunter2" not in repr(tr) and "hunter2" not in repr(tr.settings)
    with caplog.at_level(logging.DEBUG):
        try:
            await tr.send(TO, message(), key="k8")
        finally:
            await tr.close()
    assert caplog.records  # it logged the send
    for r in caplog.records:
        assert "hunter2" not in r.getMessage() and TO not in r.getMessage()


def test_bad_settings_are_refused() -> None:
    for kw, match in (
        ({"api_key": ""}, "api_key"),
        ({"api_key": "SG.a\r\nX-Evil: 1"}, "api_key"),
        ({"sender": "not an address"}, "sender"),
        ({"base_url": "ftp://api.sendgrid.com"}, "base_url"),
        ({"timeout_s": 0}, "timeout"),
    ):
        settings = {"api_key": KEY, "sender": SENDER, "base_url": "https://api.sendgrid.com",
                    "timeout_s": 1.0, **kw}
        with pytest.raises(NotifyError, match=match) as info:
            SendGridTransport(SendGridSettings(**settings))  # type: ignore[arg-type]
        assert "hunter2" not in str(info.value)


async def test_the_outbox_marks_a_refused_request_dead_and_a_5xx_for_a_retry(
        sendgrid_server: SendGridServer, redis: aioredis.Redis) -> None:
    tr = transport(sendgrid_server)
    box = Outbox(redis, "t1", tr)
    try:
        sendgrid_server.answer(400)
        dead = await box.send("ev-1", TO, "balance_alert", message())
        assert dead.outcome is SendOutcome.DEAD and dead.error == "sendgrid: HTTP 400"
        assert (await box.send("ev-1", TO, "balance_alert", message())).outcome \
            is SendOutcome.ALREADY_DEAD
        assert len(sendgrid_server.requests) == 1  # not tried again
        sendgrid_server.answer(503)
        failed = await box.send("ev-2", TO, "balance_alert", message())
        assert failed.outcome is SendOutcome.FAILED and failed.retry_at_ms is not None
        sent = await box.send("ev-2", TO, "balance_alert", message())
        assert sent.outcome is SendOutcome.SENT
        assert await redis.get(keys.notify("t1", sent.entry)) == b"sent"
        # the Message-ID and custom_args carry the outbox entry, the same on the retry
        first, second = (r.json() for r in sendgrid_server.requests[1:])
        assert first["custom_args"] == second["custom_args"] == {ENTRY_ARG: sent.entry}
        assert first["headers"] == second["headers"]
    finally:
        await tr.close()


async def test_close_ends_its_own_session_and_a_new_send_opens_another(
        sendgrid_server: SendGridServer) -> None:
    tr = transport(sendgrid_server)
    await tr.send(TO, message(), key="k9")
    await tr.close()
    await tr.close()  # twice: nothing more to do
    await tr.send(TO, message(), key="k10")
    await tr.close()
    assert len(sendgrid_server.requests) == 2

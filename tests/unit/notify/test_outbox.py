"""engine.notify.transport and engine.notify.outbox against a real aiosmtpd server and the
tests' real redis-server."""

from __future__ import annotations

import logging
import random

import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.core.backoff import backoff_ms
from engine.notify import NotifyError, PermanentTransportError, TransportError
from engine.notify import templates as t
from engine.notify.outbox import Outbox, SendOutcome, entry_id
from engine.notify.transport import SmtpSettings, SmtpTransport, build_message
from tests.helpers.smtp import SmtpServer

TENANT = "t1"
SENDER = "Acme Leads <billing@acme.example>"


def transport(server: SmtpServer, **kw: object) -> SmtpTransport:
    return SmtpTransport(SmtpSettings(host=server.host, port=server.port, sender=SENDER,
                                      security="plain", timeout_s=5.0, **kw))  # type: ignore[arg-type]


def message(kind: str = "recharge_succeeded", **data: object) -> t.Rendered:
    return t.render(kind, t.sample(kind) | data)


async def test_a_message_arrives_with_recipient_subject_and_both_parts(
        smtp_server: SmtpServer) -> None:
    rendered = message(client_name="<script>x</script>")
    await transport(smtp_server).send("ops@bright.example", rendered, key="k1")
    [got] = smtp_server.received
    assert got.recipients == ["ops@bright.example"]
    assert got.sender == "billing@acme.example"
    msg = got.message
    assert msg["Subject"] == "Recharge of 100.00 USD succeeded"
    assert msg["To"] == "ops@bright.example"
    assert msg["Message-ID"] == "<notify.k1@acme.example>"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    assert "Hello <script>x</script>," in text.get_content()
    assert "Hello &lt;script&gt;x&lt;/script&gt;," in html.get_content()


async def test_outbox_sends_once_per_event_recipient_and_kind(
        smtp_server: SmtpServer, redis: aioredis.Redis) -> None:
    box = Outbox(redis, TENANT, transport(smtp_server))
    rendered = message()
    first = await box.send("ev-1", "ops@bright.example", "recharge_succeeded", rendered)
    again = await box.send("ev-1", "ops@bright.example", "recharge_succeeded", rendered)
    same_addr = await box.send("ev-1", " OPS@Bright.example", "recharge_succeeded", rendered)
    assert (first.outcome, again.outcome, same_addr.outcome) == (
        SendOutcome.SENT, SendOutcome.ALREADY_SENT, SendOutcome.ALREADY_SENT)
    assert len(smtp_server.received) == 1
    assert smtp_server.received[0].message["Message-ID"] == f"<notify.{first.entry}@acme.example>"
    # another recipient, kind or event is another message
    assert (await box.send("ev-1", "cfo@bright.example", "recharge_succeeded",
                           rendered)).outcome is SendOutcome.SENT
    assert (await box.send("ev-1", "ops@bright.example", "funding_received",
                           rendered)).outcome is SendOutcome.SENT
    assert (await box.send("ev-2", "ops@bright.example", "recharge_succeeded",
                           rendered)).outcome is SendOutcome.SENT
    assert len(smtp_server.received) == 4
    # the record: hash-tagged per tenant, "sent", with a TTL
    key = keys.notify(TENANT, first.entry)
    assert key.startswith("lf:{t1}:notify:")
    assert await redis.get(key) == b"sent"
    assert await redis.pttl(key) > 0


async def test_a_claim_held_by_another_sender_sends_nothing(
        smtp_server: SmtpServer, redis: aioredis.Redis) -> None:
    box = Outbox(redis, TENANT, transport(smtp_server))
    entry = entry_id("ev-1", "ops@bright.example", "balance_alert")
    await redis.set(keys.notify(TENANT, entry), "someone-else", px=60_000)
    result = await box.send("ev-1", "ops@bright.example", "balance_alert",
                            message("balance_alert"))
    assert result.outcome is SendOutcome.IN_FLIGHT
    assert smtp_server.received == []
    assert await redis.get(keys.notify(TENANT, entry)) == b"someone-else"


async def test_server_down_records_a_failure_then_up_again_delivers(
        smtp_server: SmtpServer, redis: aioredis.Redis) -> None:
    smtp_server.stop()
    now = 1_800_000_000_000
    box = Outbox(redis, TENANT, transport(smtp_server), retry_base_ms=1_000,
                 retry_max_ms=60_000, rng=random.Random(7), clock_ms=lambda: now)
    args = ("ev-9", "ops@bright.example", "recharge_declined")
    rendered = message("recharge_declined")
    entry = entry_id(*args)

    failed = await box.send(*args, rendered)
    assert failed.outcome is SendOutcome.FAILED and failed.attempts == 1
    assert failed.error is not None and f"smtp 127.0.0.1:{smtp_server.port}" in failed.error
    assert failed.retry_at_ms is not None and now <= failed.retry_at_ms <= now + 1_000
    assert await redis.get(keys.notify(TENANT, entry)) is None  # nothing marked sent
    again = await box.send(*args, rendered)
    assert again.outcome is SendOutcome.FAILED and again.attempts == 2
    assert again.retry_at_ms is not None and now <= again.retry_at_ms <= now + 2_000
    assert await box.tries(*args) == (2, again.retry_at_ms)
    tries = await redis.hgetall(keys.notify_tries(TENANT, entry))
    assert tries[b"attempts"] == b"2" and b"last_error" in tries

    smtp_server.start()
    delivered = await box.send(*args, rendered)
    assert delivered.outcome is SendOutcome.SENT
    assert [r.recipients for r in smtp_server.received] == [["ops@bright.example"]]
    assert await redis.get(keys.notify(TENANT, entry)) == b"sent"
    assert await box.tries(*args) == (0, None)  # the failures are cleared once sent
    assert (await box.send(*args, rendered)).outcome is SendOutcome.ALREADY_SENT
    assert len(smtp_server.received) == 1


async def test_the_transport_error_names_the_server_not_the_password(
        smtp_server: SmtpServer) -> None:
    smtp_server.stop()
    tr = transport(smtp_server, username="u", password="hunter2-secret")
    assert "hunter2" not in repr(tr) and "hunter2" not in repr(tr.settings)
    with pytest.raises(TransportError) as info:
        await tr.send("ops@bright.example", message(), key="k")
    assert "hunter2" not in str(info.value)


async def test_smtp_auth(smtp_auth_server: SmtpServer) -> None:
    await transport(smtp_auth_server, username="leadflow", password="s3cret-pw").send(
        "ops@bright.example", message(), key="k")
    assert [r.recipients for r in smtp_auth_server.received] == [["ops@bright.example"]]
    with pytest.raises(TransportError, match="SMTPAuthenticationError") as info:
        await transport(smtp_auth_server, username="leadflow", password="wrong-pw").send(
            "ops@bright.example", message(), key="k")
    assert "wrong-pw" not in str(info.value)
    assert len(smtp_auth_server.received) == 1


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    for attempt, cap in ((1, 1_000), (2, 2_000), (3, 4_000), (10, 60_000), (500, 60_000)):
        waits = [backoff_ms(attempt, 1_000, 60_000, rng=rng) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap // 2  # spread over the range, not a fixed wait
    assert all(0 <= backoff_ms(0, 1_000, 60_000, rng=rng) <= 1_000 for _ in range(50))


def test_bad_headers_and_settings_are_refused() -> None:
    with pytest.raises(NotifyError, match="cannot build the message"):
        build_message(SENDER, "a@b.example\r\nBcc: x@y.example", message(), key="k")
    with pytest.raises(NotifyError, match="unknown message kind"):
        entry_id("ev", "a@b.example", "nope")
    with pytest.raises(NotifyError, match="username needs a password"):
        SmtpTransport(SmtpSettings(host="h", port=25, sender=SENDER, username="u"))
    with pytest.raises(NotifyError, match="starttls, tls or plain"):
        SmtpTransport(SmtpSettings(host="h", port=25, sender=SENDER,
                                   security="ssl"))  # type: ignore[arg-type]


async def test_a_refused_recipient_is_dead_and_never_named(
        smtp_server: SmtpServer, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A 550 to RCPT is a refusal for good: the entry is dead, not tried again. The
    server's reply names the mailbox: it stays out of the logs and the recorded error
    (personal data); the class of the failure and its code are kept."""
    box = Outbox(redis, TENANT, transport(smtp_server))
    address = "refused.person@bright.example"
    with caplog.at_level(logging.DEBUG):
        failed = await box.send("ev-pii", address, "balance_alert", message("balance_alert"))
    assert failed.outcome is SendOutcome.DEAD and failed.error is not None
    assert failed.retry_at_ms is None and failed.attempts == 1
    assert "SMTPRecipientsRefused 550" in failed.error and "refused.person" not in failed.error
    entry = entry_id("ev-pii", address, "balance_alert")
    assert await redis.get(keys.notify(TENANT, entry)) == b"dead"
    assert await box.tries("ev-pii", address, "balance_alert") == (1, None)
    again = await box.send("ev-pii", address, "balance_alert", message("balance_alert"))
    assert again.outcome is SendOutcome.ALREADY_DEAD
    assert await box.tries("ev-pii", address, "balance_alert") == (1, None)  # not tried
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith("mail.")]
    assert not [m for m in ours if "refused.person" in m]  # (mail.*: the test's server)
    tries = await redis.hgetall(keys.notify_tries(TENANT, entry_id("ev-pii", address,
                                                                   "balance_alert")))
    assert b"refused.person" not in tries[b"last_error"]
    assert smtp_server.received == []


@pytest.mark.parametrize(("address", "permanent", "reason"), [
    ("refused.person@bright.example", True, "SMTPRecipientsRefused 550"),  # RCPT 5xx
    ("spamtrap@bright.example", True, "SMTPDataError 554"),  # DATA 5xx
    ("busy.person@bright.example", False, "SMTPRecipientsRefused 450"),  # RCPT 4xx
])
async def test_smtp_5xx_to_rcpt_or_data_is_permanent_4xx_is_not(
        smtp_server: SmtpServer, address: str, permanent: bool, reason: str) -> None:
    with pytest.raises(TransportError) as info:
        await transport(smtp_server).send(address, message(), key="k")
    assert isinstance(info.value, PermanentTransportError) is permanent
    assert reason in str(info.value) and address.partition("@")[0] not in str(info.value)
    assert smtp_server.received == []


async def test_a_dead_entry_after_failures_keeps_no_retry_time(
        smtp_server: SmtpServer, redis: aioredis.Redis) -> None:
    """An entry that failed for now (a retry time) and then for good: no retry time left,
    so a worker does not wait for it; it is dead."""
    box = Outbox(redis, TENANT, transport(smtp_server))
    args = ("ev-7", "refused.person@bright.example", "balance_alert")
    smtp_server.stop()
    assert (await box.send(*args, message("balance_alert"))).outcome is SendOutcome.FAILED
    assert (await box.tries(*args))[1] is not None
    smtp_server.start()
    dead = await box.send(*args, message("balance_alert"))
    assert (dead.outcome, dead.attempts) == (SendOutcome.DEAD, 2)
    assert await box.tries(*args) == (2, None)

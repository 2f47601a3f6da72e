"""engine.notify.worker: which events become which messages, for whom; and a worker pass
by hand (StreamConsumer.poll) against the tests' redis-server and a real aiosmtpd server."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aioredis

from billing.attempts import CardTry, ChargeAttempt
from engine.core import keys
from engine.core.config import Config
from engine.core.constants import WALLET
from engine.notify import NotifyError
from engine.notify.outbox import entry_id as outbox_entry
from engine.notify.sendgrid import SendGridTransport
from engine.notify.templates import render
from engine.notify.transport import SmtpTransport
from engine.notify.worker import (
    Message,
    NotifyWorker,
    message,
    messages,
    smtp_transport,
    transport_for,
)
from engine.run import configfile
from engine.store.store import Store
from tests.helpers.smtp import SmtpServer

TOML = """
[[tenants]]
id = "t1"
name = "Acme Leads"
api_token = "tok-t1"
[tenants.notify]
operators = ["ops@acme.example"]
[tenants.notify.smtp]
host = "127.0.0.1"
port = {port}
security = "plain"
sender = "billing@acme.example"

[[clients]]
tenant = "t1"
id = "c1"
name = "Bright Solar"
min_balance = "50.00"
contacts = ["ap@bright.example", "cfo@bright.example"]

[[clients]]
tenant = "t1"
id = "quiet"
"""


def _cfg(port: int = 2525) -> Config:
    return configfile.loads(TOML.format(port=port), source="<test>")


def _fields(**kw: str) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in kw.items()}


def test_a_client_balance_alert_goes_to_its_contacts() -> None:
    msg = message(_cfg(), "t1", _fields(type="balance_alert", account="c1",
                                        balance="15000000", threshold="20000000", ts="1"))
    assert msg is not None
    assert msg.kind == "balance_alert"
    assert msg.recipients == ("ap@bright.example", "cfo@bright.example")
    assert msg.context["balance"] == 15_000_000 and msg.context["threshold"] == 20_000_000
    assert msg.context["client_name"] == "Bright Solar"


def test_the_wallet_alert_goes_to_the_operators() -> None:
    msg = message(_cfg(), "t1", _fields(type="balance_alert", account=WALLET,
                                        balance="5000000", threshold="20000000"))
    assert msg is not None and msg.recipients == ("ops@acme.example",)
    assert msg.context["client_name"] == "Acme Leads"


def test_an_account_pause_and_resume_are_messages_a_buyer_pause_is_not() -> None:
    paused = message(_cfg(), "t1", _fields(type="buyer_paused", account="c1",
                                           balance="40000000", reason="min_balance"))
    assert paused is not None and paused.kind == "account_paused"
    assert paused.context["minimum"] == 50_000_000
    assert paused.context["reason"] == "the balance is under the minimum"
    resumed = message(_cfg(), "t1", _fields(type="buyer_resumed", account="c1",
                                            balance="60000000"))
    assert resumed is not None and resumed.kind == "account_resumed"
    assert message(_cfg(), "t1", _fields(type="buyer_paused", account="c1", buyer="b1",
                                         balance="1", reason="manual")) is None
    assert message(_cfg(), "t1", _fields(type="buyer_resumed", account="c1", buyer="b1",
                                         balance="1", reason="manual")) is None


def test_an_account_paused_at_its_floor_by_a_lead_is_a_message() -> None:
    """decide.lua pauses the whole account at its floor and names the buyer whose sale
    found it (the event's buyer field): still the account's pause, not one buyer's (it
    sent nothing while any buyer field meant a buyer paused by hand)."""
    msg = message(_cfg(), "t1", _fields(type="buyer_paused", account="c1", buyer="b1",
                                        ref="L9", balance="-15000000", reason="floor"))
    assert msg is not None and msg.kind == "account_paused"
    assert msg.context["reason"] == "the balance reached its floor"


@pytest.mark.parametrize("fields", [
    {"type": "recharge_needed", "account": "c1", "balance": "1"},  # internal
    {"type": "balance_alert", "account": "quiet", "balance": "1", "threshold": "2"},  # nobody
    {"type": "balance_alert", "account": "gone", "balance": "1", "threshold": "2"},  # removed
])
def test_events_without_a_message(fields: dict[str, str]) -> None:
    assert message(_cfg(), "t1", _fields(**fields)) is None


def test_a_malformed_amount_is_a_notify_error() -> None:
    with pytest.raises(NotifyError):
        message(_cfg(), "t1", _fields(type="balance_alert", account="c1", balance="x",
                                      threshold="2"))


async def test_a_pass_sends_acks_and_dead_letters_a_malformed_entry(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = _cfg(smtp_server.port)
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None)
    await worker.start_group()
    stream = keys.events("t1")
    good = (await redis.xadd(stream, _fields(type="balance_alert", account="c1",
                                              balance="15000000", threshold="20000000"))).decode()
    bad = (await redis.xadd(stream, _fields(type="balance_alert", account="c1",
                                             balance="oops", threshold="20000000"))).decode()
    for batch in await worker.events.poll(10):
        for entry_id, fields in batch.entries:
            assert await worker.handle(batch.tenant, entry_id, fields)
    assert sorted(r.recipients[0] for r in smtp_server.received) == [
        "ap@bright.example", "cfo@bright.example"]
    assert all(r.message["Subject"] == "Your balance is under 20.00 USD"
               for r in smtp_server.received)
    assert (await redis.xpending(stream, "notify"))["pending"] == 0
    dead = await redis.xrange(keys.dead_letter("t1", "events"))
    assert [f[b"source_id"].decode() for _, f in dead] == [bad]
    assert good != bad


async def test_events_from_before_the_group_are_not_mailed(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = _cfg(smtp_server.port)
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    await redis.xadd(keys.events("t1"), _fields(type="balance_alert", account="c1",
                                                 balance="1", threshold="20000000"))
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None)
    await worker.start_group()
    await worker.start_group()  # BUSYGROUP: kept where it is
    assert await worker.events.poll(10) == []
    assert smtp_server.received == []


def _attempt(*codes: str, fee: int = 0, declined: bool = True) -> ChargeAttempt:
    return ChargeAttempt(
        id="rc:1-0", tenant="t1", account="c1", purpose="recharge", amount=100_000_000,
        fee=fee, customer="cus_1",
        cards=[CardTry(pm=f"pm_{i}", state="declined" if declined else "error", code=code)
               for i, code in enumerate(codes)],
        state="failed", error="all_cards_failed")


def test_a_recharge_success_is_a_message_with_the_attempt_fee() -> None:
    fields = _fields(type="recharge_succeeded", account="c1", ref="rc:1-0",
                     amount="100000000", balance="118000000", payment_intent="pi_1")
    bare = message(_cfg(), "t1", fields)
    assert bare is not None and bare.kind == "recharge_succeeded"
    assert bare.recipients == ("ap@bright.example", "cfo@bright.example")
    text = render(bare.kind, bare.context).text
    assert "We charged 100.00 USD for Bright Solar" in text and "card ending" not in text
    assert "card fee" not in text and "New balance: 118.00 USD" in text
    full = message(_cfg(), "t1", fields, _attempt(fee=3_000_000))
    assert full is not None
    text = render(full.kind, full.context).text
    assert "We charged 103.00 USD" in text and "and a card fee of 3.00 USD." in text


@pytest.mark.parametrize(("reason", "attempt", "kind", "said"), [
    ("daily_cap", None, "daily_cap_reached", "reached its daily recharge limit."),
    ("all_cards_failed", _attempt("insufficient_funds"), "recharge_declined",
     "The card was declined for a recharge of 100.00 USD (insufficient funds)."),
    ("all_cards_failed", _attempt("x", "y"), "recharge_declined",
     "(every card on file was declined)"),
    ("all_cards_failed", _attempt("Card <9999>"), "recharge_declined", "(declined by the bank)"),
    ("all_cards_failed", _attempt("processing_error", declined=False), "recharge_failed",
     "failed: no card on file could be charged."),
    ("all_cards_failed", None, "recharge_failed", "failed: no card on file could be charged."),
    ("no_payment_method", None, "recharge_failed", "failed: there is no card on file."),
    ("authentication_required", None, "recharge_failed", "asks you to confirm the payment"),
    ("StripeError: secret internals", None, "recharge_failed",
     "failed: the payment could not be completed."),
])
def test_a_recharge_failure_is_a_message_by_its_reason(
        reason: str, attempt: ChargeAttempt | None, kind: str, said: str) -> None:
    msg = message(_cfg(), "t1", _fields(type="recharge_failed", account="c1", ref="rc:1-0",
                                        reason=reason, amount="100000000",
                                        balance="12000000"), attempt)
    assert msg is not None and msg.kind == kind
    rendered = render(msg.kind, msg.context)
    assert said in " ".join(rendered.text.split()), rendered.text
    assert "internals" not in rendered.text + rendered.html + rendered.subject
    assert "card ending" not in rendered.text and "try again" not in rendered.text
    assert "Balance: 12.00 USD" in rendered.text


async def test_a_pass_reads_the_charge_attempt_of_a_recharge_event(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = _cfg(smtp_server.port)
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None)
    await worker.start_group()
    await redis.set(keys.attempt("t1", "rc:1-0"),
                    msgspec.json.encode(_attempt("card_declined")))
    await redis.xadd(keys.events("t1"), _fields(
        type="recharge_failed", account="c1", ref="rc:1-0", reason="all_cards_failed",
        amount="100000000", balance="12000000"))
    for batch in await worker.events.poll(10):
        for entry_id, fields in batch.entries:
            assert await worker.handle(batch.tenant, entry_id, fields)
    assert len(smtp_server.received) == 2
    assert all(r.message["Subject"] == "Recharge of 100.00 USD declined"
               for r in smtp_server.received)
    assert (await redis.xpending(keys.events("t1"), "notify"))["pending"] == 0


CONTACTS = ("ap@bright.example", "cfo@bright.example")
OPERATORS = ("ops@acme.example",)


def _one(**fields: str) -> tuple[Message, str]:
    """The one message of an event, and its text as rendered by the default templates."""
    [msg] = messages(_cfg(), "t1", _fields(**fields))
    return msg, " ".join(render(msg.kind, msg.context).text.split())


def test_balance_negative_goes_to_the_accounts_recipients_with_balance_and_floor() -> None:
    msg, text = _one(type="balance_negative", account="c1", balance="-4250000",
                     floor="-20000000")
    assert (msg.kind, msg.recipients) == ("balance_negative", CONTACTS)
    assert msg.context["balance"] == -4_250_000 and msg.context["floor"] == -20_000_000
    assert "is now -4.25 USD" in text and "until it reaches -20.00 USD" in text
    wallet, _ = _one(type="balance_negative", account=WALLET, balance="-1", floor="-20000000")
    assert wallet.recipients == OPERATORS


@pytest.mark.parametrize(("method", "said"), [
    ("card", "(card payment)"), ("manual", "(manual credit)"), ("other", "(payment)")])
def test_funding_received_names_its_method(method: str, said: str) -> None:
    msg, text = _one(type="funding_received", account="c1", amount="100000000",
                     method=method, balance="112000000", ref="pi_1")
    assert (msg.kind, msg.recipients) == ("funding_received", CONTACTS)
    assert f"We received 100.00 USD {said} for Bright Solar" in text
    assert "New balance: 112.00 USD" in text


def test_refund_processed_says_the_amount_and_the_balance_after() -> None:
    msg, text = _one(type="refund_processed", account="c1", amount="49990000", balance="0")
    assert (msg.kind, msg.recipients) == ("refund_processed", CONTACTS)
    assert "We refunded 49.99 USD" in text and "New balance: 0.00 USD" in text


@pytest.mark.parametrize(("window", "said"), [
    ("day", "b1 received 50 leads this day, its cap. It receives leads again when the next "
            "day starts."),
    ("total", "b1 received 50 leads in all, its total cap. It receives no more leads until "
              "its cap is raised."),
])
def test_cap_reached_goes_to_the_buyers_client(window: str, said: str) -> None:
    msg, text = _one(type="cap_reached", account="c1", buyer="b1", campaign="camp",
                     cap="50", window=window, balance="1", ref="L1")
    assert (msg.kind, msg.recipients) == ("cap_reached", CONTACTS)
    assert msg.context["cap"] == 50 and said in text


def test_webhook_failing_goes_to_the_operators_even_for_a_client_no_longer_configured() -> None:
    fields = {"type": "webhook_failing", "account": "c1", "buyer": "b1",
              "host": "hooks.example:8443", "failures": "10", "error": "http 503",
              "status": "503"}
    msg, text = _one(**fields)
    assert (msg.kind, msg.recipients) == ("webhook_failing", OPERATORS)
    assert "The last 10 deliveries to buyer b1 of Bright Solar (account c1) failed, at "            "hooks.example:8443." in text and "Last error: http 503" in text
    gone, _ = _one(**{**fields, "account": "gone"})
    assert gone.recipients == OPERATORS and gone.context["client_name"] == "gone"
    no_ops = configfile.loads(TOML.format(port=1).replace(
        'operators = ["ops@acme.example"]', "operators = []"), source="<test>")
    assert messages(no_ops, "t1", _fields(**fields)) == []


def test_a_return_is_two_messages_one_to_the_operators_one_to_the_client() -> None:
    fields = _fields(type="lead_returned", account="c1", lead_id="L1", buyer="b1",
                     amount="10000000", reason="return: wrong_number", balance="90000000")
    asked, decided = messages(_cfg(), "t1", fields)
    assert (asked.kind, asked.recipients) == ("return_requested", OPERATORS)
    assert (decided.kind, decided.recipients) == ("return_decided", CONTACTS)
    text = " ".join(render(asked.kind, asked.context).text.split())
    assert "Bright Solar (account c1) returned lead L1, bought by b1 for 10.00 USD: wrong "            "number." in text
    assert "credited back to Bright Solar" in text
    text = " ".join(render(decided.kind, decided.context).text.split())
    assert "The return of lead L1 was granted: 10.00 USD is credited back" in text
    assert "Reason given: wrong number." in text
    assert message(_cfg(), "t1", fields) == asked  # the first
    quiet = _fields(type="lead_returned", account="quiet", lead_id="L2", buyer="b1",
                    amount="1", reason="return: wrong_number")
    assert [m.kind for m in messages(_cfg(), "t1", quiet)] == ["return_requested"]


def test_an_unknown_return_reason_is_not_shown_as_given() -> None:
    [asked, _] = messages(_cfg(), "t1", _fields(
        type="lead_returned", account="c1", lead_id="L1", buyer="b1", amount="1",
        reason="return: <script>internal</script>"))
    assert asked.context["reason"] == "not given"


async def test_a_return_sends_each_of_its_two_messages_once(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = _cfg(smtp_server.port)
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None)
    await worker.start_group()
    stream = keys.events("t1")
    entry = (await redis.xadd(stream, _fields(
        type="lead_returned", account="c1", lead_id="L1", buyer="b1", amount="10000000",
        reason="return: disconnected_phone", balance="90000000"))).decode()
    [batch] = await worker.events.poll(10)
    assert await worker.handle("t1", entry, batch.entries[0][1])
    assert await worker.handle("t1", entry, batch.entries[0][1])  # again: nothing new
    got = sorted((r.recipients[0], r.message["Subject"]) for r in smtp_server.received)
    assert got == [("ap@bright.example", "Return granted for lead L1"),
                   ("cfo@bright.example", "Return granted for lead L1"),
                   ("ops@acme.example", "Lead L1 returned by Bright Solar")]
    assert (await redis.xpending(stream, "notify"))["pending"] == 0


TWO_TENANTS = """
[[tenants]]
id = "{a}"
api_token = "tok-{a}"
[tenants.notify.smtp]
host = "127.0.0.1"
port = {pa}
security = "plain"
sender = "billing@a.example"
timeout_s = 60

[[tenants]]
id = "{b}"
api_token = "tok-{b}"
[tenants.notify.smtp]
host = "127.0.0.1"
port = {pb}
security = "plain"
sender = "billing@b.example"
timeout_s = 60

[[clients]]
tenant = "{a}"
id = "c1"
contacts = ["ap@a-client.example"]

[[clients]]
tenant = "{b}"
id = "c1"
contacts = ["ap@b-client.example"]
"""


async def test_a_hanging_smtp_server_of_one_tenant_holds_up_no_other_tenants_mail(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    hanging = SmtpServer(hold=True)
    hanging.start()
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        cfg = configfile.loads(TWO_TENANTS.format(a="ta", b="tb", pa=hanging.port,
                                                  pb=smtp_server.port), source="<test>")
        transports = {t: tr for t in ("ta", "tb")
                      if (tr := smtp_transport(cfg.tenant(t))) is not None}
        worker = NotifyWorker(cfg, Store(redis), transports, consumer="w1", block_ms=100)
        await worker.start_group()
        task = asyncio.create_task(worker.run(stop))
        alert = _fields(type="balance_alert", account="c1", balance="1", threshold="20000000")
        await redis.xadd(keys.events("ta"), alert)
        assert await asyncio.to_thread(hanging.handler.held.wait, 15)  # ta's send hangs
        await redis.xadd(keys.events("tb"), alert)
        assert await asyncio.to_thread(smtp_server.handler.arrived.wait, 15)
        assert [r.recipients for r in smtp_server.received] == [["ap@b-client.example"]]
        assert hanging.received == []
        hanging.release()
        assert await asyncio.to_thread(hanging.handler.arrived.wait, 15)
        assert [r.recipients for r in hanging.received] == [["ap@a-client.example"]]
        stop.set()
        await task
        for t in ("ta", "tb"):
            assert (await redis.xpending(keys.events(t), "notify"))["pending"] == 0
    finally:
        stop.set()
        hanging.release()
        if task is not None:
            await task
        hanging.stop()


async def test_a_claim_before_the_retry_time_sends_nothing_and_leaves_the_entry_pending(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = _cfg(smtp_server.port)
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    now = [1_000_000]
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None,
                          clock_ms=lambda: now[0])
    await worker.start_group()
    stream = keys.events("t1")
    await redis.xadd(stream, _fields(type="balance_alert", account="c1", balance="1",
                                     threshold="20000000"))
    smtp_server.stop()  # down: both recipients fail and get a retry time
    [batch] = await worker.events.poll(10)
    [(entry_id, fields)] = batch.entries
    assert not await worker.handle("t1", entry_id, fields)
    box = worker.outboxes["t1"]
    retry_at = [(await box.tries(entry_id, r, "balance_alert"))[1]
                for r in ("ap@bright.example", "cfo@bright.example")]
    assert all(r is not None for r in retry_at)
    smtp_server.start()
    now[0] = min(r for r in retry_at if r is not None) - 1  # claimed again, too early
    assert not await worker.handle("t1", entry_id, fields)
    assert smtp_server.received == []
    assert (await redis.xpending(stream, "notify"))["pending"] == 1
    now[0] = max(r for r in retry_at if r is not None)  # both retry times reached
    assert await worker.handle("t1", entry_id, fields)
    assert sorted(r.recipients[0] for r in smtp_server.received) == [
        "ap@bright.example", "cfo@bright.example"]
    assert (await redis.xpending(stream, "notify"))["pending"] == 0


def _contacts_cfg(port: int, *contacts: str) -> Config:
    toml = TOML.replace('contacts = ["ap@bright.example", "cfo@bright.example"]',
                        f"contacts = {list(contacts)!r}".replace("'", '"'))
    return configfile.loads(toml.format(port=port), source="<test>")


async def _one_entry(worker: NotifyWorker) -> tuple[str, dict[bytes, bytes]]:
    [batch] = await worker.events.poll(10)
    [(entry_id, fields)] = batch.entries
    return entry_id, fields


async def test_a_recipient_refused_for_good_is_dead_lettered_at_once_and_never_again(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    cfg = _contacts_cfg(smtp_server.port, "ap@bright.example", "refused.person@bright.example")
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    seen: list[tuple[str, str, str]] = []
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None,
                          observer=lambda *a: seen.append(a))
    await worker.start_group()
    stream = keys.events("t1")
    await redis.xadd(stream, _fields(type="balance_alert", account="c1", balance="1",
                                     threshold="20000000"))
    entry_id, fields = await _one_entry(worker)
    assert await worker.handle("t1", entry_id, fields)  # done: one sent, one dead
    assert [r.recipients for r in smtp_server.received] == [["ap@bright.example"]]
    assert (await redis.xpending(stream, "notify"))["pending"] == 0
    [(_, dead)] = await redis.xrange(keys.dead_letter("t1", "events"))
    assert dead[b"source_id"].decode() == entry_id
    refused = outbox_entry(entry_id, "refused.person@bright.example", "balance_alert")
    error = dead[b"error"].decode()
    assert error.startswith(f"{refused}: smtp 127.0.0.1:")  # the outbox entry, no address
    assert "SMTPRecipientsRefused 550" in error and "refused.person" not in error
    assert await worker.outboxes["t1"].tries(entry_id, "refused.person@bright.example",
                                             "balance_alert") == (1, None)
    assert seen == [("sent", "smtp", "balance_alert"), ("dead_lettered", "smtp", "balance_alert")]
    # handled again (a replay): nothing sent, nothing dead-lettered twice, nothing counted
    assert await worker.handle("t1", entry_id, fields)
    assert len(smtp_server.received) == 1
    assert len(await redis.xrange(keys.dead_letter("t1", "events"))) == 1
    assert len(seen) == 2


async def test_a_dead_recipient_beside_one_failing_for_now_keeps_the_entry_pending_for_it(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    """One contact refused for good, one busy (450): the dead one is dead-lettered at once
    and the entry stays pending for the busy one, which is tried again after its backoff
    and dead-lettered on the entry's last delivery."""
    cfg = _contacts_cfg(smtp_server.port, "refused.person@bright.example",
                        "busy.person@bright.example")
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    seen: list[tuple[str, str, str]] = []
    now = [1_000_000]
    worker = NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None,
                          claim_idle_ms=0, max_deliveries=2, clock_ms=lambda: now[0],
                          observer=lambda *a: seen.append(a))
    await worker.start_group()
    stream = keys.events("t1")
    await redis.xadd(stream, _fields(type="balance_alert", account="c1", balance="1",
                                     threshold="20000000"))
    entry_id, fields = await _one_entry(worker)
    assert not await worker.handle("t1", entry_id, fields)
    dead = await redis.xrange(keys.dead_letter("t1", "events"))
    assert len(dead) == 1 and b"SMTPRecipientsRefused 550" in dead[0][1][b"error"]
    assert b"450" not in dead[0][1][b"error"]
    assert (await redis.xpending(stream, "notify"))["pending"] == 1
    assert seen == [("dead_lettered", "smtp", "balance_alert"),
                    ("failed", "smtp", "balance_alert")]
    _, retry_at = await worker.outboxes["t1"].tries(entry_id, "busy.person@bright.example",
                                                    "balance_alert")
    assert retry_at is not None
    now[0] = retry_at
    [batch] = await worker.events.claim(10)  # delivered a second time: the last
    assert [e for e, _ in batch.entries] == [entry_id]
    assert await worker.handle("t1", entry_id, fields)
    dead = await redis.xrange(keys.dead_letter("t1", "events"))
    assert len(dead) == 2 and b"SMTPRecipientsRefused 450" in dead[1][1][b"error"]
    assert b"550" not in dead[1][1][b"error"]  # the dead one is not tried or told again
    assert (await redis.xpending(stream, "notify"))["pending"] == 0
    assert seen[2:] == [("dead_lettered", "smtp", "balance_alert")]
    assert smtp_server.received == []


def test_transport_for_picks_the_tenants_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADFLOW_TEST_SENDGRID_KEY", "SG.from-env")
    toml = TWO_TENANTS.format(a="ta", b="tb", pa=2525, pb=2526).replace(
        '[tenants.notify.smtp]\nhost = "127.0.0.1"\nport = 2526\nsecurity = "plain"\n'
        'sender = "billing@b.example"\ntimeout_s = 60\n',
        '[tenants.notify.sendgrid]\napi_key = "env:LEADFLOW_TEST_SENDGRID_KEY"\n'
        'sender = "B Leads <billing@b.example>"\nbase_url = "http://127.0.0.1:9"\n'
        'timeout_s = 7\n')
    toml += '\n[[tenants]]\nid = "tc"\napi_token = "tok-tc"\n'
    cfg = configfile.loads(toml, source="<test>")
    smtp, sendgrid = transport_for(cfg.tenant("ta")), transport_for(cfg.tenant("tb"))
    assert isinstance(smtp, SmtpTransport) and smtp.channel == "smtp"
    assert isinstance(sendgrid, SendGridTransport) and sendgrid.channel == "sendgrid"
    assert sendgrid.settings.api_key == "SG.from-env"  # resolved from the environment
    assert sendgrid.url == "http://127.0.0.1:9/v3/mail/send"
    assert sendgrid.settings.timeout_s == 7
    assert transport_for(cfg.tenant("tc")) is None

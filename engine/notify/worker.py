"""The notification worker: a tenant's events, as e-mail (issue #19).

One consumer of the group ``notify`` on each tenant's events stream (``keys.events``),
through :class:`engine.store.streams.StreamConsumer` like the other workers. Each entry is
mapped to a message kind of :mod:`engine.notify.templates` and its context
(:func:`message`), rendered, and sent to each recipient through the tenant's
:class:`engine.notify.outbox.Outbox`, exactly once per ``(entry id, recipient, kind)``:

- the entry is acked once every recipient is ``SENT`` or ``ALREADY_SENT`` (so a replayed or
  claimed entry sends nothing twice);
- a ``FAILED`` send (the SMTP server or SendGrid down or refusing for now) leaves the
  entry pending: the consumer's claim of idle entries hands it over again (no sleeping
  here), and after :data:`MAX_DELIVERIES` deliveries it goes to the tenant's events
  dead-letter stream;
- a ``DEAD`` send (refused for good: a mailbox that does not exist, a request SendGrid
  will never take) is not tried again: the entry goes to the dead-letter stream at once,
  its error naming the recipient's outbox entry (a digest, no address), and is acked
  unless another recipient is still to be sent to (then it stays pending for them, and
  an ``ALREADY_DEAD`` recipient counts as done);
- ``IN_FLIGHT`` (another worker holds the recipient's claim) leaves it pending too;
- a recipient whose last send failed is not sent to again before the outbox's
  ``retry_at_ms`` (its backoff): a claim that comes earlier leaves the entry pending;
- an entry that cannot become a message (a malformed field, a template that fails) is
  dead-lettered at once: retrying would fail the same way.

On one Redis a single blocking read serves every tenant, and each tenant's entries are sent
by that tenant's own task (:meth:`NotifyWorker._consume`): a slow or hanging SMTP server
holds up only its own tenant's mail.

Recipients: a client account's ``contacts`` and the active portal users mapped to it (each
address once: :mod:`engine.notify.recipients`); the tenant's ``operators`` for its wallet, a
buyer's failing webhook and a buyer's return. What each gets is
:func:`engine.notify.compose.compose`'s: the tenant's own template of the kind, nothing for
a recipient who turned the kind's category off, an unsubscribe link.
The group starts at the end of a stream (:meth:`NotifyWorker.start_group`): events from
before a tenant's first notify worker are not mailed.
Only tenants with a transport are read (:func:`transport_for`: ``[tenants.notify.smtp]`` or
``[tenants.notify.sendgrid]``); the others send no e-mail. Each send is reported to the
worker's observer (:data:`NotifyObserver`; engine.run wires it to the metrics): ``sent``,
``failed`` (tried again later) or ``dead_lettered`` (refused for good, or the entry's last
delivery), with the transport's channel and the message kind.

It sends ``balance_alert``, ``balance_negative``, ``funding_received``,
``refund_processed`` and ``cap_reached`` to the account's recipients; ``account_paused`` /
``account_resumed`` for an account paused or resumed as a whole (not a ``buyer_paused`` of
reason ``manual`` nor a ``buyer_resumed`` with a ``buyer``: one buyer by hand); a client's
``recharge_succeeded`` (with the card fee of its charge attempt, read by the event's
``ref``), and ``recharge_failed`` as ``daily_cap_reached`` (reason ``daily_cap``),
``recharge_declined`` (every card the attempt tried declined) or ``recharge_failed`` (the
reason in words; one not known is not shown). The card's last 4 digits and a next attempt
are not known here: the default templates leave them out. ``webhook_failing`` goes to the
tenant's operators (whatever account it names). A buyer's return (``lead_returned``) is
two messages (:func:`messages`): ``return_requested`` to the tenant's operators and
``return_decided`` (granted: returns are decided when they are made) to the client's
contacts. Every other event is acked without a message. The event types and their fields:
docs/events.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from billing.archive import Archive
from billing.attempts import ChargeAttempt, load_attempt
from engine.core import keys, money
from engine.core.config import Config, Tenant, resolve_secret
from engine.core.constants import WALLET
from engine.notify import NotifyError
from engine.notify.compose import compose
from engine.notify.outbox import Outbox, SendOutcome
from engine.notify.recipients import PortalAddresses, audience, portal_addresses
from engine.notify.recipients import client as find_client
from engine.notify.sendgrid import SendGridSettings, SendGridTransport
from engine.notify.transport import SmtpSettings, SmtpTransport, Transport
from engine.notify.weekly import WeeklyReports
from engine.store.store import UNAVAILABLE, Store, is_cluster
from engine.store.streams import Batch, Fields, Reader, StreamConsumer

log = logging.getLogger("leadflow.notify")

GROUP: Final = "notify"
MAX_DELIVERIES: Final = 20  # with the minute's claim: about 20 minutes of a server down
CURRENCY: Final = "USD"

_PAUSE_REASONS: Final[dict[str, str]] = {
    "floor": "the balance reached its floor",
    "min_balance": "the balance is under the minimum",
}
# a failed recharge's reason (billing/recharge.py) as the client reads it; any other reason
# (an attempt's state, an error's text) is not shown: it may hold internals
_RECHARGE_REASONS: Final[dict[str, str]] = {
    "all_cards_failed": "no card on file could be charged",
    "authentication_required": "the card's bank asks you to confirm the payment",
    "no_payment_method": "there is no card on file",
}
_RECHARGE_UNKNOWN: Final = "the payment could not be completed"
# a funding's method (adjust.lua's funding_received) in words
_FUNDING_METHODS: Final[dict[str, str]] = {"card": "card payment", "manual": "manual credit"}
# a return's reason (engine.api.accounts.RETURN_REASONS) in words
_RETURN_REASONS: Final[dict[str, str]] = {
    "disconnected_phone": "disconnected phone number",
    "wrong_number": "wrong number",
    "outside_us_canada": "outside the US and Canada",
    "third_party_submission": "submitted by a third party",
}
_RECHARGE_EVENTS: Final = frozenset({b"recharge_succeeded", b"recharge_failed"})
_DECLINE_CODE: Final = re.compile(r"[a-z][a-z_]{0,40}")

# (outcome: "sent", "failed" or "dead_lettered"; the transport's channel; the message kind)
NotifyObserver = Callable[[str, str, str], None]


@dataclass(frozen=True, slots=True)
class Message:
    """What an event becomes: a kind, its template context and who receives it."""

    kind: str
    context: dict[str, Any]
    recipients: tuple[str, ...]


def _text(fields: Fields, name: str) -> str:
    return fields.get(name.encode(), b"").decode("utf-8", "replace")


def _int(fields: Fields, name: str, what: str) -> int:
    raw = _text(fields, name)
    try:
        return int(raw)
    except ValueError as exc:
        raise NotifyError(f"event field {name}: {raw!r} is not {what}") from exc


def _micros(fields: Fields, name: str) -> int:
    return _int(fields, name, "an amount in micros")


def _minimum(cfg: Config, tenant: Tenant, account: str) -> int:
    """The balance an account paused for its floor or minimum resumes at (as the Lua does:
    its minimum, not below 0)."""
    client = find_client(cfg, tenant.id, account)
    raw = client.min_balance if client is not None else tenant.wallet.min_balance
    return max(money.parse(raw, field="min_balance") if raw is not None else 0, 0)


def _declined(attempt: ChargeAttempt | None) -> str | None:
    """Why the attempt's cards were declined, when every card it tried was; else None."""
    if attempt is None or not attempt.cards \
            or any(c.state != "declined" for c in attempt.cards):
        return None
    if len(attempt.cards) > 1:
        return "every card on file was declined"
    code = attempt.cards[0].code
    return code.replace("_", " ") if _DECLINE_CODE.fullmatch(code) else "declined by the bank"


def _recharge(etype: str, fields: Fields, context: dict[str, Any],
              attempt: ChargeAttempt | None) -> str:
    """The kind of a recharge event, its context filled in from the event and, when read,
    its charge attempt (the fee; whether the cards were declined)."""
    context.update(amount=_micros(fields, "amount"), balance=_micros(fields, "balance"))
    if etype == "recharge_succeeded":
        # the card paid amount + fee; the fee is 0 when the attempt could not be read
        context["fee"] = attempt.fee if attempt is not None else 0
        return "recharge_succeeded"
    reason = _text(fields, "reason")
    if reason == "daily_cap":
        return "daily_cap_reached"
    declined = _declined(attempt) if reason == "all_cards_failed" else None
    if declined is not None:
        context["reason"] = declined
        return "recharge_declined"
    context["reason"] = _RECHARGE_REASONS.get(reason, _RECHARGE_UNKNOWN)
    return "recharge_failed"


def _count(fields: Fields, name: str) -> int:
    return _int(fields, name, "a count")


def _words(code: str, known: Mapping[str, str]) -> str:
    """A reason code as the reader reads it: known words, else the code's own words when it
    is a plain code (nothing else: it may hold internals)."""
    if code in known:
        return known[code]
    return code.replace("_", " ") if _DECLINE_CODE.fullmatch(code) else "not given"


def _returned(context: dict[str, Any], fields: Fields, recipients: tuple[str, ...],
              operators: tuple[str, ...]) -> list[Message]:
    """A buyer's return (``lead_returned``, granted and refunded when it is made): the
    tenant's operators are told it was asked for (``return_requested``), the client's
    contacts that it was granted (``return_decided``)."""
    reason = _words(_text(fields, "reason").removeprefix("return: "), _RETURN_REASONS)
    context.update(lead_id=_text(fields, "lead_id"), buyer_name=_text(fields, "buyer"),
                   amount=_micros(fields, "amount"), reason=reason)
    out = []
    if operators:
        out.append(Message("return_requested", dict(context), operators))
    if recipients:
        out.append(Message("return_decided", {
            **context, "granted": True,
            "explanation": f"Reason given: {reason}. A return for an approved reason within "
                           "the return window is granted at once."}, recipients))
    return out


def messages(cfg: Config, tenant_id: str, fields: Fields,
             attempt: ChargeAttempt | None = None, portal: Sequence[str] = ()
             ) -> list[Message]:
    """The messages of an events entry: none (another type, an account no longer
    configured, nobody to tell), one, or, for a buyer's return, one to the tenant's
    operators and one to the client's recipients (its contacts and ``portal``, the
    addresses of its portal users: :func:`engine.notify.recipients.audience`). ``attempt``
    is the charge attempt a recharge event refers to (its ``ref``), when it could be read.
    Raises NotifyError for a malformed entry."""
    etype, account = _text(fields, "type"), _text(fields, "account")
    tenant = cfg.tenant(tenant_id)
    operators = tuple(tenant.notify.operators)
    who = audience(cfg, tenant_id, account, portal)
    if who is not None:
        name, recipients = who.name, who.recipients
    elif etype == "webhook_failing":  # the tenant's own concern: its client may be gone
        name, recipients = account, ()
    else:
        return []
    context: dict[str, Any] = {"tenant_name": tenant.name or tenant.id, "client_name": name,
                               "account_id": account, "currency": CURRENCY}
    if etype == "webhook_failing":  # the tenant's operators, not the client
        if not operators:
            return []
        context.update(buyer_name=_text(fields, "buyer"), host=_text(fields, "host"),
                       failures=_count(fields, "failures"),
                       last_error=_text(fields, "error") or "unknown")
        return [Message("webhook_failing", context, operators)]
    if etype == "lead_returned":
        return _returned(context, fields, recipients, operators)
    if not recipients:
        return []
    one = _message(etype, account, fields, context, recipients, cfg, tenant, attempt)
    return [one] if one is not None else []


def message(cfg: Config, tenant_id: str, fields: Fields,
            attempt: ChargeAttempt | None = None) -> Message | None:
    """The first of :func:`messages` (the only one but for a buyer's return), or None."""
    out = messages(cfg, tenant_id, fields, attempt)
    return out[0] if out else None


def _message(etype: str, account: str, fields: Fields, context: dict[str, Any],
             recipients: tuple[str, ...], cfg: Config, tenant: Tenant,
             attempt: ChargeAttempt | None) -> Message | None:
    """The message of an event told to the account's own recipients, or None."""
    if etype == "balance_alert":
        context.update(balance=_micros(fields, "balance"),
                       threshold=_micros(fields, "threshold"))
        return Message("balance_alert", context, recipients)
    if etype == "balance_negative":
        context.update(balance=_micros(fields, "balance"), floor=_micros(fields, "floor"))
        return Message("balance_negative", context, recipients)
    if etype == "funding_received":
        method = _text(fields, "method")
        context.update(amount=_micros(fields, "amount"), balance=_micros(fields, "balance"),
                       method=_FUNDING_METHODS.get(method, "payment"))
        return Message("funding_received", context, recipients)
    if etype == "refund_processed":
        context.update(amount=_micros(fields, "amount"), balance=_micros(fields, "balance"))
        return Message("refund_processed", context, recipients)
    if etype == "cap_reached":
        context.update(buyer_name=_text(fields, "buyer"), cap=_count(fields, "cap"),
                       window=_text(fields, "window"))
        return Message("cap_reached", context, recipients)
    if etype in ("recharge_succeeded", "recharge_failed"):
        if account == WALLET:
            return None
        return Message(_recharge(etype, fields, context, attempt), context, recipients)
    if etype == "buyer_paused":
        reason = _text(fields, "reason")
        if reason == "manual":  # one buyer paused by hand (buyer_pause.lua): not the account
            return None
        # (an account paused at its floor by a lead names the buyer whose sale found it)
        context.update(balance=_micros(fields, "balance"),
                       reason=_PAUSE_REASONS.get(reason, reason),
                       minimum=_minimum(cfg, tenant, account))
        return Message("account_paused", context, recipients)
    if etype == "buyer_resumed":
        if fields.get(b"buyer"):  # one buyer resumed by hand: not the account
            return None
        context.update(balance=_micros(fields, "balance"))
        return Message("account_resumed", context, recipients)
    return None


def smtp_transport(tenant: Tenant) -> SmtpTransport | None:
    """The tenant's SMTP transport (its password resolved), or None without ``smtp``."""
    s = tenant.notify.smtp
    if s is None:
        return None
    password = resolve_secret(s.password) if s.password is not None else None
    return SmtpTransport(SmtpSettings(host=s.host, port=s.port, sender=s.sender,
                                      security=s.security, username=s.username,
                                      password=password, timeout_s=s.timeout_s))


def transport_for(tenant: Tenant) -> Transport | None:
    """The tenant's transport: SendGrid's API with ``sendgrid`` (its key resolved), SMTP
    with ``smtp``, None with neither (no e-mail). Both is a config error (config check)."""
    g = tenant.notify.sendgrid
    if g is None:
        return smtp_transport(tenant)
    if tenant.notify.smtp is not None:
        raise NotifyError(f"tenant {tenant.id}: notify has smtp and sendgrid; one of them")
    return SendGridTransport(SendGridSettings(api_key=resolve_secret(g.api_key),
                                              sender=g.sender, base_url=g.base_url,
                                              timeout_s=g.timeout_s))


def _dead_letter_key(tenant: str) -> str:
    return keys.dead_letter(tenant, "events")


class NotifyWorker:
    """The tenants' outboxes and this member of the ``notify`` group."""

    def __init__(self, cfg: Config, store: Store, transports: Mapping[str, Transport], *,
                 consumer: str, claim_idle_ms: int = 60_000, claim_every_ms: int = 5_000,
                 block_ms: int | None = 1_000, max_deliveries: int = MAX_DELIVERIES,
                 retry_base_ms: int = 30_000, retry_max_ms: int = 3_600_000,
                 claim_ms: int = 120_000,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 observer: NotifyObserver | None = None,
                 portal: PortalAddresses | None = None) -> None:
        self.cfg = cfg
        self.clock_ms = clock_ms
        self.observer = observer
        self.portal = portal  # the addresses of a client's portal users (identity store)
        self.outboxes = {t: Outbox(store.redis, t, tr, claim_ms=claim_ms,
                                   retry_base_ms=retry_base_ms, retry_max_ms=retry_max_ms,
                                   clock_ms=clock_ms)
                         for t, tr in transports.items()}
        self.events = StreamConsumer(
            store.redis, GROUP, consumer, {keys.events(t): t for t in transports},
            count=50, block_ms=block_ms, claim_idle_ms=claim_idle_ms,
            claim_every_ms=claim_every_ms, dead_letter=_dead_letter_key,
            max_deliveries=max_deliveries)

    async def handle(self, tenant: str, entry_id: str, fields: Fields) -> bool:
        """Send the entry's message; True when the entry is done (acked or
        dead-lettered), False when it stays pending for a later claim."""
        stream = keys.events(tenant)
        attempt = await self._attempt(tenant, fields)
        # read on every delivery of the entry: a user disabled or deleted since gets nothing
        # (a failure, SQL down, leaves the entry pending for a later claim)
        portal = await portal_addresses(self.portal, self.cfg, tenant,
                                        _text(fields, "account"))
        try:
            # each recipient's message: the tenant's template, its preferences, its link
            sends = [(msg, await compose(self.events.redis, tenant, msg.kind, msg.context,
                                         msg.recipients,
                                         public_url=self.cfg.settings.public_url))
                     for msg in messages(self.cfg, tenant, fields, attempt, portal)]
        except NotifyError as exc:
            await self.events.dead_letter(tenant, stream, entry_id, fields, str(exc))
            log.error("notify: event %s of %s dead-lettered: %s", entry_id, tenant, exc)
            return True
        if not sends:
            await self.events.ack(stream, entry_id)
            return True
        outbox = self.outboxes[tenant]
        errors: list[tuple[str, str]] = []  # (kind, error) of each failed send
        dead: list[str] = []
        busy = False
        for msg, mail in sends:  # (entry, recipient, kind): each message sent once
            for recipient in msg.recipients:
                rendered = mail.get(recipient)
                if rendered is None:  # the recipient turned this category off: done
                    continue
                _, retry_at = await outbox.tries(entry_id, recipient, msg.kind)
                if retry_at is not None and self.clock_ms() < retry_at:
                    busy = True  # its backoff is not over: a later claim sends it
                    continue
                result = await outbox.send(entry_id, recipient, msg.kind, rendered)
                if result.outcome is SendOutcome.SENT:
                    self._observe("sent", outbox, msg.kind)
                elif result.outcome is SendOutcome.FAILED:
                    errors.append((msg.kind, result.error or "failed"))
                elif result.outcome is SendOutcome.DEAD:
                    dead.append(f"{result.entry}: {result.error or 'refused'}")
                    self._observe("dead_lettered", outbox, msg.kind)
                elif result.outcome is SendOutcome.IN_FLIGHT:
                    busy = True
        if errors:
            error = "; ".join(dead + [e for _, e in errors])
            given_up = await self.events.give_up(tenant, stream, entry_id, fields, error)
            for kind, _ in errors:
                self._observe("dead_lettered" if given_up else "failed", outbox, kind)
            if given_up:
                log.error("notify: event %s of %s dead-lettered: %s", entry_id, tenant, error)
                return True
        pending = bool(errors) or busy
        if dead:  # refused for good: dead-lettered now, acked unless others are pending
            error = "; ".join(dead)
            await self.events.dead_letter(tenant, stream, entry_id, fields, error,
                                          ack=not pending)
            log.error("notify: event %s of %s dead-lettered: %s", entry_id, tenant, error)
            return not pending
        if pending:
            return False
        await self.events.ack(stream, entry_id)
        return True

    def _observe(self, outcome: str, outbox: Outbox, kind: str) -> None:
        if self.observer is not None:
            self.observer(outcome, outbox.transport.channel, kind)

    async def _attempt(self, tenant: str, fields: Fields) -> ChargeAttempt | None:
        """The charge attempt of a recharge event (its ``ref``), or None: another event, an
        attempt expired or unreadable (the message then says only what the event does)."""
        ref = _text(fields, "ref")
        if fields.get(b"type") not in _RECHARGE_EVENTS or not ref:
            return None
        try:
            return await load_attempt(self.events.redis, tenant, ref)
        except msgspec.MsgspecError:
            log.warning("notify: charge attempt of event of %s unreadable", tenant)
            return None

    async def _guarded(self, tenant: str, stop: asyncio.Event, entry_id: str,
                       fields: Fields) -> None:
        """One entry; a failure (Redis down) is logged, the entry stays pending, and the
        tenant's next entry waits a second."""
        try:
            await self.handle(tenant, entry_id, fields)
        except Exception as exc:  # noqa: BLE001 - logged; the worker goes on
            _failed_entry(tenant, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _drain(self, tenant: str, q: asyncio.Queue[tuple[str, Fields] | None],
                     stop: asyncio.Event) -> None:
        while (item := await q.get()) is not None:
            await self._guarded(tenant, stop, *item)

    async def _consume(self, stop: asyncio.Event) -> None:
        """Read until ``stop`` is set. One Redis: one blocking read over every tenant's
        stream, each entry handed to its tenant's queue and sent by that tenant's own
        task, so a slow or hanging SMTP server of one tenant holds up no other's mail. A
        Redis Cluster: one reader per tenant already (a read over several slots is
        refused), which sends what it read before it reads again."""
        per_tenant = is_cluster(self.events.redis)
        queues: dict[str, asyncio.Queue[tuple[str, Fields] | None]] = (
            {} if per_tenant else {t: asyncio.Queue() for t in self.events.streams.values()})
        drains = [asyncio.create_task(self._drain(t, q, stop)) for t, q in queues.items()]

        async def handle(reader: Reader, batches: list[Batch]) -> int:
            taken = 0
            for batch in batches:
                if batch.gone:  # deleted while pending: nothing left to send
                    await self.events.ack(batch.stream, *batch.gone)
                q = queues.get(batch.tenant)
                for entry_id, fields in batch.entries:
                    if q is not None:
                        q.put_nowait((entry_id, fields))
                    else:
                        await self._guarded(batch.tenant, stop, entry_id, fields)
                taken += len(batch.entries)
            return taken

        try:
            await self.events.run(stop, handle, survive=(Exception,), on_error=_failed)
        finally:
            for q in queues.values():
                q.put_nowait(None)  # each task sends what it holds, then ends
            await asyncio.gather(*drains)

    async def start_group(self) -> None:
        """Create the ``notify`` group where it does not exist yet at the stream's end
        (``$``), not at its start as the other groups are: a tenant that turns e-mail on
        is not sent every alert its stream still holds. (A group lost under a running
        worker is made again from ``0`` by the consumer, which then sends what the outbox
        has not sent.)"""
        await self.events.ensure(start="$")

    async def run(self, stop: asyncio.Event) -> None:
        """Read, send and ack until ``stop`` is set; a pass that fails (Redis down) is
        tried again a second later (its entries stay pending)."""
        await self.start_group()
        await self._consume(stop)


def _failed(reader: Reader, exc: Exception) -> None:
    """A failed pass: logged; the consumer tries again a second later, and its entries
    stay pending (nothing is lost). The worker outlives one bad pass."""
    if isinstance(exc, UNAVAILABLE):
        log.warning("notify worker: %s; retrying", type(exc).__name__)
    else:
        log.error("notify worker: pass failed", exc_info=exc)


def _failed_entry(tenant: str, exc: Exception) -> None:
    """An entry that failed (not its send: Redis): logged by its class or trace only."""
    if isinstance(exc, UNAVAILABLE):
        log.warning("notify worker (%s): %s; retrying", tenant, type(exc).__name__)
    else:
        log.error("notify worker (%s): entry failed", tenant, exc_info=exc)


async def run_notify_worker(cfg: Config, store: Store, *, consumer: str, stop: asyncio.Event,
                            archive: Archive | None = None,
                            transports: Mapping[str, Transport] | None = None,
                            claim_idle_ms: int = 60_000, claim_every_ms: int = 5_000,
                            retry_base_ms: int = 30_000, retry_max_ms: int = 3_600_000,
                            claim_ms: int = 120_000,
                            observer: NotifyObserver | None = None,
                            portal: PortalAddresses | None = None) -> None:
    """The notification worker of every tenant with a transport (:func:`transport_for`), or
    of the tenants in ``transports``, each with its own (``leadflow demo``'s in-memory one),
    and with ``archive`` (the ledger's SQL side) their weekly reports
    (:mod:`engine.notify.weekly`); without any such tenant, one log line and nothing to
    do. ``portal``: the addresses of a client's portal users, recipients of its messages
    beside its contacts. The transports it opened are closed when it ends."""
    opened: dict[str, Transport] = {}
    if transports is None:
        opened = {t.id: tr for t in cfg.tenants if (tr := transport_for(t)) is not None}
        transports = opened
    skipped = [t.id for t in cfg.tenants if t.id not in transports]
    if skipped:
        log.info("notify worker: no smtp or sendgrid, no e-mail for %s", ", ".join(skipped))
    if not transports:
        return
    try:
        worker = NotifyWorker(cfg, store, transports, consumer=consumer,
                              claim_idle_ms=claim_idle_ms, claim_every_ms=claim_every_ms,
                              retry_base_ms=retry_base_ms, retry_max_ms=retry_max_ms,
                              claim_ms=claim_ms, observer=observer, portal=portal)
        if archive is None:
            await worker.run(stop)
            return
        weekly = WeeklyReports(cfg, store, archive, worker.outboxes, clock_ms=worker.clock_ms,
                               observer=observer, portal=portal)
        await asyncio.gather(worker.run(stop), weekly.run(stop))
    finally:
        for transport in opened.values():
            await transport.close()


__all__ = ["GROUP", "MAX_DELIVERIES", "Message", "NotifyObserver", "NotifyWorker", "message",
           "messages", "run_notify_worker", "smtp_transport", "transport_for"]

"""Sending a rendered message: the :class:`Transport` protocol and SMTP through aiosmtplib.

A message is a multipart/alternative e-mail (the text part first, the HTML part second, so a
client shows the last one it can), built with :class:`email.message.EmailMessage`; one with
an unsubscribe link carries it as ``List-Unsubscribe`` with ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` (RFC 8058: the mail client POSTs to it, one click). Its
``Message-ID`` is derived from the outbox key, so a message sent again after a crash carries
the same id and a receiving system may recognise the duplicate.

A transport names its ``channel`` (``smtp``, ``sendgrid``: the metrics' label). A failure
is a :class:`~engine.notify.TransportError`, tried again after the outbox's backoff, or a
:class:`~engine.notify.PermanentTransportError` when the server refused the message for
good (SMTP: a 5xx reply to RCPT or DATA), which the outbox does not retry.

The password is kept out of ``repr`` and out of every log line and error message.
"""

from __future__ import annotations

import email.errors
import email.headerregistry
import email.policy
import logging
import re
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Final, Literal, Protocol

import aiosmtplib

from engine.notify import NotifyError, PermanentTransportError, TransportError
from engine.notify.templates import Rendered

log = logging.getLogger(__name__)

Security = Literal["starttls", "tls", "plain"]
# the channels a message goes out by (a transport's ``channel``; the metrics pre-create them)
CHANNELS: Final[tuple[str, ...]] = ("smtp", "sendgrid")


class Transport(Protocol):
    """What the outbox sends through: SMTP (:class:`SmtpTransport`) or SendGrid's API
    (:class:`engine.notify.sendgrid.SendGridTransport`)."""

    @property
    def channel(self) -> str:
        """The channel's name, one of :data:`CHANNELS` (a label of the notify metrics)."""
        ...

    async def send(self, recipient: str, message: Rendered, *, key: str) -> None:
        """Send ``message`` to ``recipient``; ``key`` is the outbox entry (the Message-ID).
        Raises TransportError (retried later) or PermanentTransportError (refused for
        good)."""
        ...

    async def close(self) -> None:
        """Release what the transport holds (connections); the worker's last call."""
        ...


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Where and how to reach the SMTP server.

    ``security``: ``starttls`` (upgrade a plain connection, required), ``tls`` (TLS from the
    first byte, usually port 465) or ``plain`` (no TLS: a local relay or tests only).
    """

    host: str
    port: int
    sender: str  # the From address, e.g. "Acme Leads <billing@acme.example>"
    security: Security = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    tls_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)


class _Unfolded(email.headerregistry.UnstructuredHeader, email.headerregistry.BaseHeader):
    """A header written on one line: the default policy folds a line over 78 characters
    without a space into RFC 2047 encoded words, and a ``List-Unsubscribe`` URL encoded
    that way is no URL to a mail client (RFC 2369: no whitespace inside the brackets)."""

    def fold(self, *, policy: email.policy.Policy) -> str:
        return f"{self.name}: {self}{policy.linesep}"


_HEADERS = email.headerregistry.HeaderRegistry()
_HEADERS.map_to_type("list-unsubscribe", _Unfolded)
_POLICY: Final = email.policy.default.clone(header_factory=_HEADERS)
# printable ASCII without spaces or angle brackets, within RFC 5322's 998-octet line
_HEADER_URL: Final = re.compile(r"https?://[!-;=?-~]{1,900}")


def message_id(key: str, sender: str) -> str:
    """The Message-ID of outbox entry ``key``: ``<notify.KEY@sender's domain>``."""
    domain = sender.rpartition("@")[2].strip().rstrip(">").strip() or "leadflow.invalid"
    return f"<notify.{key}@{domain}>"


def unsubscribe_headers(message: Rendered) -> dict[str, str]:
    """``List-Unsubscribe`` (RFC 2369) and RFC 8058's one click, when ``message`` has an
    unsubscribe link; every transport sends them. ValueError for a URL that is not a plain
    http(s) one."""
    if message.unsubscribe_url is None:
        return {}
    if not _HEADER_URL.fullmatch(message.unsubscribe_url):
        raise ValueError("the unsubscribe URL is not a plain http(s) URL")
    return {"List-Unsubscribe": f"<{message.unsubscribe_url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def build_message(sender: str, recipient: str, message: Rendered, *, key: str) -> EmailMessage:
    """The multipart text+HTML e-mail of ``message``; raises NotifyError for a bad header."""
    msg = EmailMessage(policy=_POLICY)
    try:
        msg["From"] = sender
        msg["To"] = recipient
        msg["Subject"] = message.subject
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = message_id(key, sender)
        for name, value in unsubscribe_headers(message).items():
            msg[name] = value
    except (ValueError, email.errors.HeaderParseError) as exc:
        raise NotifyError(f"cannot build the message to {recipient!r}: {exc}") from exc
    msg.set_content(message.text)
    msg.add_alternative(message.html, subtype="html")
    return msg


def _smtp_permanent(exc: Exception) -> bool:
    """A 5xx reply to RCPT (every recipient refused) or to DATA: the server refuses this
    message for good. Anything else (no connection, a timeout, 4xx, a refused login or
    sender, which a config fix mends) is tried again."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(r.code >= 500 for r in exc.recipients)
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError):
        return exc.code >= 500
    return False


def _smtp_code(exc: Exception) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        return exc.recipients[0].code
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


class SmtpTransport:
    """Sends over SMTP with aiosmtplib, one connection per message."""

    channel: Final = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        if settings.security not in ("starttls", "tls", "plain"):
            raise NotifyError(f"smtp security: {settings.security!r} is not starttls, tls "
                              "or plain")
        if (settings.username is None) != (settings.password is None):
            raise NotifyError("smtp: a username needs a password, and a password a username")
        if settings.timeout_s <= 0:
            raise NotifyError("smtp timeout: must be more than 0 seconds")
        self.settings = settings

    def __repr__(self) -> str:
        s = self.settings
        return f"SmtpTransport({s.host}:{s.port}, {s.security})"

    async def send(self, recipient: str, message: Rendered, *, key: str) -> None:
        s = self.settings
        msg = build_message(s.sender, recipient, message, key=key)
        try:
            await aiosmtplib.send(
                msg,
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password,
                use_tls=s.security == "tls",
                start_tls=s.security == "starttls",
                tls_context=s.tls_context,
                timeout=s.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            # the class and the SMTP reply code only: a server's reply text can name the
            # recipient (personal data stays out of logs and dead letters)
            code = _smtp_code(exc)
            reason = type(exc).__name__ + (f" {code}" if code is not None else "")
            permanent = _smtp_permanent(exc)
            log.warning("smtp %s:%s: sending %s failed%s: %s", s.host, s.port,
                        msg["Message-ID"], " for good" if permanent else "", reason)
            error = PermanentTransportError if permanent else TransportError
            raise error(f"smtp {s.host}:{s.port}: {reason}") from exc
        log.info("smtp %s:%s: sent %s", s.host, s.port, msg["Message-ID"])

    async def close(self) -> None:
        """Nothing held: one connection per message."""

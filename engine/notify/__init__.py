"""E-mail notifications (issue #19): the message kinds and their templates, rendered in
Jinja2's sandbox (:mod:`engine.notify.templates`), the transports (SMTP:
:mod:`engine.notify.transport`; SendGrid's v3 API: :mod:`engine.notify.sendgrid`) and the
exactly-once outbox (:mod:`engine.notify.outbox`).

It sits beside ``engine.routing`` and ``engine.delivery`` and imports only ``engine.core``,
``engine.store`` and ``billing``.
"""

from __future__ import annotations

from engine.core.errors import LeadflowError


class NotifyError(LeadflowError):
    """A notification could not be rendered or sent."""


class TemplateError(NotifyError):
    """A template is refused: syntax error, unknown variable, sandbox violation, too large.

    ``kind`` is the message kind and ``part`` the template (``subject``, ``text``, ``html``).
    """

    def __init__(self, kind: str, part: str, reason: str) -> None:
        self.kind, self.part, self.reason = kind, part, reason
        super().__init__(f"{kind}.{part}: {reason}")


class TransportError(NotifyError):
    """The mail server could not be reached, or refused the message (for now: the outbox
    tries again after its backoff)."""


class PermanentTransportError(TransportError):
    """The mail server or API refused the message for good (a mailbox that does not exist,
    a request the API will never accept): sending it again would fail the same way, so the
    outbox marks the entry dead instead of retrying it."""

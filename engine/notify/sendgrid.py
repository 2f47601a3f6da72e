"""Sending through SendGrid's v3 Web API instead of SMTP: ``POST {base_url}/v3/mail/send``.

The request, as SendGrid documents it: ``Authorization: Bearer <API key>``, a JSON body with
one personalization per message (``personalizations: [{"to": [{"email": ...}]}]``), ``from``
(``{"email", "name"}``, the configured sender parsed with :func:`email.utils.parseaddr`),
``subject``, ``content`` with ``text/plain`` first and ``text/html`` second (the order
SendGrid requires), ``headers`` with the ``Message-ID`` derived from the outbox entry
(:func:`engine.notify.transport.message_id`, the same as over SMTP) and ``custom_args``
with the outbox entry (it comes back in SendGrid's event webhooks). ``202 Accepted``: sent.

Answers: any 2xx is sent; 429, 408, 5xx, another answer the client does not expect (3xx),
a network error or a timeout is a :class:`~engine.notify.TransportError` (tried again after
the outbox's backoff); any other 4xx (400 a request SendGrid refuses, 401/403 a key
refused, 413 too large) is a :class:`~engine.notify.PermanentTransportError`: the outbox
marks the entry dead instead of trying it again.

The API key is kept out of ``repr`` and out of every log line and error message, and so
are the addresses: a failure is told by its class or HTTP status, and the field names of
SendGrid's error answer (``personalizations.0.to.0.email``), never its messages, which may
quote the address.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import msgspec

from engine.notify import NotifyError, PermanentTransportError, TransportError
from engine.notify.templates import Rendered
from engine.notify.transport import message_id, unsubscribe_headers

log = logging.getLogger(__name__)

SENDGRID_API: Final = "https://api.sendgrid.com"
MAIL_SEND: Final = "/v3/mail/send"
ENTRY_ARG: Final = "leadflow_entry"  # the custom_args key of the outbox entry
_RETRIED: Final = frozenset({408, 429})  # the 4xx answers tried again
_FIELD: Final = re.compile(r"[A-Za-z0-9_.\[\]-]{1,80}")  # an error's field path, not text
_MAX_FIELDS: Final = 5
_MAX_ERROR_BODY: Final = 64 * 1024


class _Error(msgspec.Struct):
    field: str | None = None


class _Errors(msgspec.Struct):
    errors: list[_Error] = []


@dataclass(frozen=True, slots=True)
class SendGridSettings:
    """The API key (resolved), the From address and where the API is."""

    api_key: str = field(repr=False)
    sender: str  # the From address, e.g. "Acme Leads <billing@acme.example>"
    base_url: str = SENDGRID_API  # the EU region: https://api.eu.sendgrid.com
    timeout_s: float = 30.0  # the whole request, connecting to the answer's last byte


class SendGridTransport:
    """Sends through SendGrid's mail send API, one request per message, over its own
    client session (opened at the first send, closed by :meth:`close`) or the one given."""

    channel: Final = "sendgrid"

    def __init__(self, settings: SendGridSettings, *,
                 session: aiohttp.ClientSession | None = None) -> None:
        if not settings.api_key or any(c in settings.api_key for c in " \r\n"):
            raise NotifyError("sendgrid api_key: empty, or holds spaces or line breaks")
        name, address = parseaddr(settings.sender)
        if not address or "@" not in address or any(c in settings.sender for c in "\r\n"):
            raise NotifyError("sendgrid sender: an e-mail address, or 'Name <address>'")
        parts = urlsplit(settings.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NotifyError("sendgrid base_url: not an http(s) URL with a host")
        if settings.timeout_s <= 0:
            raise NotifyError("sendgrid timeout: must be more than 0 seconds")
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + MAIL_SEND
        self._from: dict[str, str] = {"email": address, **({"name": name} if name else {})}
        self._session = session
        self._own = session is None

    def __repr__(self) -> str:
        return f"SendGridTransport({self.settings.base_url})"

    def payload(self, recipient: str, message: Rendered, *, key: str) -> dict[str, Any]:
        """The JSON body of the mail send request for ``message`` to ``recipient``, with the
        same unsubscribe headers as SMTP's (NotifyError for a bad unsubscribe URL)."""
        try:
            listed = unsubscribe_headers(message)
        except ValueError as exc:
            raise NotifyError(f"sendgrid: {exc}") from exc
        return {
            "personalizations": [{"to": [{"email": recipient}]}],
            "from": self._from,
            "subject": message.subject,
            "content": [{"type": "text/plain", "value": message.text},
                        {"type": "text/html", "value": message.html}],
            "headers": {"Message-ID": message_id(key, self.settings.sender), **listed},
            "custom_args": {ENTRY_ARG: key},
        }

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._own:
                raise NotifyError("sendgrid: the client session it was given is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    async def send(self, recipient: str, message: Rendered, *, key: str) -> None:
        mid = message_id(key, self.settings.sender)
        body = msgspec.json.encode(self.payload(recipient, message, key=key))
        headers = {"Authorization": f"Bearer {self.settings.api_key}",
                   "Content-Type": "application/json", "Accept": "application/json"}
        try:
            async with self._client().post(
                    self.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)) as resp:
                status = resp.status
                fields = await _error_fields(resp) if status >= 400 else []
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            # the class only: an exception's text may carry the request (its headers)
            reason = type(exc).__name__
            log.warning("sendgrid: sending %s failed: %s", mid, reason)
            raise TransportError(f"sendgrid: {reason}") from exc
        if 200 <= status < 300:
            log.info("sendgrid: sent %s (%s)", mid, status)
            return
        reason = f"HTTP {status}" + (f" ({', '.join(fields)})" if fields else "")
        permanent = 400 <= status < 500 and status not in _RETRIED
        log.warning("sendgrid: sending %s failed%s: %s", mid,
                    " for good" if permanent else "", reason)
        error = PermanentTransportError if permanent else TransportError
        raise error(f"sendgrid: {reason}")

    async def close(self) -> None:
        """Close the client session it opened (not one it was given)."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None


async def _error_fields(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``field`` paths of SendGrid's error answer (``{"errors": [{"field", "message"}]}``):
    names, not the messages, which may quote an address; [] for any other body."""
    try:
        raw = await resp.content.read(_MAX_ERROR_BODY)
        errors = msgspec.json.decode(raw, type=_Errors).errors
    except (aiohttp.ClientError, OSError, msgspec.MsgspecError):
        return []
    names = [e.field for e in errors if e.field is not None and _FIELD.fullmatch(e.field)]
    return list(dict.fromkeys(names))[:_MAX_FIELDS]


__all__ = ["ENTRY_ARG", "MAIL_SEND", "SENDGRID_API", "SendGridSettings", "SendGridTransport"]

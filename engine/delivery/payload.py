"""The outgoing request of one delivery, built from a buyer's :class:`Delivery` settings.

* ``template``: outgoing name -> value; ``{field}`` placeholders are replaced by the lead's
  normalized field values (a missing field becomes ``""``), ``{{``/``}}`` are literal braces,
  anything else is static text. Besides lead fields, ``{lead_id}``, ``{buyer}``,
  ``{campaign}`` and ``{price}`` (decimal) are available; a lead field of the same name wins.
  No template: every lead field is sent under its own name.
* ``format``: ``json`` (an object of strings) or ``form`` (urlencoded); ``method`` GET sends
  the fields as the query string and no body.
* ``headers``: custom headers; a value ``env:NAME`` is read from the environment. They are
  never logged and never written to the delivery log.

The signed content is the body, or for GET the query string (without ``?``).

The lead may come as the JSON object the engine stored with the sale (bytes): with no
template and a JSON POST/PUT, those bytes are sent as they are, because they already are
the object of strings this module would encode (the delivery worker's common case, and
worth a decode plus an encode per delivery).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec
from yarl import URL

from engine.core import money
from engine.core.config import Delivery, resolve_secret
from engine.delivery.signing import Signer, webhook_id

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(\w+)\}")
_json = msgspec.json.Encoder()
# a lead as the engine stores it with the sale (and the worker checks it is): an object of strings
stored_lead = msgspec.json.Decoder(dict[str, str])
_CONTENT_TYPE = {"json": "application/json", "form": "application/x-www-form-urlencoded"}


class WebhookRequest(msgspec.Struct, frozen=True, gc=False):
    method: str
    url: str | URL  # a URL (already normalized by yarl) when the query is signed (GET)
    headers: dict[str, str]
    body: bytes
    msg_id: str


def _render(template: str, values: Mapping[str, str]) -> str:
    if "{" not in template and "}" not in template:
        return template

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]
        return values.get(name, "")

    return _PLACEHOLDER.sub(sub, template)


class RequestBuilder:
    """Everything of one buyer's request that does not depend on the lead, resolved once."""

    __slots__ = ("_base_headers", "_parts", "_signer", "buyer", "delivery")

    def __init__(self, buyer: str, delivery: Delivery) -> None:
        self.buyer = buyer
        self.delivery = delivery
        self._signer = Signer(resolve_secret(delivery.secret))
        headers = {name: resolve_secret(value) for name, value in delivery.headers.items()}
        if delivery.method != "GET":
            headers.setdefault("Content-Type", _CONTENT_TYPE[delivery.format])
        self._base_headers = headers
        self._parts = urlsplit(delivery.url)

    def __repr__(self) -> str:  # the headers may hold secrets
        return f"RequestBuilder(buyer={self.buyer!r})"

    def fields(
        self, lead: Mapping[str, str], *, lead_id: str, campaign: str = "", price: int = 0
    ) -> dict[str, str]:
        """The outgoing name -> value mapping of one lead."""
        template = self.delivery.template
        if not template:
            return {str(k): str(v) for k, v in lead.items()}
        values = {"lead_id": lead_id, "buyer": self.buyer, "campaign": campaign,
                  "price": money.format(price), **lead}
        return {name: _render(value, values) for name, value in template.items()}

    def build(
        self,
        lead: Mapping[str, str] | bytes,
        *,
        lead_id: str,
        campaign: str = "",
        price: int = 0,
        timestamp: int,
    ) -> WebhookRequest:
        """The signed request of one attempt (``timestamp``: epoch seconds of the attempt).
        ``lead``: the field values, or the stored JSON object of them (see the module docs)."""
        d = self.delivery
        if isinstance(lead, bytes):
            if not d.template and d.format == "json" and d.method != "GET":
                return self._signed(d.url, lead, lead, lead_id, timestamp)
            lead = stored_lead.decode(lead)
        fields = self.fields(lead, lead_id=lead_id, campaign=campaign, price=price)
        url: str | URL = d.url
        if d.method == "GET":
            query = urlencode(fields)
            if self._parts.query:
                query = f"{self._parts.query}&{query}" if query else self._parts.query
            p = self._parts
            # yarl normalizes a query once (e.g. "%40" back to "@") and sends what it made of
            # it; signing that very text, and handing aiohttp the URL object, makes the
            # query the buyer receives the one that was signed
            url = URL(urlunsplit((p.scheme, p.netloc, p.path, query, p.fragment)))
            body, signed = b"", url.raw_query_string.encode()
        else:
            body = _json.encode(fields) if d.format == "json" else urlencode(fields).encode()
            signed = body
        return self._signed(url, body, signed, lead_id, timestamp)

    def _signed(self, url: str | URL, body: bytes, signed: bytes, lead_id: str,
                timestamp: int) -> WebhookRequest:
        msg_id = webhook_id(lead_id, self.buyer)
        headers = self._base_headers.copy()
        self._signer.add_headers(headers, msg_id, timestamp, signed)
        return WebhookRequest(self.delivery.method, url, headers, body, msg_id)

"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

Every request carries ``webhook-id``, ``webhook-timestamp`` (epoch seconds of the attempt)
and, when the buyer has a secret, ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``"{id}.{timestamp}.{content}"`` keyed with the base64-decoded part of a ``whsec_`` secret.
The id is deterministic per (lead, buyer), so every retry of one delivery carries the same
id and a buyer can de-duplicate on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from engine.delivery import DeliveryError

_PREFIX = "whsec_"


class SigningError(DeliveryError):
    """The webhook secret is not a valid ``whsec_`` base64 secret."""


def webhook_id(lead_id: str, buyer: str) -> str:
    """The message id of the delivery of ``lead_id`` to ``buyer``: the same on every retry."""
    return f"msg_{lead_id}_{buyer}"


def _decode_secret(secret: str) -> bytes:
    raw = secret.removeprefix(_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningError("webhook secret is not base64 (expected whsec_<base64>)") from exc
    if not key:
        raise SigningError("webhook secret is empty")
    return key


class Signer:
    """Signs delivery requests with one buyer's secret (an empty secret signs nothing)."""

    __slots__ = ("_key", "_mac")

    def __init__(self, secret: str) -> None:
        self._key = _decode_secret(secret) if secret else b""
        # keyed once; each signature copies it (saves re-deriving the padded keys)
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256) if self._key else None

    def __repr__(self) -> str:  # never show the key
        return f"Signer(signed={bool(self._key)})"

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def signature(self, msg_id: str, timestamp: int, content: bytes) -> str:
        """``v1,<base64>`` of ``{msg_id}.{timestamp}.{content}``."""
        if self._mac is None:
            raise SigningError("no webhook secret to sign with")
        mac = self._mac.copy()
        mac.update(b"%s.%d." % (msg_id.encode(), timestamp))
        mac.update(content)
        return "v1," + base64.b64encode(mac.digest()).decode("ascii")

    def headers(self, msg_id: str, timestamp: int, content: bytes) -> dict[str, str]:
        """The ``webhook-*`` headers of one attempt (``timestamp`` in epoch seconds)."""
        out = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self._key:
            out["webhook-signature"] = self.signature(msg_id, timestamp, content)
        return out

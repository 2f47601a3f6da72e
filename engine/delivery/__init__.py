"""Webhook delivery of sold leads to buyers: signing, request building, response verdicts,
circuit breakers and the stream worker. See docs/delivery.md."""

from __future__ import annotations

from engine.core.errors import LeadflowError


class DeliveryError(LeadflowError):
    """A buyer's delivery settings cannot be used (bad secret, template or rule)."""

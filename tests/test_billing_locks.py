"""The account lock and Stripe's idempotency conflicts, against redis + localstripe.

A charge is resumed by whoever holds the account's lock; these tests drive the
interleavings through the Charger's ``hook`` (a step awaits, or another worker acts there)
and the lock's ``renewed`` event: nothing here waits on a clock.
"""

from __future__ import annotations

import json
import uuid

import pytest
import stripe

from billing.errors import PaymentError, PaymentTransient
from billing.stripe_gateway import StripeGateway, _map

# -- Stripe's idempotency conflicts are "busy", never a decline -----------------------------

async def test_a_409_from_stripe_is_busy_not_a_card_failure(gateway: StripeGateway) -> None:
    """A real 409 through the real SDK: localstripe answers 409 for an id it already holds,
    as Stripe does for an idempotency key still in use by another request. That is
    "try again later" (a PaymentTransient), never a card failure that moves to a backup."""
    params = {"id": f"dup-{uuid.uuid4().hex}", "percent_off": 10, "duration": "once"}
    await gateway._call(gateway._client.v1.coupons.create, params=params)
    with pytest.raises(PaymentError) as err:
        await gateway._call(gateway._client.v1.coupons.create, params=params)
    assert isinstance(err.value, PaymentTransient)
    assert (err.value.code, err.value.status) == ("busy", 409)


def test_an_idempotency_error_is_busy_not_a_card_failure() -> None:
    """What the SDK raises for a key reused with other parameters (type idempotency_error)."""
    body = {"error": {"type": "idempotency_error", "message": "Keys for idempotent requests "
                      "can only be used with the same parameters they were first used with."}}
    exc = stripe.IdempotencyError(body["error"]["message"], json.dumps(body), 400, body, {})
    mapped = _map(exc)
    assert isinstance(mapped, PaymentTransient) and mapped.code == "busy"

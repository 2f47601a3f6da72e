"""A real localstripe server for the billing tests, and helpers around it.

localstripe (the PyPI package) is a stateful fake of the Stripe API. We start it on a free
port, with its pickle-to-/tmp persistence switched off (so parallel sessions never share
state), wait until it answers, and point the real ``stripe`` SDK at it.

Test cards (localstripe's rules): 4242424242424242 charges; 4000000000000341 attaches but
every charge is declined (card_declined); 4000002760003184 needs 3-D Secure
(authentication_required off-session); 4000000000000002 is declined at attach.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import stripe

from bench.localstripe import API_KEY, serve_localstripe
from billing.stripe_gateway import StripeGateway

VISA = "4242424242424242"
DECLINES = "4000000000000341"
NEEDS_AUTH = "4000002760003184"
ATTACH_DECLINED = "4000000000000002"



@dataclass
class LocalStripe:
    url: str
    client: stripe.StripeClient

    def card(self, number: str = VISA) -> str:
        """A new PaymentMethod id, as Stripe.js would hand it to the front end."""
        pm = self.client.v1.payment_methods.create(params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        })
        return str(pm.id)

    def intents(self, attempt: str | None = None, customer: str | None = None
                ) -> list[stripe.PaymentIntent]:
        """PaymentIntents (of one attempt / customer: localstripe is shared by the session)."""
        out, params = [], {"limit": 100}
        while True:
            page = self.client.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
            out += page.data
            if not page.has_more:
                break
            params = {"limit": 100, "starting_after": page.data[-1].id}  # type: ignore[dict-item]
        if attempt is not None:
            out = [p for p in out if p.metadata and p.metadata.to_dict().get("attempt") == attempt]
        if customer is not None:
            out = [p for p in out if p.customer == customer]
        return out


@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    with serve_localstripe() as url:
        client = stripe.StripeClient(API_KEY, base_addresses={"api": url},
                                     max_network_retries=0)
        yield LocalStripe(url=url, client=client)


@pytest.fixture(scope="session")
def gateway(localstripe: LocalStripe) -> StripeGateway:
    return StripeGateway(API_KEY, api_base=localstripe.url)

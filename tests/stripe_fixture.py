"""A real localstripe server for the billing tests, and helpers around it.

localstripe (the PyPI package) is a stateful fake of the Stripe API. We start it on a free
port, with its pickle-to-/tmp persistence switched off (so parallel sessions never share
state), wait until it answers, and point the real ``stripe`` SDK at it.

Test cards (localstripe's rules): 4242424242424242 charges; 4000000000000341 attaches but
every charge is declined (card_declined); 4000002760003184 needs 3-D Secure
(authentication_required off-session); 4000000000000002 is declined at attach.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import stripe

from billing.stripe_gateway import StripeGateway
from engine.embedded import free_port

API_KEY = "sk_test_leadflow_tests"
VISA = "4242424242424242"
DECLINES = "4000000000000341"
NEEDS_AUTH = "4000002760003184"
ATTACH_DECLINED = "4000000000000002"

_BOOT = (
    "import sys, localstripe.resources as r; r.Store.dump_to_disk = lambda self: None; "
    "from localstripe import server; server.start()"
)


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


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url + "/v1/customers",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("localstripe exited at start")
        try:
            with urllib.request.urlopen(req, timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"localstripe did not answer on {url}")


@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT, "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc)
        client = stripe.StripeClient(API_KEY, base_addresses={"api": url},
                                     max_network_retries=0)
        yield LocalStripe(url=url, client=client)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def gateway(localstripe: LocalStripe) -> StripeGateway:
    return StripeGateway(API_KEY, api_base=localstripe.url)

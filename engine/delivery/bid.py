"""Ping-post bids (docs/pingpost.md): one signed bid request to a ping buyer and the bid
read from its answer.

A ping buyer's ``ping.url`` gets the ping's fields as JSON (``ping_id``, ``campaign_id``,
the campaign's ping fields, ``test`` when a test ping), signed like webhooks (Standard
Webhooks: ``webhook-id`` is ``ping_<ping id>_<buyer>``). Its bid is the value at
``bid_path`` (a JSON path, as delivery verdict rules read them) or the first group (else
the whole match) of ``bid_regex`` (RE2), a decimal number of dollars. Anything else, a
status other than 2xx, a timeout, a closed connection or garbage is no bid: :func:`ask`
never raises for buyer-side problems.
"""

from __future__ import annotations

import decimal
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec

from engine.core import money
from engine.core.billing_errors import MoneyError
from engine.core.config import Ping, resolve_secret
from engine.core.regex import RegexError, compile_re2
from engine.delivery import DeliveryError
from engine.delivery.client import MAX_BODY_BYTES
from engine.delivery.signing import Signer, SigningError
from engine.delivery.verdict import _MISSING, _path_parts, json_path

_json = msgspec.json.Decoder(float_hook=decimal.Decimal)
_enc = msgspec.json.Encoder()


class BidReader:
    """A ping buyer's bid endpoint, resolved once (signer, headers, bid rule)."""

    __slots__ = ("_parts", "_regex", "headers", "signer", "timeout_ms", "url")

    def __init__(self, ping: Ping) -> None:
        if ping.url is None:
            raise DeliveryError("a bid reader needs a ping url")
        self.url = ping.url
        self.timeout_ms = ping.timeout_ms
        try:
            self.signer = Signer(resolve_secret(ping.secret))
        except SigningError as exc:
            raise DeliveryError(str(exc)) from exc
        self.headers = {k: resolve_secret(v) for k, v in ping.headers.items()}
        self.headers["content-type"] = "application/json"
        self._parts = _path_parts(ping.bid_path) if ping.bid_path else None
        try:
            self._regex = compile_re2(ping.bid_regex) if ping.bid_regex else None
        except RegexError as exc:
            raise DeliveryError(f"bid_regex: {exc}") from exc

    def __repr__(self) -> str:  # the URL may hold a secret
        return "BidReader(***)"

    def read(self, status: int, raw: bytes) -> int | None:
        """The bid (micros) of an answer, or None (no bid)."""
        if not 200 <= status < 300:
            return None
        value: Any
        if self._parts is not None:
            try:
                doc = _json.decode(raw)
            except (msgspec.DecodeError, ValueError, RecursionError):
                return None
            value = json_path(doc, self._parts)
            if value is _MISSING or isinstance(value, bool) or not isinstance(
                    value, int | str | decimal.Decimal):
                return None
        else:
            assert self._regex is not None
            m = self._regex.search(raw.decode("utf-8", "replace"))
            if m is None:
                return None
            value = m.group(1) if m.re.groups >= 1 else m.group(0)
            if value is None:
                return None
        try:
            bid = money.parse(str(value), field="bid")
        except MoneyError:
            return None
        return bid if bid > 0 else None


async def ask(session: aiohttp.ClientSession, reader: BidReader, *, ping_id: str, buyer: str,
              fields: Mapping[str, Any], timeout_ms: int) -> tuple[int | None, str, float]:
    """One bid request: (bid in micros or None, outcome, seconds). Outcome: ``bid`` |
    ``no_bid`` | ``timeout`` | ``error``."""
    body = _enc.encode(fields)
    headers = dict(reader.headers)
    reader.signer.add_headers(headers, f"ping_{ping_id}_{buyer}", int(time.time()), body)
    t0 = time.perf_counter()
    try:
        async with session.post(
            reader.url, data=body, headers=headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=max(timeout_ms, 1) / 1_000),
        ) as resp:
            raw = await resp.content.read(MAX_BODY_BYTES)
            status = resp.status
    except TimeoutError:
        return None, "timeout", time.perf_counter() - t0
    except (aiohttp.ClientError, OSError, ValueError):
        return None, "error", time.perf_counter() - t0
    bid = reader.read(status, raw)
    return bid, "bid" if bid is not None else "no_bid", time.perf_counter() - t0

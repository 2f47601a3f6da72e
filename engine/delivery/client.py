"""One HTTP attempt of one delivery: build, sign, send, read (bounded), classify.

:class:`Endpoint` holds everything of one buyer resolved once (request builder with its
secrets, compiled response rules); :func:`attempt` makes a single request on a shared
``aiohttp.ClientSession`` and never raises for buyer-side problems: timeouts, network and
protocol errors come back as a retryable :class:`DeliveryAttempt`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import aiohttp
import msgspec

from engine.core import money
from engine.core.config import Buyer, Delivery
from engine.delivery.payload import RequestBuilder
from engine.delivery.retry import parse_retry_after
from engine.delivery.verdict import ResponseMapper, Verdict, is_retryable

MAX_BODY_BYTES = 64 * 1024  # the most of a response body read (rules, price, excerpt)


class Endpoint:
    """A buyer's webhook: request builder and response rules, built once per process."""

    __slots__ = ("builder", "buyer", "delivery", "mapper", "tenant", "timeout")

    def __init__(self, buyer: Buyer) -> None:
        assert buyer.delivery is not None
        self.tenant, self.buyer = buyer.tenant, buyer.id
        self.delivery: Delivery = buyer.delivery
        self.builder = RequestBuilder(buyer.id, buyer.delivery)
        self.mapper = ResponseMapper(buyer.delivery, buyer_price=money.parse(buyer.price))
        self.timeout = aiohttp.ClientTimeout(total=max(buyer.delivery.timeout_ms, 1) / 1_000)

    def __repr__(self) -> str:
        return f"Endpoint({self.tenant!r}, {self.buyer!r})"


class DeliveryAttempt(msgspec.Struct, frozen=True, gc=False):
    """The result of one request. ``verdict`` None: retryable (see ``error``/``status``)."""

    msg_id: str
    status: int  # 0: no HTTP response
    latency_ms: int
    verdict: Verdict | None
    error: str = ""  # "timeout" | "network: <ExceptionType>" | "http <status>" | ""
    retry_after_ms: int | None = None
    excerpt: str = ""

    @property
    def kind(self) -> str:
        """accepted | duplicated | rejected | timeout | error: a bounded metrics label."""
        if self.verdict is not None:
            return self.verdict.outcome.lower()
        return "timeout" if self.error == "timeout" else "error"


# Connections (per host and in all) a process's shared session keeps beyond what its
# delivery worker's lanes can take, so that sync-mode tries never wait behind a backlog of
# worker deliveries to the same buyer (aiohttp's timeout counts the wait for a connection).
SYNC_RESERVE = 32


def new_session(*, limit: int = 512, limit_per_host: int = 64) -> aiohttp.ClientSession:
    """The one long-lived client session of a process."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host,
                                     ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                 raise_for_status=False, trust_env=False)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    length = resp.content_length
    if length is not None and length <= limit and "Content-Encoding" not in resp.headers:
        return await resp.read()  # the common case: a small, declared, plain body
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


async def attempt(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    *,
    lead: Mapping[str, str] | bytes,
    lead_id: str,
    campaign: str = "",
    price: int = 0,
    timeout_ms: int | None = None,
    excerpt_chars: int = 256,
) -> DeliveryAttempt:
    """One signed request to the buyer and its classification."""
    req = endpoint.builder.build(lead, lead_id=lead_id, campaign=campaign, price=price,
                                 timestamp=int(time.time()))
    timeout = (endpoint.timeout if timeout_ms is None
               else aiohttp.ClientTimeout(total=max(timeout_ms, 1) / 1_000))
    t0 = time.perf_counter()
    try:
        async with session.request(
            req.method, req.url, data=req.body if req.method != "GET" else None,
            headers=req.headers, timeout=timeout, allow_redirects=False,
        ) as resp:
            raw = await _read_bounded(resp, MAX_BODY_BYTES)
            status = resp.status
            retry_after = resp.headers.get("Retry-After") if status >= 429 else None
    except TimeoutError:
        return DeliveryAttempt(req.msg_id, 0, _ms(t0), None, "timeout")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return DeliveryAttempt(req.msg_id, 0, _ms(t0), None, f"network: {type(exc).__name__}")
    latency = _ms(t0)
    excerpt = (raw.decode("utf-8", "replace") if len(raw) <= excerpt_chars  # most bodies
               else raw[: excerpt_chars * 4].decode("utf-8", "replace")[:excerpt_chars])
    if is_retryable(status):
        wait = parse_retry_after(retry_after, int(time.time() * 1_000))
        return DeliveryAttempt(req.msg_id, status, latency, None, f"http {status}", wait, excerpt)
    return DeliveryAttempt(req.msg_id, status, latency, endpoint.mapper.classify(status, raw),
                           "", None, excerpt)


def _ms(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1_000)

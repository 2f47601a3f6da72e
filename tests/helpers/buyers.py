"""Real buyer endpoints for the delivery tests: aiohttp servers on free loopback ports.

Every route records the requests it gets and verifies their Standard Webhooks signature
with ``standardwebhooks.Webhook(SECRET).verify`` (as a buyer would); a request that fails
verification is answered 401. Behaviours that change over retries (500 then 200, 429 then
200, hold then 200) count per ``webhook-id``. Nothing here sleeps: slow answers wait on an
``asyncio.Event`` the test releases.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from standardwebhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"leadflow-test-secret-0123456789ab").decode()


@dataclass
class Received:
    path: str
    method: str
    headers: dict[str, str]
    body: bytes
    query: str
    verified: bool

    @property
    def msg_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Buyers:
    """Base URLs and what each route received."""

    url: str = ""
    raw_url: str = ""  # a raw TCP server: /garbage answers non-HTTP, /reset closes abruptly
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends /slow and /hold
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    flaky_fail: str = "500"  # /flaky: "500" fails, "" accepts (breaker tests flip it)

    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set on every request

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def reached(self, path: str, within: float = 10.0) -> None:
        """Until a request to ``path`` has arrived (woken by each arrival, no polling)."""
        async with asyncio.timeout(within):
            while not self.at(path):
                self.arrived.clear()
                await self.arrived.wait()


def _app(state: Buyers) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        content = request.query_string if request.method == "GET" else body.decode()
        try:
            Webhook(SECRET).verify(content, headers, json_parse=False)
            verified = True
        except Exception:
            verified = False
        path = request.path
        state.received.append(
            Received(path, request.method, headers, body, request.query_string, verified))
        state.arrived.set()
        if not verified:
            return web.json_response({"status": "bad signature"}, status=401)
        key = (path, headers.get("webhook-id", ""))
        state.seen[key] += 1
        n = state.seen[key]
        match path:
            case "/accept":
                return web.json_response({"status": "accepted", "id": "b-1"})
            case "/accept_long":  # a body longer than the delivery log's excerpt
                return web.Response(body=b'{"status":"accepted","note":"' + b"x" * 500 + b'"}',
                                    content_type="application/json")
            case "/reject":
                return web.json_response({"status": "rejected", "reason": "no coverage"})
            case "/duplicate":
                return web.json_response({"status": "duplicate"}, status=409)
            case "/price":
                return web.json_response({"status": "accepted", "bid": {"price": 18.5}})
            case "/price_high":
                return web.json_response({"status": "accepted", "bid": {"price": "99.00"}})
            case "/slow":
                await state.release.wait()
                return web.json_response({"status": "accepted"})
            case "/hold_reject":  # waits for release, then rejects
                await state.release.wait()
                return web.json_response({"status": "rejected"})
            case "/hold_fail":  # waits for release, then fails (500)
                await state.release.wait()
                return web.json_response({"error": "boom"}, status=500)
            case "/hold":  # the first request waits for release, later ones answer at once
                if n == 1:
                    await state.release.wait()
                return web.json_response({"status": "accepted"})
            case "/flaky":  # 500 then 200
                if n == 1:
                    return web.json_response({"error": "boom"}, status=500)
                return web.json_response({"status": "accepted"})
            case "/busy":  # 429 Retry-After: 1, then 200
                if n == 1:
                    return web.json_response({"error": "slow down"}, status=429,
                                             headers={"Retry-After": "1"})
                return web.json_response({"status": "accepted"})
            case "/down":  # always 500 unless flaky_fail is cleared
                if state.flaky_fail:
                    return web.json_response({"error": "down"}, status=500)
                return web.json_response({"status": "accepted"})
            case "/text":
                return web.Response(text="<html>not json</html>", status=200)
            case "/deep":  # JSON nested past the decoder's recursion limit
                return web.Response(body=b'{"status":' + b"[" * 3_000 + b"]" * 3_000 + b"}",
                                    content_type="application/json")
            case "/busy_odd":  # 429 with a Retry-After str.isdigit() takes and int() does not
                return web.json_response({"error": "slow down"}, status=429,
                                         headers={"Retry-After": "\u00b2"})
            case "/listed":  # a verdict inside a list (a rule's path indexes it)
                return web.json_response({"data": ["accepted"]})
            case "/bid_slow":  # a ping buyer that answers only once released
                await state.release.wait()
                return web.json_response({"bid": "50.00"})
        if path.startswith("/bid/"):  # a ping buyer bidding the amount in its path
            return web.json_response({"bid": path.removeprefix("/bid/")})
        return web.json_response({"status": "unknown route"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        head = await reader.readuntil(b"\r\n\r\n")
        if b" /garbage" in head.split(b"\r\n", 1)[0]:
            writer.write(b"\x00\xffthis is not HTTP at all\r\n\r\n")
            await writer.drain()
        writer.transport.abort()  # RST, no response: an abruptly closed connection


@contextlib.asynccontextmanager
async def buyer_servers() -> AsyncIterator[Buyers]:
    state = Buyers()
    runner = web.AppRunner(_app(state), shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    raw = await asyncio.start_server(_raw, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    raw_port = raw.sockets[0].getsockname()[1]
    state.url, state.raw_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{raw_port}"
    try:
        yield state
    finally:
        state.release.set()
        raw.close()
        await raw.wait_closed()
        await runner.cleanup()


@pytest.fixture
async def buyers() -> AsyncIterator[Buyers]:
    """The buyer servers (a pytest fixture, registered by tests/conftest.py)."""
    async with buyer_servers() as b:
        yield b

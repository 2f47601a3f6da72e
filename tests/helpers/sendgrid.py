"""A local stand-in for SendGrid's v3 mail send API: a real aiohttp server on 127.0.0.1 (a
free port) that records every request and answers what the test tells it to (fixture
``sendgrid_server``: a plugin of tests/conftest.py). It checks nothing itself: the tests
check the requests it recorded against SendGrid's documented shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


@dataclass
class SendGridServer:
    """``answers``: the statuses of the next requests, in order (then 202); ``hold``: every
    request waits until :meth:`release` (a server that never answers)."""

    requests: list[Request] = field(default_factory=list)
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    hold: bool = False
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a request waits (hold)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request recorded
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    def answer(self, status: int, body: bytes = b"") -> None:
        self.answers.append((status, body))

    def release(self) -> None:
        self._gate.set()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Request(request.method, request.path, dict(request.headers),
                                     await request.read()))
        self.arrived.set()
        if self.hold:
            self.held.set()
            await self._gate.wait()
        status, body = self.answers.pop(0) if self.answers else (202, b"")
        headers = {"X-Message-Id": "sg-test-id"} if status == 202 else {}
        return web.Response(status=status, body=body, headers=headers,
                            content_type="application/json" if body else None)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release()  # a held request answers before the server goes
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def sendgrid_server() -> AsyncIterator[SendGridServer]:
    server = SendGridServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

"""uvicorn with the limits an ingest endpoint on the internet needs.

uvicorn has a keep-alive timeout (``timeout_keep_alive``) and a concurrency limit
(``limit_concurrency``: a 503 past it), and both are used as they are. For httptools it has
no header-read timeout, no body-read timeout and no bound on the size or number of headers:
an idle connection that never sends a request, or a client dripping its headers or body a
byte at a time, held its connection forever, and a 200 KB header was served. This module
adds those, in a subclass of uvicorn's httptools protocol:

- ``header_timeout_s``: a request's line and headers must arrive within this many seconds of
  the connection being opened, or of the first read of the request's bytes on a kept-alive
  connection.
  Past it the connection is closed, after a 408 if part of a request had arrived.
- ``body_timeout_s``: the whole body must arrive within this many seconds of the headers'
  end; past it a 408 and the connection is closed, and the application is told the client
  went away (it decides nothing on a partial body).
- ``max_header_bytes``, ``max_headers``: the request line and headers together (bytes as
  received), and their count; past either, a 431 and the connection is closed.

No timer is armed per request: a request only records its phase and deadline, and the
server sweeps its connections on uvicorn's own 0.1 s tick (:meth:`Server.on_tick`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any, ClassVar

import httptools
import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine.api.schemas import Error, ErrorDetail
from engine.core.config import Settings


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The protocol's share of ``[settings]`` (their defaults are the config's)."""

    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_headers: int

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(header_timeout_s=s.header_timeout_s, body_timeout_s=s.body_timeout_s,
                   max_header_bytes=s.max_header_bytes, max_headers=s.max_headers)


# a connection's phase: what it is waiting for (_CLOSING: answered, reading what the client
# still sends so that it gets the answer rather than a reset, until it closes or _LINGER_S)
_IDLE, _HEAD, _BODY, _CLOSING = 0, 1, 2, 3
_LINGER_S = 2.0
_enc = msgspec.json.Encoder()
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def refusal(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, in the API's error shape."""
    body = _enc.encode(Error(ErrorDetail(code, message)))
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n", body,
    ))


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request refused by a limit."""


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body timeouts and header bounds."""

    limits: ClassVar[Limits] = Limits.of(Settings())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = _IDLE
        self.deadline = 0.0  # loop time; 0: none
        self.head_bytes = 0  # bytes received while reading a request's line and headers
        self.now = 0.0  # loop time of the read being parsed
        self.read_len = 0  # bytes of the read being parsed
        self.refused: bytes | None = None
        self.deferred: bytes | None = None  # a refusal waiting for the answer before it

    # ---- phases ------------------------------------------------------------------------
    # Tracked in the parser's callbacks (a request's begin, headers and end) and in
    # data_received: one clock read per read from the socket, no timer per request (the
    # server's sweep reads the deadlines).

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.phase = _HEAD
        self.deadline = self.loop.time() + self.limits.header_timeout_s

    def on_message_begin(self) -> None:
        if self.phase != _HEAD:  # a request begins inside a read (pipelined, or after a
            # body the application answered without reading): its whole read counts
            self.phase, self.head_bytes = _HEAD, self.read_len
            self.deadline = self.now + self.limits.header_timeout_s
        super().on_message_begin()

    def on_message_complete(self) -> None:
        # also when the response was sent before the body's end (a 404, 405 or 413 that
        # did not read it), which uvicorn's callback ignores: the body phase ends here
        self.phase, self.deadline = _IDLE, 0.0
        super().on_message_complete()

    def on_headers_complete(self) -> None:
        limits = self.limits
        if len(self.headers) > limits.max_headers:
            self._refuse(431, "too_many_headers", f"more than {limits.max_headers} headers")
        # head_bytes counts whole reads, so it can include body bytes: measure exactly then
        if self.head_bytes > limits.max_header_bytes and _head_size(
                self.url, self.headers) > limits.max_header_bytes:
            self._refuse(431, "headers_too_large",
                         f"request line and headers over {limits.max_header_bytes} bytes")
        self.phase = _BODY
        self.deadline = self.now + limits.body_timeout_s
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.deferred is not None:  # the refusal of a request pipelined behind this one
            response, self.deferred, self.phase = self.deferred, None, _HEAD
            if self.transport.is_closing():  # that answer closed the connection
                return
            self._close_with(response)

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.refused = refusal(status, code, message)
        raise _Refused

    # ---- input -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """uvicorn's, plus the phases and the header bounds."""
        phase = self.phase
        if phase == _CLOSING:  # answered already: what comes now is dropped
            return
        self._unset_keepalive_if_required()
        self.now = self.loop.time()
        self.read_len = len(data)
        if phase == _IDLE:  # a request's first bytes
            self.phase, self.head_bytes = _HEAD, 0
            self.deadline = self.now + self.limits.header_timeout_s
        if phase != _BODY:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # no WebSocket here (ws="none")
        except httptools.HttpParserError:
            if self.refused is not None:  # a limit stopped the parser
                self._close_with(self.refused)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self.phase == _HEAD and self.head_bytes > self.limits.max_header_bytes:
            self._close_with(refusal(
                431, "headers_too_large",
                f"request line and headers over {self.limits.max_header_bytes} bytes"))

    # ---- the sweep ---------------------------------------------------------------------

    def eof_received(self) -> None:
        if self.phase == _CLOSING:
            self.transport.close()

    def expire(self, now: float) -> None:
        """Called by the server's sweep: close the connection if its phase is overdue."""
        if not self.deadline or now < self.deadline or self.transport.is_closing():
            return
        if self.phase == _CLOSING:
            self.transport.close()
        elif self.phase == _BODY and self.pipeline:  # queued behind a request being
            # answered (uvicorn reads nothing meanwhile): its time starts when it runs
            self.deadline = now + self.limits.body_timeout_s
        elif self.phase == _BODY:
            self._close_with(b"" if self.cycle.response_complete else refusal(  # answered
                408, "body_timeout",
                f"the request body did not arrive within {self.limits.body_timeout_s:g} s"))
        elif self.head_bytes:
            self._close_with(refusal(
                408, "header_timeout",
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"))
        else:  # nothing sent at all: nobody to answer
            self._close_with(b"")

    def _close_with(self, response: bytes) -> None:
        """Answer (unless a response already started) and close; an application still
        reading the body is told the client went away. A client may still be sending (a
        large header): closing with unread input would reset the connection and lose the
        answer, so the write side is shut first and input read and dropped until the
        client closes, for at most _LINGER_S (a lingering close, as nginx does)."""
        cycle = self.cycle
        if self.phase == _HEAD and cycle is not None and not cycle.response_complete:
            # the refused request is pipelined behind one still being answered: that one's
            # answer goes first, whole, and the refusal after it (on_response_complete)
            self.deferred, self.phase, self.deadline = response, _CLOSING, 0.0
            self.flow.pause_reading()
            return
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                response = b""
            cycle.disconnected = True
            cycle.message_event.set()
        if not response or not self.transport.can_write_eof():
            self.deadline = 0.0
            if response:
                self.transport.write(response)
            self.transport.close()
            return
        self.transport.write(response)
        self.transport.write_eof()
        self.phase, self.deadline = _CLOSING, self.loop.time() + _LINGER_S
        self.flow.resume_reading()


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(n) + len(v) + 4 for n, v in headers)


def protocol_for(limits: Limits) -> type[GuardedHttp]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type("GuardedHttp", (GuardedHttp,), {"limits": limits})


class Server(uvicorn.Server):
    """uvicorn without its own signal handling (the service owns SIGTERM/SIGHUP so it can
    drain Redis batches after the last request), sweeping overdue connections each tick."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        self._sweep()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, still sweeping: its ticks end as it begins, and it waits for every
        connection, so a client dripping a body would hold it timeout_graceful_shutdown."""

        async def sweep() -> None:
            while True:
                await asyncio.sleep(0.1)
                self._sweep()

        sweeping = asyncio.create_task(sweep())
        try:
            await super().shutdown(sockets)
        finally:
            sweeping.cancel()

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for conn in list(self.server_state.connections):
            if isinstance(conn, GuardedHttp):
                conn.expire(now)

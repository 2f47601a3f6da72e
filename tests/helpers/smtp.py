"""A real SMTP server (aiosmtpd) on loopback, collecting what it receives (fixtures
``smtp_server``, ``smtp_auth_server``: a plugin of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    sender: str
    recipients: list[str]
    message: EmailMessage


@dataclass
class Collector:
    """aiosmtpd handler: keeps every message; DATA is answered after it is kept, so a
    message is here by the time the client's send() returns."""

    received: list[Received] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)  # a message is kept
    held: threading.Event = field(default_factory=threading.Event)  # a DATA waits (hold)
    gate: asyncio.Event | None = None  # with a gate, DATA (or RCPT) waits until it is set
    hold_at: str = "DATA"  # the command a gate holds: "DATA" or "RCPT"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        """A mailbox with "refused" in its name does not exist here (550, naming it); one
        with "busy" in it is busy (450: try again later), every time."""
        if self.gate is not None and self.hold_at == "RCPT":
            self.held.set()
            await self.gate.wait()
        if "refused" in address:
            return f"550 5.1.1 <{address}>: no such mailbox"
        if "busy" in address:
            return f"450 4.2.1 <{address}>: mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """A message to a mailbox with "spamtrap" in its name is refused after DATA (554)."""
        if self.gate is not None and self.hold_at == "DATA":
            self.held.set()
            await self.gate.wait()
        if any("spamtrap" in str(r) for r in envelope.rcpt_tos):
            return "554 5.7.1 message refused"
        content = envelope.original_content or b""
        msg = message_from_bytes(content, policy=policy.default)
        self.received.append(Received(str(envelope.mail_from),
                                      [str(r) for r in envelope.rcpt_tos], msg))  # type: ignore[arg-type]
        self.arrived.set()
        return "250 OK"


class SmtpServer:
    """One aiosmtpd Controller on a fixed loopback port, which can be stopped and started
    again (a server that goes down and comes back)."""

    def __init__(self, users: dict[str, str] | None = None, *, hold: bool = False,
                 hold_at: str = "DATA") -> None:
        """``hold``: every ``hold_at`` command (DATA, or RCPT: before the message is sent)
        waits (the server hangs) until :meth:`release`."""
        self.users = users
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = "127.0.0.1"
        self.handler = Collector(gate=asyncio.Event() if hold else None, hold_at=hold_at)
        self._controller: Controller | None = None

    def start(self) -> None:
        auth: dict[str, object] = {} if self.users is None else {
            "auth_require_tls": False, "authenticator": self._auth}
        self._controller = Controller(self.handler, hostname=self.host, port=self.port, **auth)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def release(self) -> None:
        """Let the held DATA commands (and later ones) through, from the server's loop."""
        if self._controller is not None and self.handler.gate is not None:
            self._controller.loop.call_soon_threadsafe(self.handler.gate.set)

    def _auth(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
              data: object) -> AuthResult:
        users = self.users or {}
        ok = (isinstance(data, LoginPassword)
              and users.get(data.login.decode()) == data.password.decode())
        return AuthResult(success=ok, handled=False)  # aiosmtpd answers 535 itself

    @property
    def received(self) -> list[Received]:
        return self.handler.received


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_auth_server() -> Iterator[SmtpServer]:
    """A server that offers AUTH (user "leadflow", password "s3cret-pw") over plain SMTP,
    loopback only (not requiring it: aiosmtpd warns about AUTH required without TLS)."""
    server = SmtpServer(users={"leadflow": "s3cret-pw"})
    server.start()
    try:
        yield server
    finally:
        server.stop()

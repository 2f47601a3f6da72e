"""The notify worker killed with SIGKILL in the middle of a send (issue #19: "the worker
killed mid-send sends each message once after restart"): a real worker process
(tests/helpers/notify_proc.py), a real redis-server, a real aiosmtpd server that holds
the send where the test wants the kill to land.

- Killed before the message went (the server held RCPT): the dead worker's outbox claim
  expires, another worker claims the event and sends it: exactly one message.
- Killed after the server took the whole message but before it answered (held at DATA's
  end): aiosmtpd drops a transaction whose client hung up before its reply, so again
  exactly one message. (A server that commits a message before replying would have two,
  with one Message-ID: the at-least-once window documented in engine/notify/outbox.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.notify.outbox import SENT, entry_id
from engine.notify.worker import GROUP
from tests.helpers import ROOT
from tests.helpers.smtp import SmtpServer

CONTACT = "ap@bright.example"
TOML = """
[[tenants]]
id = "t1"
api_token = "tok-t1"
[tenants.notify]
[tenants.notify.weekly_report]
enabled = false
[tenants.notify.smtp]
host = "127.0.0.1"
port = {port}
security = "plain"
sender = "Acme Leads <billing@acme.example>"
timeout_s = 30

[[clients]]
tenant = "t1"
id = "c1"
name = "Bright Solar"
contacts = ["{contact}"]
"""


async def _until(check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polls Redis, a process, a server
            await asyncio.sleep(0.05)


def _worker(config: Path, redis_url: str, consumer: str) -> subprocess.Popen[bytes]:
    with (config.parent / f"{consumer}.log").open("wb") as log:  # the child keeps its copy
        return subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.notify_proc", str(config), redis_url,
             consumer], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log, stderr=subprocess.STDOUT)


async def _killed_mid_send(tmp_path: Path, redis: aioredis.Redis, url: str,
                           server: SmtpServer) -> tuple[str, subprocess.Popen[bytes]]:
    """A worker that took the alert and hangs in its send, then SIGKILL; the event id."""
    config = tmp_path / "leadflow.toml"
    config.write_text(TOML.format(port=server.port, contact=CONTACT))
    first = _worker(config, url, "w1")
    try:
        async def grouped() -> bool:
            return await redis.exists(keys.events("t1")) and any(
                g["name"] in (GROUP, GROUP.encode())
                for g in await redis.xinfo_groups(keys.events("t1")))
        await _until(grouped)
        event = (await redis.xadd(keys.events("t1"), {
            "type": "balance_alert", "account": "c1", "balance": "15000000",
            "threshold": "20000000", "ts": "1"})).decode()
        await asyncio.to_thread(server.handler.held.wait, 20)
        assert server.handler.held.is_set(), "the send never reached the server"
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    # the dead worker holds the claim and the event is pending: nothing was marked sent
    claim = await redis.get(keys.notify("t1", entry_id(event, CONTACT, "balance_alert")))
    assert claim not in (None, SENT.encode())
    assert (await redis.xpending(keys.events("t1"), GROUP))["pending"] == 1
    server.release()  # the held command goes on; its client is gone
    second = _worker(config, url, "w2")
    return event, second


async def _done(redis: aioredis.Redis, event: str) -> None:
    async def sent() -> bool:
        claim = await redis.get(keys.notify("t1", entry_id(event, CONTACT, "balance_alert")))
        pending = (await redis.xpending(keys.events("t1"), GROUP))["pending"]
        return claim == SENT.encode() and pending == 0
    await _until(sent)


@pytest.mark.slow
@pytest.mark.parametrize("hold_at", ["RCPT", "DATA"])
async def test_a_worker_killed_mid_send_has_the_message_sent_once_by_the_next(
        tmp_path: Path, redis: aioredis.Redis, redis_server, hold_at: str) -> None:
    """RCPT: killed before the message went; DATA: killed after the server had the whole
    message, before its reply (see the module docs)."""
    server = SmtpServer(hold=True, hold_at=hold_at)
    server.start()
    try:
        event, second = await _killed_mid_send(tmp_path, redis, redis_server.url, server)
        try:
            await _done(redis, event)
        finally:
            second.kill()
            second.wait(10)
        assert [r.recipients for r in server.received] == [[CONTACT]]
    finally:
        server.stop()

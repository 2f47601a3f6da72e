"""Service.start failing half-way: stop() closes exactly what was opened, in reverse, and
leaves nothing behind (no redis-server process, no open session, socket or client)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from engine.core.errors import LeadflowError
from engine.delivery import client
from engine.run import service
from engine.run.service import Service
from engine.run.workers import WorkerContext
from engine.store.embedded import EmbeddedRedis, free_port
from tests.helpers.harness import make_config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_free(port: int) -> bool:
    """Nothing else bound to the port (a bind without SO_REUSEADDR succeeds)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """The embedded redis-servers and client sessions the service opens."""
    seen: dict[str, list[Any]] = {"embedded": [], "sessions": []}

    class Recorded(EmbeddedRedis):
        def start(self) -> EmbeddedRedis:
            seen["embedded"].append(self)
            return super().start()

    def new_session(**kw: Any) -> aiohttp.ClientSession:
        session = real_new_session(**kw)
        seen["sessions"].append(session)
        return session

    real_new_session = client.new_session
    monkeypatch.setattr(service, "EmbeddedRedis", Recorded)
    monkeypatch.setattr(client, "new_session", new_session)
    return seen


def _assert_not_running(svc: Service) -> None:
    for name in ("store", "app", "billing", "sync", "crew", "embedded"):
        with pytest.raises(LeadflowError, match="not running"):
            getattr(svc, name)
    assert svc.http is None


async def test_a_start_failing_at_the_last_step_is_stopped_in_reverse(
        opened: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The HTTP server dies at start, after the embedded redis-server, the Redis client,
    the archive, the session and the workers were opened: stop() stops the workers while
    the session and Redis are still open, then closes those and the redis-server."""
    at_stop: list[tuple[bool, bool]] = []

    async def worker(ctx: WorkerContext, stop: asyncio.Event) -> None:
        await stop.wait()
        at_stop.append((ctx.http.closed, bool(await ctx.store.redis.ping())))

    async def dies_at_start(self: Any, sockets: Any = None) -> None:
        return None

    monkeypatch.setattr(service.Server, "serve", dies_at_start)
    svc = Service(make_config(), host="127.0.0.1", port=0, state_dir=str(tmp_path),
                  workers=[worker])
    with pytest.raises(LeadflowError, match="HTTP server stopped at start"):
        await svc.start()
    [embedded], [session] = opened["embedded"], opened["sessions"]
    pid = embedded.pid
    assert pid is not None and _alive(pid) and not session.closed
    _assert_not_running(svc)  # not started: the parts are not handed out
    await svc.stop()
    assert at_stop == [(False, True)]  # the worker stopped before the session and Redis
    assert session.closed and not _alive(pid) and embedded.pid is None
    assert _port_free(svc.port)
    _assert_not_running(svc)
    await svc.stop()  # twice: nothing left to close


async def test_a_start_failing_on_an_unreachable_redis_leaves_nothing_open(
        opened: dict[str, list[Any]], tmp_path: Path) -> None:
    svc = Service(make_config(), redis_url=f"redis://127.0.0.1:{free_port()}/0",
                  host="127.0.0.1", port=0, state_dir=str(tmp_path))
    with pytest.raises(redis.exceptions.ConnectionError):  # loading the scripts
        await svc.start()
    await svc.stop()
    assert opened == {"embedded": [], "sessions": []}  # never reached
    assert _port_free(svc.port)
    _assert_not_running(svc)


async def test_a_port_in_use_fails_before_anything_is_opened(
        opened: dict[str, list[Any]], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = Service(make_config(), host="127.0.0.1", port=port,
                      state_dir=str(tmp_path / "state"))
        with pytest.raises(LeadflowError, match="cannot listen"):
            await svc.start()
        await svc.stop()
    assert opened == {"embedded": [], "sessions": []}
    assert not (tmp_path / "state").exists()  # not even the state directory
    _assert_not_running(svc)


async def test_the_parts_are_handed_out_while_running_only(redis_server: EmbeddedRedis,
                                                          tmp_path: Path) -> None:
    svc = Service(make_config(), redis_url=redis_server.url, host="127.0.0.1", port=0,
                  state_dir=str(tmp_path))
    _assert_not_running(svc)
    await svc.start()
    try:
        with pytest.raises(LeadflowError, match="already running"):
            await svc.start()
        assert svc.embedded is None and svc.app.archive is svc.billing.archive is not None
        assert svc.http is not None and not svc.http.closed
    finally:
        await svc.stop()
    _assert_not_running(svc)

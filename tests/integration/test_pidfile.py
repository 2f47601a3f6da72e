"""Running engines' records (engine.run.pidfile): the lock, not the pid, says who runs; the
embedded Redis's data dir takes one server at a time (engine.store.embedded)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.core.errors import EmbeddedRedisError
from engine.run.pidfile import EngineState, PidFile, read_running
from engine.store.embedded import EmbeddedRedis


def test_record_while_held_and_gone_after(tmp_path: Path) -> None:
    pf = PidFile(tmp_path)
    pf.acquire(EngineState(pid=os.getpid(), config="/etc/leadflow.toml"))
    [got] = read_running(tmp_path)
    assert (got.pid, got.config) == (os.getpid(), "/etc/leadflow.toml")
    pf.write(EngineState(pid=os.getpid(), config="/x", reloads=1, reload_error="bad"))
    [got] = read_running(tmp_path)
    assert (got.reloads, got.reload_error) == (1, "bad")
    pf.release()
    assert read_running(tmp_path) == [] and not pf.path.exists()


def test_engines_sharing_a_state_dir_each_have_a_record(tmp_path: Path) -> None:
    """Stateless ingest processes on one external Redis may share a state dir (README
    'Scale-out'): each keeps its own record, and `config load` reloads them all."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        mine = PidFile(tmp_path)
        mine.acquire(EngineState(pid=os.getpid(), config="/a"))
        theirs = PidFile(tmp_path)
        theirs.path = tmp_path / f"leadflow-{other.pid}.pid"  # as that process would
        theirs.acquire(EngineState(pid=other.pid, config="/a"))
        assert [e.pid for e in read_running(tmp_path)] == sorted([os.getpid(), other.pid])
        theirs.release()
        mine.release()
    finally:
        other.kill()
        other.wait()


def test_a_left_over_record_names_no_engine_even_if_its_pid_is_alive(tmp_path: Path) -> None:
    """A killed engine's file is not locked: its pid, reused by another process, is never
    taken for the engine (`leadflow config load` would have sent that process SIGHUP);
    the reader deletes the stale file."""
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            stale = tmp_path / f"leadflow-{other.pid}.pid"
            stale.write_text(f'{{"pid": {other.pid}, "config": "/a"}}')
            assert read_running(tmp_path) == []
            assert other.poll() is None and not stale.exists()
        finally:
            other.kill()


def test_one_embedded_redis_server_per_data_dir(tmp_path: Path) -> None:
    """A second redis-server on the same data dir (another engine, a reconcile, a worker
    started without a Redis URL) would append to the same AOF files: it is refused."""
    with (EmbeddedRedis(tmp_path, persistent=False),
          pytest.raises(EmbeddedRedisError, match="another process runs")):
        EmbeddedRedis(tmp_path, persistent=False).start()
    with EmbeddedRedis(tmp_path, persistent=False):  # free again once the first stopped
        pass

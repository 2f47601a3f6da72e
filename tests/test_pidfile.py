"""The running engine's record (engine.pidfile): the lock, not the pid, says who runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.pidfile import FILE, EngineRunning, EngineState, PidFile, read_running


def test_record_while_held_and_gone_after(tmp_path: Path) -> None:
    pf = PidFile(tmp_path)
    pf.acquire(EngineState(pid=os.getpid(), config="/etc/leadflow.toml"))
    got = read_running(tmp_path)
    assert got is not None and (got.pid, got.config) == (os.getpid(), "/etc/leadflow.toml")
    pf.write(EngineState(pid=os.getpid(), config="/x", reloads=1, reload_error="bad"))
    got = read_running(tmp_path)
    assert got is not None and (got.reloads, got.reload_error) == (1, "bad")
    pf.release()
    assert read_running(tmp_path) is None and not (tmp_path / FILE).exists()


def test_a_second_engine_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    first = PidFile(tmp_path)
    first.acquire(EngineState(pid=os.getpid(), config="/a"))
    try:
        with pytest.raises(EngineRunning, match=f"pid {os.getpid()}"):
            PidFile(tmp_path).acquire(EngineState(pid=os.getpid(), config="/b"))
    finally:
        first.release()


def test_a_left_over_record_names_no_engine_even_if_its_pid_is_alive(tmp_path: Path) -> None:
    """A killed engine's file is not locked: its pid, reused by another process, is never
    taken for the engine (``leadflow config load`` would have sent that process SIGHUP)."""
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            (tmp_path / FILE).write_text(f'{{"pid": {other.pid}, "config": "/a"}}')
            assert read_running(tmp_path) is None
            assert other.poll() is None
        finally:
            other.kill()

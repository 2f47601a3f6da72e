"""Running engines' records in their state directory (``leadflow-<pid>.pid``).

``leadflow run`` writes its record at start and holds an exclusive ``flock`` on it until it
exits, then deletes it. The lock, not the pid, says whether an engine runs: a file left by
a killed engine is not locked, so ``leadflow config load`` never signals a process that
merely reuses its pid (readers delete such files). Several engines may share a state
directory when they share an external Redis (stateless ingest processes, README
"Scale-out"); each has its own record, and ``config load`` reloads them all. The embedded
Redis's data is guarded separately (:func:`engine.store.embedded.EmbeddedRedis` locks it).

A record is JSON (:class:`EngineState`): the pid, the config file the engine reloads on
SIGHUP, the embedded Redis URL (only that one: a given URL may carry a password and stays
out of files), and the outcome of the last reload, which ``config load`` waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO

import msgspec

from engine.core.errors import LeadflowError

PATTERN = "leadflow-*.pid"


class EngineState(msgspec.Struct, kw_only=True):
    pid: int
    config: str  # absolute path of the file SIGHUP reloads
    redis_url: str | None = None  # the embedded server's; None for a given Redis
    reloads: int = 0  # reloads attempted (done or refused)
    reload_error: str = ""  # why the last one was refused; "" when it took effect


def config_path(source: str) -> str:
    """A config file as records name it (``EngineState.config``): its absolute path."""
    return str(Path(source).resolve()) if source else ""


class PidFile:
    """The record of this process's engine; see the module docs."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / f"leadflow-{os.getpid()}.pid"
        self._fh: IO[bytes] | None = None
        self.state: EngineState | None = None

    def acquire(self, state: EngineState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a stale file of a dead engine with this pid is reused, unless a reader deleted
        # it meanwhile: then open anew
        while True:
            fh = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            fcntl.flock(fh, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            fh.close()
        self._fh = fh
        self.write(state)

    def write(self, state: EngineState) -> None:
        if self._fh is None:
            return
        self.state = state
        # one write over the old record, never a truncate: a reader never finds the file
        # empty or half-written; a shorter record is padded with spaces (JSON whitespace)
        data = msgspec.json.encode(state)
        size = os.fstat(self._fh.fileno()).st_size
        os.pwrite(self._fh.fileno(), data.ljust(size), 0)

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: no one reads a half-gone record
        self._fh.close()
        self._fh = None


def read_running(state_dir: Path) -> list[EngineState]:
    """The records of the engines running on ``state_dir``, by pid."""
    found = [s for path in sorted(state_dir.glob(PATTERN)) if (s := _read_one(path))]
    return sorted(found, key=lambda s: s.pid)


def _read_one(path: Path) -> EngineState | None:
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # its engine holds it: it runs
            state = _read(fh)
            return state if _alive(state.pid) else None
        # left by an engine that is gone: delete it, unless an engine (reusing the pid)
        # has just opened it, which the exclusive lock below tells
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None


def _read(fh: IO[bytes], within_s: float = 2.0) -> EngineState:
    # a record is written in one write, but an engine that has just taken the lock may not
    # have written it yet (the file is empty): read again, for a while
    deadline = time.monotonic() + within_s
    while True:
        fh.seek(0)
        with contextlib.suppress(msgspec.DecodeError):
            return msgspec.json.decode(fh.read(), type=EngineState)
        if time.monotonic() > deadline:
            raise LeadflowError(f"unreadable engine record {fh.name!r}")
        time.sleep(0.005)  # the engine writes its record right after taking the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

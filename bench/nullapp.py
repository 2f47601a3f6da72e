"""A null HTTP endpoint, and serving any ASGI app in a subprocess for ceiling measurements.

``app`` (ASGI) and ``rsgi_app`` (RSGI, for granian) read the request body and answer
``200 {"ok":true}``: whatever the engine does on top costs the difference to this ceiling.

``serve("bench.nullapp:app")`` starts uvicorn (httptools, uvloop, no access log) in its own
process on a free loopback port, optionally pinned to a CPU, and yields the base URL.
``serve(..., server="granian")`` does the same with granian if it is installed.
``serve_command`` runs any other server command that way (bench.pingfarm's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Literal

from bench.engine_proc import EngineURL
from engine.api.toolkit import lifespan
from engine.store.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"ok":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

Message = MutableMapping[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Null ASGI app: drain the body, answer 200 with a fixed small JSON."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)  # the engine's own (engine/api/toolkit.py)
        return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def rsgi_app(scope: Any, protocol: Any) -> None:
    """Null RSGI app (granian ``--interface rsgi``)."""
    await protocol()  # read the body
    protocol.response_bytes(200, [("content-type", "application/json")], BODY)



def _command(
    app_ref: str,
    port: int,
    server: Literal["uvicorn", "granian"],
    interface: Literal["asgi", "rsgi"],
    workers: int,
) -> list[str]:
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", app_ref,
            "--host", "127.0.0.1", "--port", str(port),
            "--http", "httptools", "--loop", "uvloop",
            "--no-access-log", "--log-level", "warning",
            # the engine's own uvicorn settings (engine/run/service.py), so the ceiling is the
            # same stack: no proxy-header middleware, no Date/Server headers
            "--no-proxy-headers", "--no-server-header", "--no-date-header",
            "--workers", str(workers),
        ]  # fmt: skip
    exe = shutil.which("granian")
    if exe is None:
        raise FileNotFoundError("granian is not installed (pip install granian)")
    return [
        exe, "--interface", interface,
        "--host", "127.0.0.1", "--port", str(port),
        "--loop", "uvloop", "--workers", str(workers),
        "--log-level", "warning", "--no-ws", "--http", "1", "--no-access-log",
        app_ref,
    ]  # fmt: skip


@contextlib.contextmanager
def serve(
    app_ref: str = "bench.nullapp:app",
    *,
    server: Literal["uvicorn", "granian"] = "uvicorn",
    interface: Literal["asgi", "rsgi"] = "asgi",
    workers: int = 1,
    cpu: int | str | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """Serve ``app_ref`` (``"module:attr"``) in a subprocess; yields ``http://127.0.0.1:PORT``.

    ``cpu`` pins the server (``taskset -c``; e.g. ``0`` or ``"0,1"``). The app module must be
    importable from the repository root.
    """
    port = free_port()
    with serve_command(_command(app_ref, port, server, interface, workers), port, cpu=cpu,
                       env=env, startup_timeout=startup_timeout) as url:
        yield url


@contextlib.contextmanager
def serve_command(
    cmd: list[str],
    port: int,
    *,
    cpu: int | str | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[EngineURL]:
    """Run the server ``cmd`` (listening on loopback ``port``) in its own process group,
    optionally pinned; yields ``http://127.0.0.1:PORT`` (``.pid``: the server's process)
    once it listens, stops it after."""
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=proc_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stopping it also stops its workers
        )
        try:
            _wait_listening(proc, port, startup_timeout, log)
            yield EngineURL(f"http://127.0.0.1:{port}", proc.pid)  # taskset execs: its pid
        finally:
            _stop(proc)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"server exited ({proc.returncode}): {err[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"server did not listen on {port} within {timeout}s")
        time.sleep(0.05)  # poll interval while waiting for the port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

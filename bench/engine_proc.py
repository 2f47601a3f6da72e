"""The engine in its own process, for benchmarks.

``python -m bench.engine_proc --config PATH --redis-url URL --port P`` serves the HTTP API
(:class:`engine.run.service.Service` with no in-process workers) until SIGTERM/SIGINT, then drains
and exits. :func:`serve_engine` starts it (optionally pinned with ``taskset``), waits for
``/readyz`` and stops it with SIGTERM; :func:`rss_bytes` reads a process's RSS from /proc.

``serve_engine(..., as_users_run=True)`` runs ``leadflow run`` instead, exactly as a user
starts it (engine.run.cli: the service *with* its in-process workers: delivery, ledger
archive, recharge, notify, tenant webhooks), on a copy of the config in a temp dir, so its
``state_dir`` (the ledger archive's SQLite file, the pid file) is the run's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.run import configfile
from engine.store.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0


class EngineURL(str):
    """The engine's base URL (``http://127.0.0.1:PORT``), carrying the process id as ``pid``."""

    pid: int

    def __new__(cls, url: str, pid: int) -> EngineURL:
        obj = super().__new__(cls, url)
        obj.pid = pid
        return obj


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` of /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def serve_engine(
    config: str | os.PathLike[str],
    redis_url: str,
    cpu: int | str | None = None,
    *,
    ready_timeout: float = READY_TIMEOUT_S,
    as_users_run: bool = False,
) -> Iterator[EngineURL]:
    """Run the engine in a subprocess; yields its base URL (``.pid`` is the engine's pid).
    ``as_users_run``: ``leadflow run`` with its workers (see the module docs)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-run-") as home:
        if as_users_run:
            copy = Path(home) / Path(config).name
            copy.write_text(Path(config).read_text())
            cmd = [sys.executable, "-c", "import sys; from engine.run.cli import main; "
                   "sys.exit(main())", "run", "--config", str(copy), "--redis-url", redis_url,
                   "--port", str(port)]
        else:
            cmd = [sys.executable, "-m", "bench.engine_proc", "--config", str(config),
                   "--redis-url", redis_url, "--port", str(port)]
        yield from _spawn(cmd, port, cpu, ready_timeout)


def _spawn(cmd: list[str], port: int, cpu: int | str | None, ready_timeout: float
           ) -> Iterator[EngineURL]:
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    with tempfile.TemporaryFile() as log:
        # taskset execs the command, so proc.pid is the engine's own pid
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        url = EngineURL(f"http://127.0.0.1:{port}", proc.pid)
        try:
            deadline = time.monotonic() + ready_timeout
            while not _ready(url):
                if proc.poll() is not None:
                    log.seek(0)
                    out = log.read().decode(errors="replace")
                    raise RuntimeError(f"engine exited ({proc.returncode}): {out[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine not ready on {url} within {ready_timeout}s")
                time.sleep(0.05)  # poll interval while the engine starts
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the service drains pending batches, then exits
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


async def _serve(config: str, redis_url: str, port: int, host: str) -> None:
    from engine.run.service import Service

    cfg = configfile.load(config)
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-engine-") as state_dir:
        svc = Service(cfg, redis_url=redis_url, host=host, port=port, state_dir=state_dir,
                      workers=[])
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        try:
            await svc.start()
            await done.wait()
        finally:
            await svc.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_proc",
                                description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    import uvloop

    from engine.obs.logs import setup_logging

    setup_logging(logging.WARNING)
    uvloop.run(_serve(args.config, args.redis_url, args.port, args.host))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

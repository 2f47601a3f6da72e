"""Test helpers: a real Prometheus server, and a tiny HTTP server exposing a registry.

``run_prometheus(["127.0.0.1:PORT"], tmp_dir)`` starts ``/usr/bin/prometheus`` (or the one on
PATH) on a free loopback port with a temp config scraping those targets every second and a
temp TSDB, and yields a :class:`Prometheus` handle with polling helpers (deadlines, never
fixed sleeps). ``serve_registry(registry)`` serves :func:`engine.obs.metrics.render` over HTTP, a
stand-in for the engine until its app exists; point ``run_prometheus`` at the engine later.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from engine.obs.metrics import render
from engine.store.embedded import free_port, stop_process

T = TypeVar("T")


def prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None



def poll(fn: Callable[[], T | None], *, timeout: float, interval: float = 0.1, what: str = "") -> T:
    """Call ``fn`` until it returns something not None, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = fn()
        except (OSError, ValueError, KeyError) as exc:  # not up yet / not scraped yet
            if isinstance(exc, urllib.error.HTTPError):
                # it holds the response's socket open (e.g. /-/ready's 503 while starting):
                # left to the collector, it was a ResourceWarning in whichever later test ran
                # gc.collect(), which warnings-as-errors turned into a failure there
                exc.close()
            last_error, value = repr(exc), None
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or fn}: {last_error}")
        threading.Event().wait(interval)  # back-off between polls, not a synchronization


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            payload = json.load(resp)
        if payload.get("status") != "success":
            raise ValueError(f"{path}: {payload}")
        return payload["data"]

    def _alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited ({self.process.returncode}):\n{self.log()}")

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool | None:
            self._alive()
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return True if resp.status == 200 else None

        poll(ready, timeout=timeout, what="prometheus /-/ready")

    def wait_targets_up(self, targets: Sequence[str], timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until every target (``host:port``) was scraped successfully."""

        def up() -> list[dict[str, Any]] | None:
            self._alive()
            active = self.api("/api/v1/targets", state="active")["activeTargets"]
            mine = [t for t in active if t["labels"].get("instance") in targets]
            ok = len(mine) == len(targets) and all(t["health"] == "up" for t in mine)
            return mine if ok else None

        return poll(up, timeout=timeout, what=f"targets {list(targets)} up")

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_value(self, expr: str, timeout: float = 30) -> float:
        """Wait until ``expr`` returns exactly one sample; return its value."""

        def value() -> float | None:
            self._alive()
            result = self.query(expr)
            return float(result[0]["value"][1]) if len(result) == 1 else None

        return poll(value, timeout=timeout, what=f"query {expr!r}")


@contextlib.contextmanager
def run_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    job: str = "leadflow",
    binary: str | None = None,
) -> Iterator[Prometheus]:
    """A Prometheus server scraping ``targets`` (``host:port``, path ``/metrics``)."""
    exe = binary or prometheus_binary()
    if exe is None:
        raise FileNotFoundError("no prometheus binary (apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        stop_process(process, timeout=15)


@contextlib.contextmanager
def serve_registry(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``GET /metrics`` from ``render(registry)`` on a free port; yields ``host:port``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body, content_type = render(registry, self.headers.get("Accept"))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

"""bench.loadgen self-test against real servers. Counts only: never assert on speed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench import loadgen, nullapp


@pytest.fixture(scope="module")
def null_url() -> Iterator[str]:
    with nullapp.serve("bench.nullapp:app") as url:
        yield url


def test_request_count_mode_adds_up(null_url: str) -> None:
    result = loadgen.run(
        f"{null_url}/v1/leads",
        method="POST",
        bodies=[b'{"a":1}', b'{"b":"' + b"x" * 5000 + b'"}'],
        headers={"content-type": "application/json"},
        concurrency=64,
        requests=300,
    )
    assert result.requests == 300
    assert result.status_counts == {200: 300}
    assert result.errors == 0
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert result.rps > 0


def test_record_gives_each_response_its_body_index(null_url: str) -> None:
    """``record``: one (body index, latency) per response; bodies rotate in order."""
    result = loadgen.run(f"{null_url}/v1/leads", method="POST",
                         bodies=[b'{"a":1}', b'{"b":2}', b'{"c":3}'],
                         headers={"content-type": "application/json"}, concurrency=4,
                         requests=30, record=True)
    assert len(result.samples) == result.requests == 30
    assert sorted(i for i, _ in result.samples) == [0] * 10 + [1] * 10 + [2] * 10
    assert all(latency > 0 for _, latency in result.samples)


def test_duration_mode_adds_up(null_url: str) -> None:
    result = loadgen.run(null_url, concurrency=8, duration=0.5)
    assert result.requests > 0
    assert sum(result.status_counts.values()) == result.requests
    assert result.errors == 0


class _CloseHandler(BaseHTTPRequestHandler):
    """HTTP/1.0 server: every response closes the connection; 404 for /missing."""

    def do_GET(self) -> None:
        body = b"nope" if self.path == "/missing" else b"hello"
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_reconnects_when_server_closes_and_counts_statuses() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CloseHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        ok = loadgen.run(f"{base}/", concurrency=4, requests=40)
        missing = loadgen.run(f"{base}/missing", concurrency=2, requests=10)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert ok.status_counts == {200: 40} and ok.errors == 0
    assert missing.status_counts == {404: 10}


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        loadgen.run("http://127.0.0.1:1/", requests=10, duration=1.0)
    with pytest.raises(ValueError, match="http"):
        loadgen.run("https://127.0.0.1:1/", requests=10)

"""HTTP/1.1 load generator that runs in its own process.

:func:`run` starts ``python -m bench.loadgen --spec-stdin`` (optionally pinned to a CPU), hands
it a :class:`LoadSpec` and returns its :class:`LoadResult`, so the generator never shares the
measured server's interpreter or core.

Inside, it is a uvloop event loop with ``concurrency`` keep-alive connections, each an
``asyncio.Protocol`` on a raw transport (no aiohttp, no StreamReader): write one pre-encoded
request, read the full response (status line, ``Content-Length`` or chunked body), record
the latency, write the next. Requests on one connection never overlap. Bodies rotate
through ``bodies``. It stops after ``requests`` responses or ``duration`` seconds.

``LoadResult.cpu_util`` is the generator's own CPU time over wall time: near 1.0 means the
generator, not the server, was the bottleneck.

Open loop (``rate``): requests are due on a fixed schedule, request i at ``i / rate``
seconds after the start, whatever the replies. A free connection takes the next due
request and sends it when it is due (at once if it is late: every connection was busy);
its latency is counted from when it was *due*, not from when it was sent, so a stalled
server's queueing shows in the percentiles instead of slowing the sender down
(coordinated omission corrected, as wrk2 does). ``concurrency`` is then the most
requests in flight at once; every request due within ``duration`` is sent, so a run ends
once the last of them is answered.

``record``: the result also carries ``samples``, one ``(body index, latency s)`` per
response, so a caller that knows what each body costs the server (bench.ping: the slowest
buyer answer a ping waits for) can subtract it per request.

CLI::

    python -m bench.loadgen http://127.0.0.1:8000/v1/leads -X POST -d '{"a":1}' \\
        -H 'content-type: application/json' -c 64 -t 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import msgspec

ROOT = Path(__file__).resolve().parent.parent


class LoadSpec(msgspec.Struct, kw_only=True):
    url: str
    method: str = "GET"
    bodies: list[bytes] = msgspec.field(default_factory=lambda: [b""])
    headers: dict[str, str] = {}
    concurrency: int = 64
    requests: int | None = None  # stop after this many responses ...
    duration: float | None = None  # ... or after this many seconds
    timeout: float = 30.0  # per request; a stuck request is an error and its conn reopens
    rate: float | None = None  # open loop: requests per second on a schedule (module docs)
    record: bool = False  # return (body index, latency s) per response in ``samples``


class LoadResult(msgspec.Struct, kw_only=True):
    requests: int  # completed responses (any status)
    errors: int  # connection errors and timeouts (no response)
    elapsed_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    p999_ms: float = 0.0
    status_counts: dict[int, int]
    cpu_s: float  # CPU time (user + sys) of the generator process
    cpu_util: float  # cpu_s / elapsed_s
    samples: list[tuple[int, float]] = []  # with ``record``: (body index, latency s)


def run(
    url: str,
    *,
    method: str = "GET",
    bodies: Sequence[bytes] = (b"",),
    headers: Mapping[str, str] | None = None,
    concurrency: int = 64,
    requests: int | None = None,
    duration: float | None = None,
    timeout: float = 30.0,
    cpu: int | None = None,
    rate: float | None = None,
    record: bool = False,
) -> LoadResult:
    """Run a load test in a separate process (pinned to ``cpu`` if given) and return its result."""
    spec = LoadSpec(
        url=str(url),  # a str subclass (bench.engine_proc.EngineURL) does not encode
        method=method,
        bodies=list(bodies) or [b""],
        headers=dict(headers or {}),
        concurrency=concurrency,
        requests=requests,
        duration=duration,
        timeout=timeout,
        rate=rate,
        record=record,
    )
    _validate(spec)
    cmd = [sys.executable, "-m", "bench.loadgen", "--spec-stdin"]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    limit = (duration or 0) + timeout + 60 if duration else None
    proc = subprocess.run(
        cmd,
        input=msgspec.msgpack.encode(spec),
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=limit,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return msgspec.msgpack.decode(proc.stdout, type=LoadResult)


def _validate(spec: LoadSpec) -> None:
    if (spec.requests is None) == (spec.duration is None):
        raise ValueError("give exactly one of requests or duration")
    if spec.concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if urlsplit(spec.url).scheme != "http":
        raise ValueError("only http:// URLs")
    if spec.rate is not None and (spec.rate <= 0 or spec.duration is None):
        raise ValueError("an open-loop rate must be positive and given with a duration")


def _encode_requests(spec: LoadSpec) -> tuple[str, int, list[bytes]]:
    parts = urlsplit(spec.url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    names = {k.lower() for k in spec.headers}
    head = f"{spec.method} {target} HTTP/1.1\r\n"
    if "host" not in names:
        head += f"Host: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in spec.headers.items())
    out = []
    for body in spec.bodies:
        length = "" if "content-length" in names else f"Content-Length: {len(body)}\r\n"
        out.append((head + length + "\r\n").encode("latin-1") + body)
    return host, port, out


class _Shared:
    """State shared by all connections of one run."""

    def __init__(self, spec: LoadSpec) -> None:
        self.host, self.port, self.requests = _encode_requests(spec)
        self.limit = spec.requests
        self.deadline = (
            time.perf_counter() + spec.duration if spec.duration is not None else float("inf")
        )
        self.timeout = spec.timeout
        self.rate = spec.rate
        self.samples: list[tuple[int, float]] | None = [] if spec.record else None
        self.start = time.perf_counter()
        self.issued = 0
        self.latencies: list[float] = []
        self.status: dict[int, int] = {}
        self.errors = 0
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.conns: set[_Conn] = set()
        self.connecting = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def pending(self) -> bool:
        if self.limit is not None:
            return self.issued < self.limit
        if self.rate is not None:
            return self.pending_open()
        return time.perf_counter() < self.deadline

    def next_request(self) -> bytes | None:
        if not self.pending():
            return None
        req = self.requests[self.issued % len(self.requests)]
        self.issued += 1
        return req

    def due(self) -> float:
        """Open loop: when the request just taken (``issued - 1``) is due."""
        assert self.rate is not None
        return self.start + (self.issued - 1) / self.rate

    def pending_open(self) -> bool:
        """Open loop: the next request is due before the end of the run."""
        assert self.rate is not None
        return self.start + self.issued / self.rate < self.deadline

    def lost(self, in_flight: bool) -> None:
        """A connection closed; ``in_flight``: it had a request without a response."""
        if in_flight:
            self.errors += 1
            if self.limit is not None:
                self.issued -= 1  # that request will be sent again on another connection
        self.check()

    def check(self) -> None:
        if self.done.done():
            return
        if self.errors > 1000:
            self.done.set_exception(RuntimeError(f"{self.errors} connection errors"))
        elif self.pending() and len(self.conns) + self.connecting < self.want:
            self.connect()
        elif not self.conns and not self.connecting:
            self.done.set_result(None)

    want = 0

    def connect(self, delay: float = 0.0) -> None:
        self.connecting += 1
        task = self.loop.create_task(self._connect(delay))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)  # back-off after a refused connection
        try:
            await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.errors += 1
            self.connecting -= 1
            if self.pending() and not self.done.done():
                self.connect(delay=0.05)
            else:
                self.check()
            return
        self.connecting -= 1


class _Conn(asyncio.Protocol):
    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.started = 0.0
        self.index = 0  # the body index of the request in flight
        self.in_flight = False
        self.need = -1  # size of the full response once its head is parsed; -2 = chunked
        self.head_end = 0
        self.status = 0
        self.closing = False  # server said Connection: close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.shared.conns.add(self)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        s = self.shared
        req = s.next_request()
        if req is None:
            self.in_flight = False
            self.transport.close()
            return
        self.in_flight = True
        self.index = (s.issued - 1) % len(s.requests)
        if s.rate is None:
            self.started = time.perf_counter()
            self.transport.write(req)
            return
        # open loop: latency from when it was due; sent then, or now if already late
        self.started = due = s.due()
        wait = due - time.perf_counter()
        if wait > 0:
            s.loop.call_later(wait, self._write, req)
        else:
            self.transport.write(req)

    def _write(self, req: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while self.in_flight:
            if self.need == -1:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                self.closing = b"\r\nconnection: close" in head
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.need = end + 4 + int(head[i + 17 : j if j >= 0 else len(head)])
                elif b"\r\ntransfer-encoding: chunked" in head:
                    self.need = -2
                    self.head_end = end + 4
                else:
                    self.need = end + 4  # no body
            if self.need == -2:  # chunked: complete at the terminating zero-size chunk
                term = buf.find(b"0\r\n\r\n", self.head_end)
                if term < 0:
                    return
                total = term + 5
            else:
                total = self.need
                if len(buf) < total:
                    return
            s = self.shared
            latency = time.perf_counter() - self.started
            s.latencies.append(latency)
            if s.samples is not None:
                s.samples.append((self.index, latency))
            s.status[self.status] = s.status.get(self.status, 0) + 1
            del buf[:total]
            self.need = -1
            if self.closing:
                self.in_flight = False
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.conns.discard(self)
        in_flight, self.in_flight = self.in_flight, False
        self.shared.lost(in_flight)


async def _watchdog(shared: _Shared) -> None:
    """Abort connections whose request is older than ``timeout`` (counted as errors)."""
    while not shared.done.done():
        await asyncio.sleep(min(1.0, shared.timeout / 4))  # periodic scan, not a sync point
        now = time.perf_counter()
        for conn in list(shared.conns):
            if conn.in_flight and now - conn.started > shared.timeout and conn.transport:
                conn.transport.abort()


async def _main(spec: LoadSpec) -> LoadResult:
    shared = _Shared(spec)
    shared.want = spec.concurrency
    cpu0 = os.times()
    t0 = time.perf_counter()
    for _ in range(spec.concurrency):
        shared.connect()
    shared.start = t0
    watchdog = asyncio.create_task(_watchdog(shared))
    try:
        await shared.done
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    lat = sorted(shared.latencies)
    n = len(lat)

    def pct(q: float) -> float:
        return lat[min(n - 1, int(q * n))] * 1000 if n else 0.0

    return LoadResult(
        requests=n,
        errors=shared.errors,
        elapsed_s=elapsed,
        rps=n / elapsed if elapsed > 0 else 0.0,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=lat[-1] * 1000 if n else 0.0,
        p999_ms=pct(0.999),
        status_counts=dict(sorted(shared.status.items())),
        cpu_s=cpu,
        cpu_util=cpu / elapsed if elapsed > 0 else 0.0,
        samples=shared.samples or [],
    )


def run_in_process(spec: LoadSpec) -> LoadResult:
    """Run in *this* process (what the child of :func:`run` does)."""
    import uvloop

    _validate(spec)
    return uvloop.run(_main(spec))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("url", nargs="?")
    p.add_argument("-X", "--method", default=None)
    p.add_argument("-d", "--data", action="append", default=[], help="body; @file reads a file")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-n", "--requests", type=int)
    p.add_argument("-t", "--duration", type=float)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: requests per second on a schedule (with -t)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--spec-stdin", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.spec_stdin:
        spec = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=LoadSpec)
        sys.stdout.buffer.write(msgspec.msgpack.encode(run_in_process(spec)))
        return 0
    if not args.url:
        p.error("url is required")
    bodies = [Path(d[1:]).read_bytes() if d.startswith("@") else d.encode() for d in args.data]
    headers = dict(h.split(":", 1) for h in args.header)
    spec = LoadSpec(
        url=args.url,
        method=args.method or ("POST" if bodies else "GET"),
        bodies=bodies or [b""],
        headers={k.strip(): v.strip() for k, v in headers.items()},
        concurrency=args.concurrency,
        requests=args.requests,
        duration=10.0 if args.duration is None and args.requests is None else args.duration,
        timeout=args.timeout,
        rate=args.rate,
    )
    result = run_in_process(spec)
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        print(
            f"{result.requests} requests in {result.elapsed_s:.2f}s: {result.rps:,.0f} req/s, "
            f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
            f"p99.9 {result.p999_ms:.2f} ms, max {result.max_ms:.2f} ms, "
            f"errors {result.errors}, status {result.status_counts}, "
            f"loadgen cpu {result.cpu_util:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

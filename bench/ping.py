"""Ping-post: pings/s of ``leadflow run`` against a bare aiohttp fan-out, the engine's own
overhead per ping, and its instructions per ping (#17).

``python -m bench ping [--duration 10] [--concurrency 64] [--no-instructions]``

1. *buyers*: 10 ping buyers on loopback (bench.pingfarm, aiohttp, one process pinned to
   the load generator's CPU), each answering a bid after a fixed, seeded delay of 20-80 ms
   that depends on the ping's zip (:func:`bench.pingfarm.delay_ms`), so the slowest
   answer of every ping is known to this side before it is sent;
2. *the ceiling*: a bare aiohttp fan-out (bench.pingfarm ``fanout``: per request, the same
   body to the same 10 buyers in parallel, answered once all have answered, no engine
   logic), pinned like the engine;
3. *the engine*: ``leadflow run`` as users start it (bench.engine_proc ``as_users_run``,
   its workers too, the pings sweep among them) on an embedded redis-server (AOF
   everysec), config/example.toml plus a ping-post campaign whose 10 buyers are those
   servers (:func:`ping_config`), every client account funded with $10M so every bid is
   held (holds expire after ``ping_ttl_s`` = 5 s, released by the sweep during the run);
4. *closed loop* (bench.loadgen, ``concurrency`` connections, ``duration`` s) on each:
   ``ping_ratio`` = the engine's pings/s over the fan-out's (target >= 0.6);
5. *open loop* at 50 % of the engine's closed-loop rate, once every ping of the closed
   loop has expired and been swept (its backlog is not the open loop's; :func:`wait_swept`)
   (a fixed schedule, latency from
   when each ping was due: coordinated omission corrected), on each, recording every
   ping's latency: its *overhead* is the latency less the slowest buyer answer it waited
   for. ``ping_overhead_p50_ms`` / ``ping_overhead_p99_ms`` are the engine's (target p99
   <= 5 ms); ``ceiling_overhead_*`` the fan-out's at the same rate: what asyncio + aiohttp
   alone cost on this machine. Each server's CPU time per ping in its closed loop is
   reported too (``ping_ratio_per_cpu``: the fan-out's over the engine's), as other work
   on the machine moves it less than the rates;
6. *instructions* (valgrind): the engine's service in-process under callgrind
   (bench.ingest_instructions, mode ``ping``: 16 concurrent ``POST /v1/ping`` through the
   ASGI app, the buyers as above but with deadlines long enough for valgrind's pace),
   N pings less none, per ping -> ``ping_instructions``; the bare fan-out's logic alike
   (bench.pingfarm ``count``, no HTTP server in front either) -> ``instructions_ratio``.

Every phase's buyer requests per ping are counted (10.0: every buyer was asked) and the
engine's bid timeouts read from its /metrics. Prints the figures, then LAST one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench import common, ingest_instructions, loadgen, nullapp
from bench.engine_proc import EngineURL, serve_engine
from bench.pingfarm import slowest_ms
from engine.core import keys
from engine.store.embedded import free_port

BUYERS = 10
SEED = 17
CAMPAIGN, SUPPLIER = "pingbench", "aff-101"
CLIENTS = ("sunpower-direct", "brightside-solar", "safeway-insurance")  # funded, billed
PING_FIELDS = ("state", "zip", "monthly_bill", "homeowner")
TTL_S = 5  # the open loop's own holds expire and are swept in its second half
TARGET_RATIO, TARGET_P99_MS, FRACTION = 0.6, 5.0, 0.5
STATES = ("CA", "TX", "FL", "NY", "AZ", "NV", "CO", "NJ", "MA", "WA")
SECRET = "whsec_" + "bGVhZGZsb3ctYmVuY2gtcGluZy1zZWNyZXQtMDEyMw=="


def ping_config(buyer_urls: Sequence[str], directory: Path, *, deadline_ms: int = 750,
                timeout_ms: int = 500, ttl_s: int = TTL_S, name: str = "ping.toml") -> Path:
    """config/example.toml plus the ping-post campaign ``pingbench`` (the solar campaign's
    fields, ping fields state, zip, monthly_bill and homeowner, exclusive auction, the
    defaults' deadline and per-buyer timeout) with one ping buyer per URL, bidding at
    ``<url>/bid`` (``bid_path = "bid"``), paid by the example's billed clients in turn."""
    cfg = common.load_config()
    solar = next(c for c in cfg.campaigns if c.id == "solar")
    fields = ",\n".join("  " + ingest_instructions.toml_inline(msgspec.to_builtins(f))
                        for f in solar.fields)
    parts = [common.EXAMPLE_CONFIG.read_text(), f"""
[[campaigns]]
tenant = "acme"
id = "{CAMPAIGN}"
fields = [
{fields}
]
ping_post = {{ ping_fields = {ingest_instructions.toml_inline(list(PING_FIELDS))}, \
ping_deadline_ms = {deadline_ms}, ping_ttl_s = {ttl_s} }}
"""]
    for i, url in enumerate(buyer_urls):
        parts.append(f"""
[[buyers]]
tenant = "acme"
id = "pb-{i:02d}"
campaign = "{CAMPAIGN}"
client = "{CLIENTS[i % len(CLIENTS)]}"
price = "0.00"
[buyers.ping]
url = "{url}/bid"
secret = "{SECRET}"
bid_path = "bid"
timeout_ms = {timeout_ms}
""")
    path = directory / name
    path.write_text("".join(parts))
    return path


def ping_bodies(cfg: Any, n: int, *, seed: int, buyers: int = BUYERS
                ) -> tuple[list[bytes], list[float]]:
    """``n`` pings of the bench campaign (random zips) and, for each, the slowest of the
    buyers' answers it will wait for (ms)."""
    key = common.supplier_keys(cfg)[SUPPLIER]
    rng = random.Random(seed)
    bodies, slowest = [], []
    for _ in range(max(1, n)):
        zip_code = f"{rng.randrange(1, 100_000):05d}"
        bodies.append(msgspec.json.encode({
            "lp_campaign_id": CAMPAIGN, "lp_supplier_id": SUPPLIER, "lp_key": key,
            "state": rng.choice(STATES), "zip": zip_code,
            "monthly_bill": rng.randrange(50, 500), "homeowner": True}))
        slowest.append(slowest_ms(SEED, buyers, zip_code))
    return bodies, slowest


@contextlib.contextmanager
def buyer_farm(n: int = BUYERS, *, cpu: int | None = None) -> Iterator[tuple[list[str], int]]:
    """``n`` ping buyers in one process (bench.pingfarm); yields their base URLs and the
    process id."""
    ports = [free_port() for _ in range(n)]
    cmd = [sys.executable, "-m", "bench.pingfarm", "buyers", str(SEED), "0",
           *map(str, ports)]
    with nullapp.serve_command(cmd, ports[-1], cpu=cpu) as last:
        yield [f"http://127.0.0.1:{p}" for p in ports], last.pid


@contextlib.contextmanager
def fanout(buyer_urls: Sequence[str], *, cpu: int | None = None) -> Iterator[EngineURL]:
    """The bare aiohttp fan-out to the buyers (the ceiling), in its own process."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.pingfarm", "fanout", str(port),
           *(u + "/bid" for u in buyer_urls)]
    with nullapp.serve_command(cmd, port, cpu=cpu) as url:
        yield url


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def buyer_requests(buyer_urls: Sequence[str]) -> int:
    """Bid requests the buyers have had so far (their ``/stats``); a bad one fails."""
    total = 0
    for url in buyer_urls:
        with urllib.request.urlopen(url + "/stats", timeout=5) as resp:
            stats = msgspec.json.decode(resp.read())
        if stats["bad"]:
            raise RuntimeError(f"{url}: {stats['bad']} bid requests without a zip")
        total += stats["requests"]
    return total


def engine_counter(url: str, name: str, **labels: str) -> float:
    """The sum of a counter's series on the engine's /metrics that carry ``labels``."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_swept(redis_url: str, tenant: str, *, timeout: float = 120.0) -> float:
    """Wait until no ping of ``tenant`` may hold funds (its ``pings`` ZSET is empty: every
    one expired and swept, or released); seconds waited."""
    r = redis.Redis.from_url(redis_url)
    t0 = time.monotonic()
    try:
        while r.zcard(keys.pings(tenant)):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"pings not swept after {timeout:.0f} s")
            time.sleep(0.5)  # the sweep runs every 5 s
    finally:
        r.close()
    return time.monotonic() - t0


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (bench.loadgen's rule)."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def overhead(samples: Sequence[tuple[int, float]], slowest: Sequence[float]
             ) -> dict[str, float]:
    """Per ping (``samples``: body index, latency s), its latency less the slowest buyer
    answer it waited for (``slowest``, ms, by body index); the percentiles, ms."""
    over = sorted(lat * 1000 - slowest[i] for i, lat in samples)
    return {"p50_ms": round(pct(over, 0.5), 3), "p99_ms": round(pct(over, 0.99), 3),
            "p999_ms": round(pct(over, 0.999), 3),
            "max_ms": round(over[-1], 3) if over else 0.0}


class _Phase:
    """One load run on one side, with the buyers' requests and the servers' CPU it took."""

    def __init__(self, buyer_urls: list[str], pids: dict[str, int]) -> None:
        self.buyer_urls, self.pids = buyer_urls, pids

    def __call__(self, url: str, bodies: list[bytes], *, concurrency: int,
                 duration: float | None = None, requests: int | None = None,
                 rate: float | None = None, record: bool = False, cpu: int | None = None
                 ) -> tuple[loadgen.LoadResult, dict[str, Any]]:
        asked = buyer_requests(self.buyer_urls)
        cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        res = loadgen.run(url + "/v1/ping", method="POST", bodies=bodies,
                          headers=common.JSON_HEADERS, concurrency=concurrency,
                          duration=duration, requests=requests, rate=rate, record=record,
                          cpu=cpu)
        util = {f"{k}_cpu": round((cpu_seconds(p) - cpu0[k]) / res.elapsed_s, 3)
                for k, p in self.pids.items()}
        per = (buyer_requests(self.buyer_urls) - asked) / res.requests if res.requests else 0
        return res, {"per_s": round(res.rps, 1), "p50_ms": round(res.p50_ms, 3),
                     "p99_ms": round(res.p99_ms, 3), "requests": res.requests,
                     "errors": res.errors,
                     "status_counts": {str(k): v for k, v in res.status_counts.items()},
                     "buyer_requests_per_ping": round(per, 3),
                     "loadgen_cpu": round(res.cpu_util, 3), **util}


def slow_calls(redis_url: str, n: int = 10) -> list[list[Any]]:
    """The slowest Redis calls of the run (SLOWLOG: over 10 ms by default), as
    [ms, command, first argument]: a long script call stalls every ping waiting on Redis."""
    r = redis.Redis.from_url(redis_url)
    try:
        entries: Any = r.slowlog_get(128)
    finally:
        r.close()
    out = [[round(e["duration"] / 1000, 1), _text(e["command"]).split(" ")[0],
            _text(e["command"]).split(" ")[1][:12] if " " in _text(e["command"]) else ""]
           for e in entries]
    return sorted(out, reverse=True)[:n]


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def cpu_per_ping(closed: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each server's CPU ms per ping in its own closed loop, and the ceiling's over the
    engine's (what ``ping_ratio`` would be were both CPU-bound on a core of their own)."""
    ms = {side: 1000 * closed[side][f"{side}_cpu"] / closed[side]["per_s"]
          if closed[side]["per_s"] else 0.0 for side in ("engine", "ceiling")}
    return {"engine_cpu_ms_per_ping": round(ms["engine"], 3),
            "ceiling_cpu_ms_per_ping": round(ms["ceiling"], 3),
            "ping_ratio_per_cpu": round(ms["ceiling"] / ms["engine"], 3)
            if ms["engine"] else None}


def run(*, duration: float = 10.0, concurrency: int = 64, warmup: int = 500,
        instructions: bool = True, instruction_pings: int = 200, ttl_s: int = TTL_S,
        quiet: bool = False) -> dict[str, Any]:
    say = (lambda _m: None) if quiet else common.log
    server_cpu, load_cpu = common.pinning()
    out: dict[str, Any] = {"benchmark": "ping", "buyers": BUYERS}
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-ping-") as tmp, \
            buyer_farm(cpu=load_cpu) as (buyer_urls, farm_pid):
        config = ping_config(buyer_urls, Path(tmp), ttl_s=ttl_s)
        cfg = common.load_config(config)
        pool, _ = ping_bodies(cfg, max(2_000, int(duration * 2_000)), seed=1)
        warm, _ = ping_bodies(cfg, warmup, seed=2)
        with fanout(buyer_urls, cpu=server_cpu) as ceiling, \
                common.funded_redis(cfg) as srv, \
                serve_engine(config, srv.url, cpu=server_cpu, as_users_run=True) as engine:
            phase = _Phase(buyer_urls, {"buyers": farm_pid, "ceiling": ceiling.pid,
                                        "engine": engine.pid})
            closed: dict[str, dict[str, Any]] = {}
            for side, url in (("ceiling", ceiling), ("engine", engine)):
                say(f"ping: {side}, closed loop ({concurrency} connections)")
                phase(url, warm, concurrency=concurrency, requests=warmup, cpu=load_cpu)
                _, closed[side] = phase(url, pool, concurrency=concurrency,
                                        duration=duration, cpu=load_cpu)
                say(f"ping: {side} {closed[side]['per_s']:,.0f} pings/s, "
                    f"p99 {closed[side]['p99_ms']:.1f} ms")
            swept = wait_swept(srv.url, "acme")
            say(f"ping: the closed loop's pings swept after {swept:.1f} s")
            rate = closed["engine"]["per_s"] * FRACTION
            bodies, slowest = ping_bodies(cfg, int(rate * duration) + 1, seed=3)
            opened: dict[str, dict[str, Any]] = {}
            for side, url in (("engine", engine), ("ceiling", ceiling)):
                say(f"ping: {side}, open loop at {rate:,.0f} pings/s")
                res, opened[side] = phase(url, bodies, concurrency=max(concurrency, 128),
                                          duration=duration, rate=rate, record=True,
                                          cpu=load_cpu)
                opened[side]["p999_ms"] = round(res.p999_ms, 3)
                opened[side]["overhead"] = overhead(res.samples, slowest)
                say(f"ping: {side} overhead p50 {opened[side]['overhead']['p50_ms']:.2f} ms, "
                    f"p99 {opened[side]['overhead']['p99_ms']:.2f} ms")
            timeouts = engine_counter(engine, "leadflow_ping_bids_total", campaign=CAMPAIGN,
                                      outcome="timeout")
            accepted = engine_counter(engine, "leadflow_pings_total", campaign=CAMPAIGN,
                                      status="accepted")
            slow = slow_calls(srv.url)
        answers = sorted(slowest)
        out.update({
            "ceiling_per_s": closed["ceiling"]["per_s"],
            "engine_per_s": closed["engine"]["per_s"],
            "ping_ratio": round(closed["engine"]["per_s"] / closed["ceiling"]["per_s"], 3)
            if closed["ceiling"]["per_s"] else None,
            # CPU of the server process per ping in its closed loop: the ratio that the
            # machine's other work (its share of the core) moves least
            **cpu_per_ping(closed),
            "open_loop_rate_per_s": round(rate, 1),
            "ping_overhead_p50_ms": opened["engine"]["overhead"]["p50_ms"],
            "ping_overhead_p99_ms": opened["engine"]["overhead"]["p99_ms"],
            "ceiling_overhead_p50_ms": opened["ceiling"]["overhead"]["p50_ms"],
            "ceiling_overhead_p99_ms": opened["ceiling"]["overhead"]["p99_ms"],
            "slowest_answer_p50_ms": round(pct(answers, 0.5), 3),
            "slowest_answer_p99_ms": round(pct(answers, 0.99), 3),
            "closed_loop": closed, "open_loop": opened,
            "engine_bid_timeouts": timeouts, "engine_pings_accepted": accepted,
            "redis_slow_calls": slow, "sweep_wait_s": round(swept, 1),
        })
        if instructions:
            out.update(count_instructions(buyer_urls, instruction_pings, Path(tmp),
                                          quiet=quiet) or {})
    out.update({"duration_s": duration, "concurrency": concurrency, "ping_ttl_s": ttl_s,
                "targets": {"ping_ratio": f">= {TARGET_RATIO}",
                            "ping_overhead_p99_ms": f"<= {TARGET_P99_MS}"},
                "machine": common.machine()})
    return out


def count_instructions(buyer_urls: Sequence[str], n: int, tmp: Path, *, quiet: bool = False
                       ) -> dict[str, Any] | None:
    """CPU instructions per ping under callgrind (N pings less none, the buyers as in the
    timed runs), or None without valgrind: the engine's service in-process through its ASGI
    app (deadline and timeouts of 10 s, as valgrind runs Python ~50x slower), and the bare
    fan-out's logic (bench.pingfarm ``count``); neither with an HTTP server in front."""
    say = (lambda _m: None) if quiet else common.log
    if not shutil.which("valgrind"):
        say("ping: valgrind not found (Debian: apt-get install valgrind); instructions skipped")
        return None
    config = ping_config(buyer_urls, tmp, deadline_ms=10_000, timeout_ms=10_000,
                         name="ping-instructions.toml")
    cfg = common.load_config(config)
    bodies, _ = ping_bodies(cfg, n, seed=4)
    say(f"ping: instructions (callgrind, {n} pings)")
    per = ingest_instructions.per_lead(cfg, "ping", bodies, n, tmp, str(config))
    path = tmp / "fanout.pickle"
    path.write_bytes(pickle.dumps(bodies))

    def fanned(count: int) -> int:
        out = tmp / f"callgrind.fanout.{count}"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, "-m", "bench.pingfarm", "count", str(path), str(count),
                        str(ingest_instructions.PING_CONCURRENCY),
                        *(u + "/bid" for u in buyer_urls)],
                       check=True, cwd=common.ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return common.callgrind_total(out)

    ceiling = (fanned(n) - fanned(0)) / n
    say(f"ping: engine {per:,.0f} instructions per ping, bare fan-out {ceiling:,.0f}")
    return {"ping_instructions": round(per), "ceiling_instructions_per_ping": round(ceiling),
            "instructions_ratio": round(ceiling / per, 3), "ping_instruction_pings": n}


def report(r: dict[str, Any]) -> None:
    c, e = r["closed_loop"]["ceiling"], r["closed_loop"]["engine"]
    print(f"ceiling (bare aiohttp fan-out): {c['per_s']:>7,.0f} pings/s  p99 "
          f"{c['p99_ms']:.1f} ms  (buyer requests/ping {c['buyer_requests_per_ping']})")
    print(f"engine (leadflow run)         : {e['per_s']:>7,.0f} pings/s  p99 "
          f"{e['p99_ms']:.1f} ms  (buyer requests/ping {e['buyer_requests_per_ping']})")
    if r["ping_ratio"] is not None:
        print(f"ping_ratio: {r['ping_ratio']:.2f} (target >= {TARGET_RATIO}: "
              f"{'met' if r['ping_ratio'] >= TARGET_RATIO else 'NOT met'})")
    print(f"CPU per ping (server process, closed loop): engine "
          f"{r['engine_cpu_ms_per_ping']:.2f} ms, fan-out {r['ceiling_cpu_ms_per_ping']:.2f}"
          f" ms: ratio {r['ping_ratio_per_cpu']}")
    print(f"open loop at {r['open_loop_rate_per_s']:,.0f} pings/s (50 % of the engine's "
          f"max), overhead = latency - slowest buyer answer (p50 "
          f"{r['slowest_answer_p50_ms']:.1f} ms, p99 {r['slowest_answer_p99_ms']:.1f} ms):")
    for side in ("engine", "ceiling"):
        o = r["open_loop"][side]["overhead"]
        print(f"  {side:8}: p50 {o['p50_ms']:.2f} ms  p99 {o['p99_ms']:.2f} ms  "
              f"p99.9 {o['p999_ms']:.2f} ms  max {o['max_ms']:.2f} ms")
    ok = r["ping_overhead_p99_ms"] <= TARGET_P99_MS
    print(f"ping_overhead_p99_ms: {r['ping_overhead_p99_ms']:.2f} (target <= {TARGET_P99_MS}:"
          f" {'met' if ok else 'NOT met'}; the bare fan-out's: "
          f"{r['ceiling_overhead_p99_ms']:.2f})")
    if r.get("ping_instructions") is not None:
        print(f"ping_instructions: {r['ping_instructions']:,} per ping (callgrind; the bare "
              f"fan-out's {r['ceiling_instructions_per_ping']:,}: ratio "
              f"{r['instructions_ratio']:.2f})")
    print(f"machine: {common.machine_line(r['machine'])}")
    print(msgspec.json.encode(r).decode(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ping", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop connections")
    p.add_argument("--no-instructions", action="store_true",
                   help="skip the callgrind count (valgrind)")
    p.add_argument("--instruction-pings", type=int, default=200)
    p.add_argument("--ttl", type=int, default=TTL_S,
                   help="the campaign's ping_ttl_s (holds expire and are swept during a "
                        "run when it is shorter than the run)")
    args = p.parse_args(argv)
    report(run(duration=args.duration, concurrency=args.concurrency, ttl_s=args.ttl,
               instructions=not args.no_instructions,
               instruction_pings=args.instruction_pings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

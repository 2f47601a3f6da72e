"""CPU instructions per lead of the engine process, under callgrind.

``python -m bench ingest --instructions [--requests 2000] [--batches 20]``: the engine's
ASGI app (``engine.run.service.Service`` with no workers, as ``leadflow run`` builds it) is
driven in-process, without an HTTP server: 64 concurrent ``POST /v1/leads`` of the ingest
benchmark's leads, then 8 concurrent ``POST /v1/leads/batch`` of 100. Each side runs in a
child process under ``valgrind --tool=callgrind`` once with N requests and once with none;
the difference divided by the leads is what one lead costs the engine's Python: decoding,
validation, routing, the batcher, the Redis client, metrics, the response (Redis is another
process, not counted). Wall-clock rates on this VM move by 20-40 % within the hour; these
counts repeat to about 0.5 %, so engine-side changes are checked with them, as decide.lua's
are with ``bench lua --instructions``. HTTP parsing and sockets are left out: the null
endpoint's share, the same for every change to the engine.
"""

from __future__ import annotations

import asyncio
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from bench import common

SINGLE_CONCURRENCY, BATCH_CONCURRENCY, BATCH_SIZE, PING_CONCURRENCY = 64, 8, 100, 16
_MODES = {  # mode -> (path, content type, concurrency)
    "single": ("/v1/leads", b"application/json", SINGLE_CONCURRENCY),
    "batch": ("/v1/leads/batch", b"application/x-ndjson", BATCH_CONCURRENCY),
    "ping": ("/v1/ping", b"application/json", PING_CONCURRENCY),  # bench.ping
}


async def drive(app: Any, mode: str, bodies: list[bytes]) -> None:
    """POST every body to the ASGI app, ``concurrency`` at a time; every answer must be a
    decision or a field error (the generator makes some invalid leads on purpose)."""
    path, ctype, concurrency = _MODES[mode]
    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", ctype)]}
    todo = iter(bodies)

    async def client() -> None:
        for body in todo:
            status = await _post(app, scope, body)
            if status not in (200, 422):
                raise RuntimeError(f"unexpected HTTP status {status}")

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def _post(app: Any, scope: dict[str, Any], body: bytes) -> int:
    """One request through the ASGI app; its status."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(dict(scope), receive, send)
    return int(sent[0]["status"])


def child(mode: str, redis_url: str, bodies_file: str, n: int,
          config: str = str(common.EXAMPLE_CONFIG)) -> None:
    """What runs under callgrind: start the service, post the first ``n`` bodies, stop."""
    import uvloop

    bodies = pickle.loads(Path(bodies_file).read_bytes())[:n]
    uvloop.run(_serve_and_drive(mode, redis_url, bodies, config))


async def _serve_and_drive(mode: str, redis_url: str, bodies: list[bytes], config: str
                           ) -> None:
    from engine.run.service import Service, tune_gc

    cfg = common.load_config(config)
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-ii-") as state_dir:
        svc = Service(cfg, redis_url=redis_url, host="127.0.0.1", port=0,
                      state_dir=state_dir, workers=[])
        await svc.start(serve=False)
        tune_gc()  # as `leadflow run` does once serving
        try:
            await drive(svc.app, mode, bodies)
        finally:
            await svc.stop()


def _count(mode: str, redis_url: str, bodies_file: Path, n: int, out_dir: Path,
           config: str = str(common.EXAMPLE_CONFIG), tag: str = "") -> int:
    out = out_dir / f"callgrind.{mode}{tag}.{n}"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-m", "bench.ingest_instructions", "--child", mode,
                    redis_url, str(bodies_file), str(n), config],
                   check=True, cwd=common.ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return common.callgrind_total(out)


def per_lead(cfg: Any, mode: str, bodies: list[bytes], leads: int, tmp: Path,
             config: str = str(common.EXAMPLE_CONFIG)) -> float:
    """One mode on its own freshly funded Redis (the other's sales use up no cap of it):
    the engine's instructions with every body posted less with none, per lead."""
    path = tmp / f"{mode}.pickle"
    path.write_bytes(pickle.dumps(bodies))
    with common.funded_redis(cfg) as srv:
        base = _count(mode, srv.url, path, 0, tmp, config)
        return (_count(mode, srv.url, path, len(bodies), tmp, config) - base) / leads


def run(requests: int = 2_000, batches: int = 20, *, quiet: bool = False
        ) -> dict[str, Any] | None:
    """Instructions per lead (single posts, batch lines), or None when valgrind is missing."""
    say = (lambda _m: None) if quiet else common.log
    if not shutil.which("valgrind"):
        say("ingest --instructions: valgrind not found (Debian: apt-get install valgrind)")
        return None
    cfg = common.load_config()
    work = {"single": (common.single_bodies(cfg, requests, seed=11), requests),
            "batch": (common.batch_bodies(cfg, batches, BATCH_SIZE, seed=22,
                                          start=10_000_000), batches * BATCH_SIZE)}
    per: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-ii-") as tmp:
        for mode, (bodies, leads) in work.items():
            per[mode] = per_lead(cfg, mode, bodies, leads, Path(tmp))
    say(f"ingest: engine {per['single']:,.0f} instructions per lead posted alone, "
        f"{per['batch']:,.0f} per batch line (callgrind, in-process ASGI, {requests:,} "
        f"requests, {batches} batches of {BATCH_SIZE})")
    return {"engine_instructions_per_lead": round(per["single"]),
            "engine_instructions_per_batch_lead": round(per["batch"]),
            "engine_instruction_requests": requests, "engine_instruction_batches": batches}


# -- buyers_growth: the same lead with 1 and with 200 eligible buyers --------------------

GROWTH_CAMPAIGN, GROWTH_CLIENT, GROWTH_SUPPLIER = "growth", "brightside-solar", "aff-101"
GROWTH_BUYERS = (1, 200)
TARGET_BUYERS_GROWTH = 2.0


def growth_config(n_buyers: int, directory: Path) -> Path:
    """config/example.toml plus a waterfall campaign ``growth`` (the solar campaign's fields
    and dedupe) with ``n_buyers`` buyers, every one eligible for every lead (a block
    filter on AK/HI, a schedule open all week, no caps): the first (priority 1) takes every
    lead, the others (priority 2) wait behind it, as a large campaign's buyers do. Each
    buyer's filter is its own (a range up to 5000 + its number): no two are the same."""
    from engine.core.config import Config

    base = common.EXAMPLE_CONFIG.read_text()
    cfg: Config = common.load_config()
    solar = next(c for c in cfg.campaigns if c.id == "solar")
    fields = ",\n".join("  " + toml_inline(msgspec.to_builtins(f)) for f in solar.fields)
    dedupe = toml_inline(msgspec.to_builtins(solar.dedupe))
    parts = [base, f"""
[[campaigns]]
tenant = "acme"
id = "{GROWTH_CAMPAIGN}"
distribution = "waterfall"
dedupe = {dedupe}
fields = [
{fields}
]
"""]
    for i in range(n_buyers):
        parts.append(f"""
[[buyers]]
tenant = "acme"
id = "g-{i:03d}"
campaign = "{GROWTH_CAMPAIGN}"
client = "{GROWTH_CLIENT}"
price = "{10 + i % 7}.00"
priority = {1 if i == 0 else 2}
filters = [{{ field = "state", op = "states", values = ["AK", "HI"], action = "block" }},
           {{ field = "monthly_bill", op = "range", min = 0, max = {5000 + i} }}]
schedule = {{ days = {_DAYS}, start = "00:00", end = "24:00" }}
""")
    path = directory / f"growth-{n_buyers}.toml"
    path.write_text("".join(parts))
    return path


_DAYS = '["mon", "tue", "wed", "thu", "fri", "sat", "sun"]'


def toml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_inline(v)}" for k, v in value.items()
                                if v is not None) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return msgspec.json.encode(str(value)).decode()


def growth_bodies(cfg: Any, n: int, *, seed: int = 77) -> list[bytes]:
    """``n`` valid solar leads (the generator's), posted to the growth campaign by one
    supplier; none of AK or HI, so every buyer is eligible for every lead."""
    keys = common.supplier_keys(cfg)
    out: list[bytes] = []
    start = 40_000_000
    while len(out) < n:
        for lead in common.lead_dicts(cfg, 4 * n, seed=seed + start, start=start):
            if lead["lp_campaign_id"] != "solar" or lead.get("state") in ("AK", "HI") or \
                    lead["lp_supplier_id"] != GROWTH_SUPPLIER:
                continue
            body = {**lead, "lp_campaign_id": GROWTH_CAMPAIGN,
                    "lp_key": keys[GROWTH_SUPPLIER]}
            out.append(msgspec.json.encode(body))
        start += 4 * n
    return out[:n]


def growth(requests: int = 1_000, buyers: tuple[int, ...] = GROWTH_BUYERS, *,
           quiet: bool = False) -> dict[str, Any] | None:
    """The engine's instructions per lead posted alone with ``buyers`` eligible buyers in
    the campaign, and ``buyers_growth``: the last over the first. None without valgrind."""
    say = (lambda _m: None) if quiet else common.log
    if not shutil.which("valgrind"):
        return None
    per: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-growth-") as tmp:
        tmpdir = Path(tmp)
        for n in buyers:
            config = growth_config(n, tmpdir)
            cfg = common.load_config(config)
            bodies = growth_bodies(cfg, requests)
            path = tmpdir / f"growth-{n}.pickle"
            path.write_bytes(pickle.dumps(bodies))
            with common.funded_redis(cfg) as srv:
                base = _count("single", srv.url, path, 0, tmpdir, str(config), f"-g{n}")
                full = _count("single", srv.url, path, len(bodies), tmpdir, str(config),
                              f"-g{n}")
            per[n] = (full - base) / requests
            say(f"ingest: {per[n]:,.0f} engine instructions per lead with {n} eligible "
                f"buyer(s) (callgrind, {requests:,} single posts)")
    first, last = buyers[0], buyers[-1]
    return {"buyers_growth": round(per[last] / per[first], 3),
            "engine_instructions_per_lead_by_buyers": {str(n): round(v) for n, v in per.items()},
            "buyers_growth_requests": requests}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        mode, redis_url, bodies_file, count, config = sys.argv[2:7]
        child(mode, redis_url, bodies_file, int(count), config)
    else:
        run()

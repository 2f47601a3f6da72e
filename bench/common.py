"""What the benchmarks share: the example config, a funded embedded Redis, lead bodies,
the machine line, CPU pinning."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.core.config import Config, resolve_secret
from engine.core.constants import WALLET
from engine.run import configfile
from engine.run.demo import make_leads
from engine.store.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config" / "example.toml"
RESULTS = Path(__file__).resolve().parent / "results"
# every account with a balance is topped up by this much before a run, so a benchmark keeps
# selling (ledger writes, fees, deliveries) instead of measuring "wallet at floor" rejections
TOP_UP_MICROS = 10_000_000 * 1_000_000  # $10,000,000
JSON_HEADERS = {"content-type": "application/json"}
NDJSON_HEADERS = {"content-type": "application/x-ndjson"}

_enc = msgspec.json.Encoder()


def pinning() -> tuple[int | None, int | None]:
    """(engine CPU, load generator CPU): 0 and 1 when taskset exists and there are 2+ CPUs."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return 0, 1
    return None, None


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "pinned": pinning() != (None, None),
        # other work on the machine skews ratios too (the ceiling and the figure run apart)
        "loadavg_1m": _loadavg(),
    }


def _loadavg() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return None


def machine_line(m: dict[str, Any] | None = None) -> str:
    m = m or machine()
    pin = "engine on CPU 0, load on CPU 1" if m["pinned"] else "not pinned"
    load = m.get("loadavg_1m")
    busy = f", load average {load:.2f} at the end" if load is not None else ""
    return f"{m['nproc']} CPUs, {m['cpu']}, Python {m['python']} ({pin}{busy})"


def load_config(path: str | os.PathLike[str] = EXAMPLE_CONFIG) -> Config:
    return configfile.load(str(path))


async def _fund(cfg: Config, url: str) -> None:
    from engine.run.provision import provision_accounts
    from engine.store.store import Store, connect

    store = Store(connect(url))
    try:
        await store.load_scripts()
        await provision_accounts(cfg, store)
        accounts = [(t.id, WALLET) for t in cfg.tenants]
        accounts += [(c.tenant, c.id) for c in cfg.clients if c.billing != "none"]
        for tenant, account in accounts:
            res = await store.adjust(tenant, account, TOP_UP_MICROS, "adjustment",
                                     op_id=f"bench-top-up-{account}")
            if not res.ok:
                raise RuntimeError(f"top-up of {tenant}/{account} refused: {res.error}")
    finally:
        await store.redis.aclose()


@contextlib.contextmanager
def funded_redis(cfg: Config, *, persistent: bool = True) -> Iterator[EmbeddedRedis]:
    """A throwaway redis-server (AOF everysec, like production) in a temp dir, with the
    config's accounts provisioned and topped up; stopped and removed at the end."""
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-redis-") as tmp:
        server = EmbeddedRedis(tmp, appendfsync="everysec", persistent=persistent)
        with server:
            asyncio.run(_fund(cfg, server.url))
            yield server


def supplier_keys(cfg: Config) -> dict[str, str]:
    return {s.id: resolve_secret(s.key) for s in cfg.suppliers}


def lead_dicts(cfg: Config, n: int, *, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` realistic leads (engine.run.demo's generator) with their supplier's ``lp_key``."""
    keys = supplier_keys(cfg)
    leads = make_leads(random.Random(seed), n, start=start)
    return [{**lead, "lp_key": keys[lead["lp_supplier_id"]]} for lead in leads]


def single_bodies(cfg: Config, n: int, *, seed: int, start: int = 0) -> list[bytes]:
    """JSON bodies for ``POST /v1/leads``: unique people (emails numbered from ``start``)."""
    return [_enc.encode(lead) for lead in lead_dicts(cfg, n, seed=seed, start=start)]


def batch_bodies(cfg: Config, batches: int, size: int, *, seed: int, start: int = 0,
                 chunk: int = 10_000) -> list[bytes]:
    """NDJSON bodies of ``size`` leads each for ``POST /v1/leads/batch``; generated in chunks
    so a million leads never sit in memory as dicts."""
    out: list[bytes] = []
    total = batches * size
    done = 0
    while done < total:
        n = min(chunk - chunk % size or size, total - done)
        lines = [_enc.encode(lead) for lead in lead_dicts(cfg, n, seed=seed + done,
                                                          start=start + done)]
        out += [b"\n".join(lines[i:i + size]) + b"\n" for i in range(0, n, size)]
        done += n
    return out


def callgrind_total(path: Path, text: str | None = None) -> int:
    """The instruction total of one callgrind output file (its ``summary:`` or
    ``totals:`` line); ``text``: the file's content, when the caller has read it."""
    for line in (path.read_text(errors="replace") if text is None else text).splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {path}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

"""Instructions per delivery of the worker and of the bare aiohttp loop, under callgrind.

``python -m bench delivery --instructions [N]``: the same worker, sink and ceiling loop as
:mod:`bench.delivery`, but each side runs in a child process under ``valgrind
--tool=callgrind``, once with N jobs and once with none; the difference divided by N is the
CPU instructions one delivery costs that process. Wall-clock rates on a shared 2-core VM
move by 10-20 % from run to run (docs/benchmarks.md); instruction counts repeat to within
0.1 %, so this is how a hot-path change too small for the timed benchmark is checked. It
counts instructions, not cache misses or syscalls, so it is a companion to the timed ratio,
not a substitute: the issue's target stays the timed one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from bench import common
from bench import delivery as bd
from engine.run.service import tune_gc
from engine.store.store import Store, connect


async def _child(mode: str, redis_url: str, url: str, n: int) -> None:
    """What runs under callgrind: drain the stream (worker) or post n bodies (ceiling)."""
    if mode == "ceiling":
        tune_gc()
        if n:
            await bd._ceiling_rate(url, n)
        return
    store = Store(connect(redis_url, max_connections=128))
    w = bd.BenchWorker(store, bd.bench_buyer(url), n)
    await w.start()
    tune_gc()
    await bd.drain(w)
    await store.redis.aclose()


def _instructions(mode: str, redis_url: str, url: str, n: int, out_dir: str) -> int:
    out = Path(out_dir) / f"callgrind.{mode}.{n}"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-m", "bench.instructions", "--child", mode, redis_url,
                    url, str(n)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return common.callgrind_total(out)


def run(n: int = 2_000) -> dict[str, float] | None:
    """Instructions per delivery on both sides and their ratio; None without valgrind."""
    if shutil.which("valgrind") is None:
        print("instructions: valgrind not found (apt-get install valgrind); skipped")
        return None
    with tempfile.TemporaryDirectory() as tmp, bd.sink_and_redis() as (url, srv, _):

        async def sell(count: int, first: int) -> None:
            store = Store(connect(srv.url))
            await bd._sell(store, bd.bench_buyer(url), count, first=first)
            await store.redis.aclose()

        per: dict[str, float] = {}
        uvloop.run(sell(1, 10**7))  # the consumer group and scripts exist in both runs
        for mode in ("worker", "ceiling"):
            base = _instructions(mode, srv.url, url, 0, tmp)
            if mode == "worker":
                uvloop.run(sell(n, 0))
            per[mode] = (_instructions(mode, srv.url, url, n, tmp) - base) / n
    ratio = per["ceiling"] / per["worker"]
    print(f"instructions per delivery (callgrind, {n} deliveries): worker "
          f"{per['worker']:,.0f}, bare aiohttp loop {per['ceiling']:,.0f}, "
          f"ratio {ratio:.3f}")
    return {"worker_instructions": per["worker"], "ceiling_instructions": per["ceiling"],
            "instructions_ratio": ratio}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        mode, redis_url, url, count = sys.argv[2:6]
        uvloop.run(_child(mode, redis_url, url, int(count)))
    else:
        run(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000)

"""Measure the null-endpoint ceiling of HTTP server stacks with bench.loadgen.

``python -m bench.http_ceiling [--duration 10] [--repeat 3]``: for each stack, serve the null
app pinned to CPU 0 and drive it from the load generator pinned to CPU 1 (64 keep-alive
connections, POST of a ~200-byte JSON body). Prints one JSON line per run and a summary
(median of the runs by req/s). Results go into docs/http-stack.md by hand.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from typing import Any, Literal

import msgspec

from bench import loadgen, nullapp

BODY = msgspec.json.encode(
    {
        "campaign": "c1",
        "supplier": "s1",
        "email": "someone@example.com",
        "phone": "+15555550100",
        "state": "CA",
        "zip": "94105",
        "first_name": "Ada",
        "last_name": "Lovelace",
    }
)

Stack = tuple[str, str, Literal["uvicorn", "granian"], Literal["asgi", "rsgi"]]
STACKS: list[Stack] = [
    ("uvicorn-httptools-asgi", "bench.nullapp:app", "uvicorn", "asgi"),
    ("granian-asgi", "bench.nullapp:app", "granian", "asgi"),
    ("granian-rsgi", "bench.nullapp:rsgi_app", "granian", "rsgi"),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    summary: dict[str, Any] = {}
    for name, ref, server, interface in STACKS:
        if server == "granian" and shutil.which("granian") is None:
            print(f"{name}: granian not installed, skipped")
            continue
        runs = []
        with nullapp.serve(ref, server=server, interface=interface, cpu=0) as url:
            loadgen.run(url + "/", requests=2000, cpu=1)  # warm-up
            for _ in range(args.repeat):
                r = loadgen.run(
                    url + "/v1/leads",
                    method="POST",
                    bodies=[BODY],
                    headers={"content-type": "application/json"},
                    concurrency=args.concurrency,
                    duration=args.duration,
                    cpu=1,
                )
                print(name, msgspec.json.encode(r).decode(), flush=True)
                runs.append(r)
        mid = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
        summary[name] = {
            "rps_median": round(statistics.median(r.rps for r in runs)),
            "p50_ms": round(mid.p50_ms, 2),
            "p99_ms": round(mid.p99_ms, 2),
            "loadgen_cpu": round(mid.cpu_util, 2),
            "errors": sum(r.errors for r in runs),
            "non_200": sum(n for r in runs for c, n in r.status_counts.items() if c != 200),
        }
    for name, row in summary.items():
        print(f"{name:24} {row}")


if __name__ == "__main__":
    main()

"""``python -m bench all [--quick]`` or ``python -m bench NAME [ARGS]``.

Benchmarks: ingest, lua, delivery, recharge, memory. Each one is self-contained (its own
redis-server on a free port, temp dirs, every process stopped at the end, also on error)
and reports ratios against a ceiling measured in the same run. ``all`` runs them in that
order (lua gets the engine's batch rate from ingest), shows one progress line per stage on
stderr and writes ``bench/results/latest.json`` and ``bench/results/latest.md``.
``--quick`` posts 200k instead of 1M leads in the memory benchmark. ``protocol`` (what the
HTTP server's limits cost a request, in instructions) runs on its own only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from bench import common

NAMES = ("ingest", "lua", "delivery", "recharge", "memory")
EXTRAS = ("protocol",)  # run on their own only: python -m bench protocol


def _delivery_main(argv: Sequence[str]) -> int:
    from bench import delivery

    p = argparse.ArgumentParser(prog="python -m bench delivery",
                                description="deliveries/s of one worker vs a bare aiohttp loop")
    p.add_argument("n", nargs="?", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--instructions", action="store_true",
                   help="also count instructions per delivery under callgrind (valgrind)")
    args = p.parse_args(argv)
    delivery.run(args.n, args.rounds)
    if args.instructions:
        from bench import instructions

        instructions.run()
    return 0


def _one(name: str, argv: Sequence[str]) -> int:
    if name == "delivery":
        return _delivery_main(argv)
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(argv))


# -- the table ---------------------------------------------------------------------------

def _n(x: float) -> str:
    return f"{x:,.0f}"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def target_bound(results: dict[str, Any]) -> dict[str, Any] | None:
    """What the two ingest targets ask of Redis, against what decide.lua alone did in the
    same run. ``ratio`` >= 0.5 and batch >= 3x single together need the batch endpoint at
    1.5x the null endpoint's rate, and every one of its leads is decided by decide.lua; so
    they are within reach only if decide.lua alone (Redis with a core to itself, no HTTP,
    no Python) decides at least that many. ``headroom`` < 1: they are not, whatever the
    engine's Python costs. None unless both stages ran."""
    ingest, lua = results.get("ingest"), results.get("lua")
    if not ingest or not lua or "error" in ingest or "error" in lua:
        return None
    targets = ingest["targets"]
    single = targets["ratio"] * ingest["ceiling_per_s"]
    batch = targets["batch_ratio"] * single
    return {"single_needed_per_s": round(single, 1), "batch_needed_per_s": round(batch, 1),
            "lua_per_s": lua["leads_per_s"],
            "headroom": round(lua["leads_per_s"] / batch, 3) if batch else 0.0}


def rows(results: dict[str, Any]) -> list[list[str]]:
    """benchmark | figure | ceiling | ratio | target | met?"""
    out: list[list[str]] = []
    for name in NAMES:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            out.append([name, f"failed: {r['error']}", "", "", "", "**no**"])
            continue
        if name == "ingest":
            ok = r["ratio"] >= r["targets"]["ratio"] and r["p99_ms"] <= r["targets"]["p99_ms"]
            out.append(["ingest, POST /v1/leads (64 conns)",
                        f"{_n(r['leads_per_s'])} leads/s, p50 {r['p50_ms']:.1f} ms, "
                        f"p99 {r['p99_ms']:.1f} ms",
                        f"{_n(r['ceiling_per_s'])} req/s (null app, same stack/load), "
                        f"p99 {r['ceiling_p99_ms']:.1f} ms",
                        f"{r['ratio']:.2f}", "≥ 0.5 with p99 ≤ 10 ms", _met(ok)])
            out.append([f"ingest, POST /v1/leads/batch ({r['batch_size']}/req, "
                        f"{r['batch_concurrency']} conns)",
                        f"{_n(r['batch_leads_per_s'])} leads/s",
                        f"{_n(r['leads_per_s'])} leads/s (single endpoint)",
                        f"{r['batch_ratio']:.2f}", "≥ 3", _met(r["batch_ratio"] >= 3.0)])
            if r.get("engine_instructions_per_lead") is not None:
                out.append(["engine, CPU instructions per lead (callgrind, in-process ASGI, "
                            "no HTTP server)",
                            f"{_n(r['engine_instructions_per_lead'])} posted alone, "
                            f"{_n(r['engine_instructions_per_batch_lead'])} per batch line",
                            "—", "—", "— (explains the rate)", _met(None)])
        elif name == "lua":
            engine = r.get("engine_batch_leads_per_s")
            out.append([f"decide.lua via redis-benchmark ({r['leads_per_call']}/call, "
                        f"-P {r['pipeline']} -c {r['clients']})",
                        f"{_n(engine)} leads/s (engine batch endpoint)" if engine else "—",
                        f"{_n(r['leads_per_s'])} leads/s (Redis + Lua only: no HTTP, JSON, "
                        "validation, routing)",
                        f"{r['ratio']:.2f}" if r.get("ratio") is not None else "—", "—",
                        _met(None)])
            bound = target_bound(results)
            if bound is not None:
                out.append(["ingest targets against decide.lua alone (both targets: batch ≥ "
                            "1.5x the null endpoint)",
                            f"{_n(bound['single_needed_per_s'])} leads/s single and "
                            f"{_n(bound['batch_needed_per_s'])} batch needed",
                            f"{_n(bound['lua_per_s'])} leads/s (decide.lua alone)",
                            f"{bound['headroom']:.2f}", "≥ 1 for the targets to be reachable",
                            _met(bound["headroom"] >= 1)])
            if r.get("lua_instructions_per_lead") is not None:
                out.append(["decide.lua, CPU instructions per lead (callgrind, "
                            f"{r['lua_instruction_calls']} calls of 16)",
                            f"{_n(r['lua_instructions_per_lead'])}", "—", "—",
                            "— (explains the rate)", _met(None)])
        elif name == "delivery":
            out.append(["delivery, one worker",
                        f"{_n(r['worker_per_s'])} deliveries/s ({r['n']:,} jobs)",
                        f"{_n(r['ceiling_per_s'])} req/s (bare aiohttp loop, same sink)",
                        f"{r['ratio']:.2f}", "≥ 0.7", _met(r["ratio"] >= 0.7)])
            if r.get("instructions_ratio") is not None:
                out.append(["delivery, CPU instructions per delivery (callgrind)",
                            f"{_n(r['worker_instructions'])} (worker)",
                            f"{_n(r['ceiling_instructions'])} (bare aiohttp loop)",
                            f"{r['instructions_ratio']:.2f}", "— (explains the rate)",
                            _met(None)])
        elif name == "recharge":
            out.append([f"recharge, crossing → credited ({r['crossings']}x)",
                        f"p50 {r['p50_s'] * 1000:.0f} ms, p99 {r['p99_s'] * 1000:.0f} ms",
                        f"p50 {r['ceiling_p50_s'] * 1000:.1f} ms (one PaymentIntent "
                        "create+confirm, same SDK)",
                        f"{r['ratio']:.3f}", "—", _met(None)])
        elif name == "memory":
            out.append([f"memory, engine RSS after {r['leads']:,} leads (batch endpoint)",
                        f"{r['rss_last_bytes'] / 2**20:.1f} MiB",
                        f"{r['rss_first_bytes'] / 2**20:.1f} MiB after "
                        f"{r['first_leads']:,} leads",
                        f"{r['growth']:.3f}", "≤ 1.10 (flat)", _met(r["flat"])])
    return out


def markdown(results: dict[str, Any], machine: dict[str, Any], started: str) -> str:
    lines = [
        "# leadflow benchmarks: latest run",
        "",
        f"Run {started} with `python -m bench all`. Machine: {common.machine_line(machine)}.",
        "Every figure is read against a ceiling measured in the same run.",
        "",
        "| benchmark | figure | ceiling | ratio | target | met? |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    lines += ["", "Ratios: figure / ceiling (memory: RSS growth; recharge: ceiling / figure).",
              "The decide.lua ceiling excludes HTTP, JSON decoding, validation and routing.", ""]
    return "\n".join(lines)


# -- all ---------------------------------------------------------------------------------

def _stage(i: int, total: int, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    common.log(f"[{i}/{total}] {name} ...")
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception as exc:
        traceback.print_exc()
        common.log(f"[{i}/{total}] {name} FAILED after {time.monotonic() - t0:.1f} s: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    common.log(f"[{i}/{total}] {name} done in {time.monotonic() - t0:.1f} s")
    return result


def _delivery_all() -> dict[str, Any]:
    """The timed rounds (7, median), plus instructions per delivery when valgrind exists."""
    from bench import delivery, instructions

    result = delivery.run(rounds=7)
    return {**result, **(instructions.run() or {})}


def _ingest_all() -> dict[str, Any]:
    """The timed run, plus the engine's instructions per lead when valgrind exists."""
    from bench import ingest, ingest_instructions

    result = ingest.run()
    return {**result, **(ingest_instructions.run() or {})}


def _lua_all(engine_batch_rate: float | None) -> dict[str, Any]:
    """The timed ceiling, plus instructions per lead when valgrind exists."""
    from bench import lua, lua_instructions

    result = lua.run(engine_batch_rate=engine_batch_rate)
    return {**result, **(lua_instructions.run() or {})}


def run_all(*, quick: bool = False, only: Sequence[str] = NAMES) -> dict[str, Any]:
    from bench import ingest, lua, memory, recharge

    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("ingest", _ingest_all),
        ("lua", lambda: _lua_all(results.get("ingest", {}).get("batch_leads_per_s"))),
        ("delivery", _delivery_all),
        ("recharge", recharge.run),
        ("memory", lambda: memory.run(leads=200_000 if quick else 1_000_000)),
    ]
    stages = [s for s in stages if s[0] in only]
    reporters = {"ingest": ingest.report, "lua": lua.report, "recharge": recharge.report,
                 "memory": memory.report}
    for i, (name, fn) in enumerate(stages, 1):
        results[name] = _stage(i, len(stages), name, fn)
        if name in reporters and "error" not in results[name]:
            reporters[name](results[name])
    machine = common.machine()
    doc = {"started": started, "elapsed_s": round(time.monotonic() - t0, 1), "quick": quick,
           "machine": machine, "results": results, "target_bound": target_bound(results),
           "table": [dict(zip(["benchmark", "figure", "ceiling", "ratio", "target", "met"],
                              row, strict=True)) for row in rows(results)]}
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "latest.json").write_bytes(msgspec.json.format(msgspec.json.encode(doc)))
    md = markdown(results, machine, started)
    (common.RESULTS / "latest.md").write_text(md)
    print(md)
    common.log(f"all done in {doc['elapsed_s']:.0f} s; wrote {common.RESULTS}/latest.json "
               "and latest.md")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("all", *NAMES, *EXTRAS):
        print(__doc__)
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    if argv[0] != "all":
        return _one(argv[0], argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench all")
    p.add_argument("--quick", action="store_true", help="memory with 200k leads, not 1M")
    p.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES))
    args = p.parse_args(argv[1:])
    doc = run_all(quick=args.quick, only=args.only)
    return 1 if any("error" in r for r in doc["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

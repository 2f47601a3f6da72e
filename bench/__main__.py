"""``python -m bench all [--quick]`` or ``python -m bench NAME [ARGS]``.

Benchmarks: ingest, openloop, lua, delivery, recharge, memory, redis_memory. Each one is
self-contained (its own redis-server on a free port, temp dirs, every process stopped at
the end, also on error) and reports ratios against a ceiling measured in the same run, or
instruction counts. ``all`` runs them in that order (lua gets the engine's batch rate from
ingest), shows one progress line per stage on stderr, writes ``bench/results/latest.json``
and ``bench/results/latest.md``, and prints LAST one JSON line with issue #16's target
keys (:func:`targets`): ``decide_vs_minimal``, ``redis_bytes_per_lead``,
``engine_instructions_per_lead``, ``buyers_growth``, ``open_loop_p99_ms``, ``peer_ratio``.
``--quick`` posts 200k instead of 1M leads in the memory benchmark. ``protocol`` (what the
HTTP server's limits cost a request, in instructions) and ``ping`` (ping-post: pings/s
against a bare aiohttp fan-out, the engine's overhead per ping, instructions per ping;
#17's targets) run on their own only; ``openloop``
is ``ingest --open-loop`` and ``redis_memory`` is ``memory --redis``.
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

NAMES = ("ingest", "openloop", "lua", "delivery", "recharge", "memory", "redis_memory")
# issue #16's targets: key -> (stage that measures it, "<=" or ">=", bound)
TARGETS: dict[str, tuple[str, str, float]] = {
    "decide_vs_minimal": ("lua", "<=", 2.0),
    "redis_bytes_per_lead": ("redis_memory", "<=", 500.0),
    "engine_instructions_per_lead": ("ingest", "<=", 200_000.0),
    "buyers_growth": ("ingest", "<=", 2.0),
    "open_loop_p99_ms": ("openloop", "<=", 10.0),
    "peer_ratio": ("openloop", ">=", 4.0),
}
EXTRAS = ("protocol", "ping")  # run on their own only: python -m bench protocol


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
    if name == "openloop":
        return _one("ingest", ["--open-loop", *argv])
    if name == "redis_memory":
        return _one("memory", ["--redis", *argv])
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
            out.append(["ingest, POST /v1/leads (64 conns, engine without workers)",
                        f"{_n(r['leads_per_s'])} leads/s, p50 {r['p50_ms']:.1f} ms, "
                        f"p99 {r['p99_ms']:.1f} ms",
                        f"{_n(r['ceiling_per_s'])} req/s (null app, same stack/load), "
                        f"p99 {r['ceiling_p99_ms']:.1f} ms",
                        f"{r['ratio']:.2f}", "— (retired: #16)", _met(None)])
            out.append([f"ingest, POST /v1/leads/batch ({r['batch_size']}/req, "
                        f"{r['batch_concurrency']} conns)",
                        f"{_n(r['batch_leads_per_s'])} leads/s",
                        f"{_n(r['leads_per_s'])} leads/s (single endpoint)",
                        f"{r['batch_ratio']:.2f}", "— (retired: #16)", _met(None)])
            if r.get("engine_instructions_per_lead") is not None:
                v = r["engine_instructions_per_lead"]
                out.append(["engine_instructions_per_lead (callgrind, in-process ASGI, "
                            "no HTTP server)",
                            f"{_n(v)} posted alone, "
                            f"{_n(r['engine_instructions_per_batch_lead'])} per batch line",
                            "—", "—", "≤ 200,000", _met(v <= 200_000)])
            if r.get("buyers_growth") is not None:
                by = r["engine_instructions_per_lead_by_buyers"]
                first, last = next(iter(by)), list(by)[-1]
                out.append([f"buyers_growth: engine instructions per lead, {last} eligible "
                            f"buyers over {first}",
                            f"{_n(by[last])} ({last} buyers)", f"{_n(by[first])} ({first})",
                            f"{r['buyers_growth']:.2f}", "≤ 2.0",
                            _met(r["buyers_growth"] <= 2.0)])
        elif name == "openloop":
            out.append(["`leadflow run` (with its workers), POST /v1/leads closed loop",
                        f"{_n(r['closed_loop_per_s'])} leads/s, p99 "
                        f"{r['closed_loop_p99_ms']:.1f} ms", "—", "—", "—", _met(None)])
            for step in r["ladder"]:
                label = "open_loop_p99_ms: " if abs(step["fraction"] - 0.5) < 1e-9 else ""
                out.append([f"{label}open loop at {step['fraction']:.0%} of that "
                            f"({_n(step['rate_per_s'])}/s, on a schedule)",
                            f"p50 {step['p50_ms']:.1f} ms, p99 {step['p99_ms']:.1f} ms, "
                            f"p99.9 {step['p999_ms']:.1f} ms", "—", "—",
                            "p99 ≤ 10 ms" if label else "—",
                            _met(step["p99_ms"] <= 10.0) if label else _met(None)])
            if r.get("peer_ratio") is not None:
                out.append(["peer_ratio: leadflow single posts over the FastAPI + pydantic + "
                            "redis-py peer (same load, same run)",
                            f"{_n(r['closed_loop_per_s'])} leads/s",
                            f"{_n(r['peer_per_s'])} req/s (peer), p99 {r['peer_p99_ms']:.1f} ms",
                            f"{r['peer_ratio']:.2f}", "≥ 4", _met(r["peer_ratio"] >= 4.0)])
        elif name == "redis_memory":
            kinds = ", ".join(f"{k} {v:,.0f}" for k, v in
                              r["bytes_per_sold_lead_by_kind"].items() if abs(v) >= 1)
            out.append([f"redis_bytes_per_lead (`leadflow run` caught up, {r['sold']:,} sold)",
                        f"{_n(r['redis_bytes_per_lead'])} bytes: {kinds}",
                        f"1M sold leads a day: {r['steady_state_gb_1m_per_day']:.1f} GB "
                        "steady state", "—", "≤ 500",
                        _met(r["redis_bytes_per_lead"] <= 500)])
        elif name == "lua":
            engine = r.get("engine_batch_leads_per_s")
            out.append([f"decide.lua via redis-benchmark ({r['leads_per_call']}/call, "
                        f"-P {r['pipeline']} -c {r['clients']})",
                        f"{_n(engine)} leads/s (engine batch endpoint)" if engine else "—",
                        f"{_n(r['leads_per_s'])} leads/s (Redis + Lua only: no HTTP, JSON, "
                        "validation, routing)",
                        f"{r['ratio']:.2f}" if r.get("ratio") is not None else "—", "—",
                        _met(None)])
            if r.get("minimal_over_decide_rate") is not None:
                out.append([f"decide.lua vs bench/minimal.lua, {r['compared_campaign']} calls "
                            "(redis-benchmark)",
                            f"{_n(r['decide_sold_leads_per_s'])} sold leads/s (decide.lua)",
                            f"{_n(r['minimal_sold_leads_per_s'])} sold leads/s (minimal)",
                            f"{r['minimal_over_decide_rate']:.2f}", "— (timed)", _met(None)])
            if r.get("lua_instructions_per_lead") is not None:
                out.append(["decide.lua, CPU instructions per lead (callgrind, "
                            f"{r['lua_instruction_calls']} calls of 16, mixed campaigns)",
                            f"{_n(r['lua_instructions_per_lead'])}", "—", "—",
                            "— (explains the rate)", _met(None)])
            if r.get("decide_vs_minimal") is not None:
                dw = _writes(r["decide_writes_per_sold_lead"])
                mw = _writes(r["minimal_writes_per_sold_lead"])
                out.append(["decide_vs_minimal: instructions per sold lead (callgrind, "
                            f"{r['decide_vs_minimal_campaign']} calls of 16)",
                            f"{_n(r['decide_instructions_per_sold_lead'])}; {dw}; "
                            f"{_n(r['decide_aof_bytes_per_sold_lead'])} AOF bytes",
                            f"{_n(r['minimal_instructions_per_sold_lead'])} (minimal); {mw}; "
                            f"{_n(r['minimal_aof_bytes_per_sold_lead'])} AOF bytes",
                            f"{r['decide_vs_minimal']:.2f}", "≤ 2.0",
                            _met(r["decide_vs_minimal"] <= 2.0)])
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


def _writes(w: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k.upper()}" for k, v in w.items())


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Issue #16's target keys from one run's results: each key's figure (None when its
    stage failed or did not run, or valgrind is missing), and ``met``: key -> bool."""
    out: dict[str, Any] = {}
    met: dict[str, bool | None] = {}
    for key, (stage, op, bound) in TARGETS.items():
        r = results.get(stage) or {}
        value = r.get(key) if "error" not in r else None
        out[key] = value
        met[key] = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {**out, "met": met,
            "targets": {k: f"{op} {bound:g}" for k, (_, op, bound) in TARGETS.items()}}


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
              "The decide.lua ceiling excludes HTTP, JSON decoding, validation and routing.",
              "Issue #16's targets: " + ", ".join(
                  f"`{k}` = {v}" for k, v in targets(results).items()
                  if k not in ("met", "targets")), ""]
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


def _ingest_growth_all() -> dict[str, Any]:
    """The timed run, the engine's instructions per lead and buyers_growth (valgrind)."""
    from bench import ingest_instructions

    result = _ingest_all()
    return {**result, **(ingest_instructions.growth() or {})}


def _lua_all(engine_batch_rate: float | None) -> dict[str, Any]:
    """The timed ceiling, plus instructions per lead when valgrind exists."""
    from bench import lua, lua_instructions

    result = lua.run(engine_batch_rate=engine_batch_rate)
    return {**result, **(lua_instructions.run() or {})}


def run_all(*, quick: bool = False, only: Sequence[str] = NAMES) -> dict[str, Any]:
    from bench import ingest, lua, memory, openloop, recharge, redis_memory

    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("ingest", _ingest_growth_all),
        ("openloop", openloop.run),
        ("lua", lambda: _lua_all(results.get("ingest", {}).get("batch_leads_per_s"))),
        ("delivery", _delivery_all),
        ("recharge", recharge.run),
        ("memory", lambda: memory.run(leads=200_000 if quick else 1_000_000)),
        ("redis_memory", lambda: redis_memory.run(leads=5_000 if quick else 20_000)),
    ]
    stages = [s for s in stages if s[0] in only]
    reporters = {"ingest": ingest.report, "openloop": openloop.report, "lua": lua.report,
                 "recharge": recharge.report, "memory": memory.report,
                 "redis_memory": redis_memory.report}
    for i, (name, fn) in enumerate(stages, 1):
        results[name] = _stage(i, len(stages), name, fn)
        if name in reporters and "error" not in results[name]:
            reporters[name](results[name])
    machine = common.machine()
    doc = {"started": started, "elapsed_s": round(time.monotonic() - t0, 1), "quick": quick,
           "machine": machine, "targets": targets(results), "results": results,
           "target_bound": target_bound(results),
           "table": [dict(zip(["benchmark", "figure", "ceiling", "ratio", "target", "met"],
                              row, strict=True)) for row in rows(results)]}
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "latest.json").write_bytes(msgspec.json.format(msgspec.json.encode(doc)))
    md = markdown(results, machine, started)
    (common.RESULTS / "latest.md").write_text(md)
    print(md)
    common.log(f"all done in {doc['elapsed_s']:.0f} s; wrote {common.RESULTS}/latest.json "
               "and latest.md")
    # LAST: one JSON line with every target key (and the machine: its load says how busy)
    print(msgspec.json.encode({**doc["targets"], "machine": machine, "started": started,
                               "elapsed_s": doc["elapsed_s"]}).decode(), flush=True)
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

"""CPU instructions per lead of decide.lua inside redis-server, under callgrind.

``python -m bench lua --instructions [--calls 150]``: the redis-server the engine would
start (engine.store.embedded, AOF ``everysec``) runs under ``valgrind --tool=callgrind``; it gets
the example config's funded accounts and decide.lua, then ``--calls`` calls of 16 fresh leads
each (the batch :mod:`bench.lua` builds, with every ``__rand_int__`` replaced by its own
random number, and each lead's payload as its own ARGV, as the engine sends it). The counters
are zeroed just before those calls and dumped just after (``callgrind_control``), so the
count is the calls' alone: script, commands, AOF feeding, networking. It repeats to about
0.05 % where timed Lua rates on this VM move by 20-40 %; this is how a change to the
scripts is checked (docs/benchmarks.md, "Where the time goes (decide.lua)").
"""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench import common
from bench.lua import RAND, randomized, representative_leads
from engine.core import keys
from engine.core.constants import WALLET
from engine.store.embedded import EmbeddedRedis
from engine.store.lua_protocol import Call, decode_reply
from engine.store.scripts import scripts
from engine.store.store import now_ms

LEADS_PER_CALL = 16
SEED = 5


def _calls(cfg: Any, n: int, campaign: str | None = None) -> tuple[str, list[list[str]]]:
    """(tenant, ``n`` ARGV lists): the batch JSON with fresh ids, then the payloads."""
    tenant, leads, table = representative_leads(cfg, LEADS_PER_CALL, campaign=campaign)
    payloads = [lead.payload or "" for lead in leads]
    batch = Call(now=now_ms(), wallet=WALLET, table=table,  # each payload its own ARGV
                 leads=[randomized(msgspec.structs.replace(lead, payload=None))
                        for lead in leads])
    parts = msgspec.json.encode(batch).decode().split(RAND)
    rng = random.Random(SEED)
    out = []
    for _ in range(n):
        text = [parts[0]]
        for part in parts[1:]:
            text += [f"{rng.randrange(10**12):012d}", part]
        out.append(["".join(text), *payloads])
    return tenant, out


def _total(dump_prefix: Path) -> int:
    """The instruction total of the dump callgrind_control -d wrote (not the exit dump)."""
    for path in sorted(dump_prefix.parent.glob(dump_prefix.name + ".*")):
        text = path.read_text(errors="replace")
        if "Trigger: Program termination" in text:
            continue
        return common.callgrind_total(path, text)
    raise RuntimeError("no callgrind dump found")


WRITES = ("xadd", "set", "hset", "hincrby", "expire", "hdel", "del", "xtrim", "xdel",
          "incr", "incrby", "sadd", "zadd", "setex", "pexpire", "lpush", "rpush")


class Count(msgspec.Struct, kw_only=True):
    """One script's counted calls: instructions, the write commands it ran and the AOF
    bytes it appended, per lead and per sold (ACCEPTED) lead."""

    leads: int
    sold: int
    instructions: int
    writes: dict[str, int]  # command -> calls within the counted calls
    aof_bytes: int

    def per_sold(self, x: float) -> float:
        return x / self.sold if self.sold else 0.0


def count(cfg: Any, source: str, tenant: str, work: list[list[str]], warm: int = 20,
          *, label: str = "") -> Count:
    """``source`` run over ``work`` (the first ``warm`` calls uncounted) on its own funded
    redis-server under callgrind, AOF everysec."""
    prefix = keys.tenant_prefix(tenant)
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-cg-") as tmp:
        dump = Path(tmp) / "callgrind.out"
        server = EmbeddedRedis(Path(tmp) / "redis", launcher=[
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}"])
        with server:
            r = redis.Redis(port=server.port)
            try:
                asyncio.run(common._fund(cfg, server.url))
                sha = r.script_load(source)
                _send(r, sha, prefix, work[:warm])  # warm: every account and buyer hash exists
                stats0, aof0 = _stats(r)
                _callgrind(server, "-z")  # counters zeroed ...
                sold = _send(r, sha, prefix, work[warm:])
                _callgrind(server, "-d")  # ... and dumped: these calls alone
                stats1, aof1 = _stats(r)
            finally:
                r.close()
        total = _total(dump)
    writes = {c: stats1.get(c, 0) - stats0.get(c, 0) for c in WRITES}
    out = Count(leads=(len(work) - warm) * LEADS_PER_CALL, sold=sold, instructions=total,
                writes={c: n for c, n in writes.items() if n}, aof_bytes=aof1 - aof0)
    if label:
        common.log(f"lua: {label}: {out.per_sold(total):,.0f} instructions per sold lead "
                   f"({sold:,} of {out.leads:,} sold), {out.per_sold(out.aof_bytes):,.0f} AOF "
                   f"bytes; writes per sold lead "
                   + ", ".join(f"{n / max(1, sold):.2f} {c.upper()}"
                               for c, n in out.writes.items()))
    return out


def _stats(r: redis.Redis) -> tuple[dict[str, int], int]:
    """(command -> calls, from INFO commandstats; the AOF's current size)."""
    stats: Any = r.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    info: Any = r.info("persistence")
    return calls, int(info.get("aof_current_size", 0))


MINIMAL_CAMPAIGN = "solar"


def compare(calls: int = 150, *, quiet: bool = False) -> dict[str, Any] | None:
    """decide.lua and bench/minimal.lua on the same calls of 16 solar leads, every lead
    sold: instructions, writes and AOF bytes per sold lead, and ``decide_vs_minimal``."""
    from bench.lua import MINIMAL

    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        return None
    cfg = common.load_config()
    tenant, work = _calls(cfg, calls + 20, campaign=MINIMAL_CAMPAIGN)
    say = None if quiet else "x"
    d = count(cfg, scripts().decide.source, tenant, work,
              label="decide.lua, solar calls" if say else "")
    m = count(cfg, MINIMAL.read_text(), tenant, work,
              label="bench/minimal.lua, solar calls" if say else "")
    if not d.sold or not m.sold:
        raise RuntimeError(f"no lead sold (decide.lua {d.sold}, minimal {m.sold})")
    dpl, mpl = d.per_sold(d.instructions), m.per_sold(m.instructions)
    return {
        "decide_vs_minimal": round(dpl / mpl, 3),
        "decide_instructions_per_sold_lead": round(dpl),
        "minimal_instructions_per_sold_lead": round(mpl),
        "decide_writes_per_sold_lead": {c: round(d.per_sold(n), 2) for c, n in d.writes.items()},
        "minimal_writes_per_sold_lead": {c: round(m.per_sold(n), 2) for c, n in m.writes.items()},
        "decide_aof_bytes_per_sold_lead": round(d.per_sold(d.aof_bytes)),
        "minimal_aof_bytes_per_sold_lead": round(m.per_sold(m.aof_bytes)),
        "decide_vs_minimal_sold": [d.sold, m.sold],
        "decide_vs_minimal_campaign": MINIMAL_CAMPAIGN,
    }


def run(calls: int = 150, *, quiet: bool = False, minimal: bool = True
        ) -> dict[str, Any] | None:
    """Instructions per lead (the mixed calls), and with ``minimal`` the comparison with
    bench/minimal.lua (:func:`compare`); None (with a note) when valgrind is missing."""
    say = (lambda _m: None) if quiet else common.log
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        say("lua --instructions: valgrind not found (Debian: apt-get install valgrind)")
        return None
    cfg = common.load_config()
    tenant, work = _calls(cfg, calls + 20)
    mixed = count(cfg, scripts().decide.source, tenant, work)
    per_lead = mixed.instructions / mixed.leads
    say(f"lua: {per_lead:,.0f} instructions per lead under callgrind "
        f"({calls} calls of {LEADS_PER_CALL}, {mixed.sold:,} sold)")
    out: dict[str, Any] = {"lua_instructions_per_lead": round(per_lead),
                           "lua_instruction_calls": calls}
    if minimal:
        out.update(compare(calls, quiet=quiet) or {})
    return out


def _callgrind(server: EmbeddedRedis, flag: str) -> None:
    subprocess.run(["callgrind_control", flag, str(server.pid)], capture_output=True,
                   check=True)


def _send(r: redis.Redis, sha: str, prefix: str, calls: list[list[str]]) -> int:
    """The calls, 10 per round trip, results checked; the leads ACCEPTED."""
    sold = 0
    for i in range(0, len(calls), 10):  # 10 calls per round trip, results checked
        pipe = r.pipeline(transaction=False)
        for argv in calls[i:i + 10]:
            pipe.evalsha(sha, 1, prefix, *argv)
        for raw in pipe.execute():
            decisions = decode_reply(raw).decisions
            for d in decisions if isinstance(decisions, list) else []:
                if d.status not in ("ACCEPTED", "REJECTED", "DUPLICATED"):
                    raise RuntimeError(f"unexpected decision {d}")
                sold += d.status == "ACCEPTED"
    return sold

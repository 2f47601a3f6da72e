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


def _calls(cfg: Any, n: int) -> tuple[str, list[list[str]]]:
    """(tenant, ``n`` ARGV lists): the batch JSON with fresh ids, then the payloads."""
    tenant, leads, table = representative_leads(cfg, LEADS_PER_CALL)
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


def run(calls: int = 150, *, quiet: bool = False) -> dict[str, Any] | None:
    """Instructions per lead, or None (with a note) when valgrind is missing."""
    say = (lambda _m: None) if quiet else common.log
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        say("lua --instructions: valgrind not found (Debian: apt-get install valgrind)")
        return None
    cfg = common.load_config()
    tenant, work = _calls(cfg, calls + 20)
    prefix = keys.tenant_prefix(tenant)
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-cg-") as tmp:
        dump = Path(tmp) / "callgrind.out"
        server = EmbeddedRedis(Path(tmp) / "redis", launcher=[
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}"])
        with server:
            r = redis.Redis(port=server.port)
            try:
                asyncio.run(common._fund(cfg, server.url))
                sha = r.script_load(scripts().decide.source)
                _send(r, sha, prefix, work[:20])  # warm: every account and buyer hash exists
                _callgrind(server, "-z")  # counters zeroed ...
                _send(r, sha, prefix, work[20:])
                _callgrind(server, "-d")  # ... and dumped: these calls alone
                sold = r.xlen(keys.deliveries(tenant))
            finally:
                r.close()
        total = _total(dump)
    per_lead = total / (calls * LEADS_PER_CALL)
    say(f"lua: {per_lead:,.0f} instructions per lead under callgrind "
        f"({calls} calls of {LEADS_PER_CALL}, {sold:,} deliveries in all)")
    return {"lua_instructions_per_lead": round(per_lead), "lua_instruction_calls": calls}


def _callgrind(server: EmbeddedRedis, flag: str) -> None:
    subprocess.run(["callgrind_control", flag, str(server.pid)], capture_output=True,
                   check=True)


def _send(r: redis.Redis, sha: str, prefix: str, calls: list[list[str]]) -> None:
    for i in range(0, len(calls), 10):  # 10 calls per round trip, results checked
        pipe = r.pipeline(transaction=False)
        for argv in calls[i:i + 10]:
            pipe.evalsha(sha, 1, prefix, *argv)
        for raw in pipe.execute():
            decisions = decode_reply(raw).decisions
            for d in decisions if isinstance(decisions, list) else []:
                if d.status not in ("ACCEPTED", "REJECTED", "DUPLICATED"):
                    raise RuntimeError(f"unexpected decision {d}")

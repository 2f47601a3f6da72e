"""The script registry (engine/store/scripts.py): it owns every .lua file, nothing else runs Lua,
and a script survives a server that lost its cache (SCRIPT FLUSH, a restart, a failover),
called directly or queued in a MULTI, on one Redis and on a Redis Cluster."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from engine.core import keys
from engine.store.scripts import Scripts, scripts
from engine.store.store import connect
from tests.helpers import ROOT
from tests.helpers.cluster import redis_cluster

LUA = Path(str(resources.files("engine.store").joinpath("lua")))


def _requeue_args(tenant: str) -> tuple[list[str], list[object]]:
    return [keys.retries(tenant), keys.deliveries(tenant)], [10, 10]  # due by 10 ms


def test_the_registry_owns_every_lua_file_once() -> None:
    files = sorted(p.stem for p in LUA.glob("*.lua") if p.name != "_lib.lua")
    reg = scripts()
    assert sorted(reg.by_name) == files
    assert reg is scripts()  # built once per process
    for name, script in reg.by_name.items():
        assert getattr(reg, name) is script
        assert script.source.endswith((LUA / f"{name}.lua").read_text(encoding="utf-8"))
    assert len({s.sha for s in reg.all()}) == len(files)


@pytest.mark.parametrize("path", sorted(LUA.glob("*.lua")), ids=lambda p: p.name)
def test_every_lua_header_names_keys_and_argv(path: Path) -> None:
    if path.name == "_lib.lua":  # a part of the money scripts, never run alone
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    header = "\n".join(lines[:next(  # the comments before the first line of code
        i for i, line in enumerate(lines) if line.strip() and not line.startswith("--"))])
    assert header.startswith(f"-- {path.name}:")
    assert re.search(r"^-- KEYS\[1\]", header, re.M), header
    assert re.search(r"^-- ARGV", header, re.M), header


def test_no_lua_runs_outside_the_registry() -> None:
    """Every script runs through engine/store/scripts.py: no register_script, EVAL, EVALSHA,
    SCRIPT LOAD nor inline Lua anywhere else in engine/ or billing/."""
    pattern = re.compile(r"register_script|\.eval(sha)?(_ro)?\(|script_load|"
                         r"\"EVAL|'EVAL|redis\.call\(")
    found = [f"{p.relative_to(ROOT)}:{n}" for pkg in ("engine", "billing")
             for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "scripts.py"
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if pattern.search(line)]
    assert found == []


async def test_a_call_after_script_flush_sends_the_source_again(redis: aioredis.Redis) -> None:
    reg = Scripts()
    await reg.load(redis)
    assert all(await redis.script_exists(*(s.sha for s in reg.all())))
    await redis.script_flush()
    k, a = _requeue_args("t1")
    assert await reg.delivery_requeue(redis, k, a) == 0  # NOSCRIPT, then EVAL
    assert await redis.script_exists(reg.delivery_requeue.sha) == [True]  # cached again
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["failed_calls"] >= 1  # it was NOSCRIPT first
    assert stats["cmdstat_eval"]["calls"] >= 1
    raw = await reg.reconcile_snapshot(redis, [keys.ledger("t1"), keys.acct("t1", "c1")], [])
    assert raw == [b"0-0", [None, None, None, None]]


async def test_a_queued_script_after_script_flush_runs_with_its_multi(
        redis: aioredis.Redis) -> None:
    """In a MULTI a NOSCRIPT would fail the script alone at EXEC while the other commands
    ran: queue() has the server load it first."""
    reg = scripts()
    await redis.zadd(keys.retries("t1"), {'["lead_id","L1","buyer","b1"]': 1})
    await redis.script_flush()
    k, a = _requeue_args("t1")
    async with redis.pipeline(transaction=True) as pipe:
        await reg.delivery_requeue.queue(pipe, k, a)
        pipe.set("lf:{t1}:marker", "1")
        assert await pipe.execute() == [1, True]
    assert await redis.xlen(keys.deliveries("t1")) == 1
    async with redis.pipeline(transaction=True) as pipe:  # loaded: no SCRIPT LOAD again
        await reg.delivery_requeue.queue(pipe, k, a)
        assert await pipe.execute() == [0]


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield [n.port for n in nodes]


@pytest.mark.slow
async def test_scripts_on_a_cluster_after_script_flush_on_one_node(
        cluster_ports: list[int]) -> None:
    """SCRIPT FLUSH (or a failover) can empty any one node's cache: a call then sends the
    source to the node of its keys' slot, and a script queued in a cluster MULTI is loaded
    before the MULTI runs."""
    client = connect(f"redis+cluster://127.0.0.1:{cluster_ports[0]}")
    reg = scripts()
    try:
        await reg.load(client)
        for tenant in ("t1", "beta", "gamma"):  # tenants of different slots (and nodes)
            owner = _node_of(cluster_ports, keys.tenant_prefix(tenant))
            direct = redis.Redis(port=owner)
            direct.script_flush()
            assert direct.script_exists(reg.delivery_requeue.sha) == [False]
            k, a = _requeue_args(tenant)
            assert await reg.delivery_requeue(client, k, a) == 0
            assert direct.script_exists(reg.delivery_requeue.sha) == [True]

            direct.script_flush()
            await client.zadd(keys.retries(tenant), {'["lead_id","L1"]': 1})
            async with client.pipeline(transaction=True) as pipe:
                await reg.delivery_requeue.queue(pipe, k, a)
                pipe.set(keys.tenant_prefix(tenant) + "marker", "1")
                assert await pipe.execute() == [1, True]
            assert await client.xlen(keys.deliveries(tenant)) == 1
            direct.close()
    finally:
        await client.aclose()


def _node_of(ports: list[int], key: str) -> int:
    """The port of the node serving ``key``'s slot (the others answer MOVED)."""
    for port in ports:
        with redis.Redis(port=port) as direct:
            try:
                direct.exists(key)
            except redis.ResponseError:
                continue
            return port
    raise AssertionError(f"no node serves {key}")

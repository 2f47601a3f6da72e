"""The script registry: every Lua script of leadflow, each loaded once, run by SHA.

Every ``.lua`` file of ``engine/lua`` (``_lib.lua`` apart, a part of the money scripts) is
one :class:`Script` of :class:`Scripts`, built and hashed once per process (:func:`scripts`)
and run through it only: ``await script(client, keys, args)`` (EVALSHA, then EVAL on
NOSCRIPT) or ``await script.queue(pipe, keys, args)`` inside a pipeline or MULTI. Nothing
else in leadflow sends Lua to Redis. Each file's header names its KEYS and ARGV.

A script's source is built from parts (:data:`_PARTS`): ``keys.lua_preamble()`` (the key
helpers ``K.*``, so the key layout is written once) and ``_lib.lua`` (the balance-change
machinery: ledger entry, threshold events, pause/resume, all or nothing) for the scripts
that move money or emit events, then the file itself.

This module imports only :mod:`engine.core.keys` (and redis-py): billing and every worker may
use it without pulling in routing, ingest, the API or delivery.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import NoScriptError

from engine.core import keys

_LIB = "_lib.lua"
_KEYS, _MONEY = "keys", "lib"  # parts of a source before the file: key helpers, _lib.lua

# every script, by file name (engine/store/lua/<name>.lua), with the parts its source is built of
_PARTS: dict[str, tuple[str, ...]] = {
    # money and events (all or nothing, _lib.lua)
    "decide": (_KEYS, _MONEY),
    "adjust": (_KEYS, _MONEY),
    "refund": (_KEYS, _MONEY),
    "account_settings": (_KEYS, _MONEY),
    "arm_recharge": (_KEYS, _MONEY),
    "alert_set": (_KEYS, _MONEY),
    "buyer_pause": (_KEYS, _MONEY),
    # ping-post holds (docs/pingpost.md)
    "ping_hold": (_KEYS, _MONEY),
    "ping_release": (_KEYS, _MONEY),
    "ping_sweep": (_KEYS, _MONEY),
    # bookkeeping: no money moves
    "balance_close": (_KEYS,),
    "breaker_open": (_KEYS,),
    "delivery_finish": (_KEYS,),
    "delivery_precheck": (_KEYS,),
    "delivery_requeue": (_KEYS,),
    "sync_claim": (_KEYS,),
    "sync_final": (_KEYS,),
    # its keys all given as KEYS
    "reconcile_snapshot": (),
}


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


def _source(name: str, parts: tuple[str, ...]) -> str:
    head = (keys.lua_preamble() if _KEYS in parts else "") + (
        _read(_LIB) + "\n" if _MONEY in parts else "")
    return head + _read(name + ".lua")


class Script:
    """One Lua script. ``await script(redis, keys, args)`` runs EVALSHA, then EVAL on NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys_: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys_), *keys_, *args)
        except NoScriptError:
            # The server lost its script cache (restart, SCRIPT FLUSH, failover): EVAL sends
            # the source once and caches it again under the same SHA. On a cluster EVAL goes
            # to the node of the keys' slot, the one that answered NOSCRIPT.
            return await client.eval(self.source, len(keys_), *keys_, *args)

    async def queue(self, pipe: Pipeline | ClusterPipeline, keys_: list[str],
                    args: list[Any]) -> None:
        """Queue the script (EVALSHA) in ``pipe``; its result is the command's place in
        ``pipe.execute()``'s. A MULTI checks EVALSHA only at EXEC, where a NOSCRIPT would
        fail the script alone while the other commands ran; so the server is asked first
        whether it holds the script (SCRIPT EXISTS, on a cluster every primary's answer)
        and sent it when not, as redis-py does for its own pipelined scripts. Call it where
        the pipeline is about to run (the single-Redis pipeline takes its connection here)."""
        if isinstance(pipe, ClusterPipeline):
            cluster = pipe.cluster_client
            if not all(await cluster.script_exists(self.sha)):
                await cluster.script_load(self.source)  # every primary
        else:  # on the pipeline's connection, before its MULTI (redis-py leaves it untyped)
            run = pipe.immediate_execute_command
            if not (await run("SCRIPT EXISTS", self.sha))[0]:  # type: ignore[no-untyped-call]
                await run("SCRIPT LOAD", self.source)  # type: ignore[no-untyped-call]
        pipe.evalsha(self.sha, len(keys_), *keys_, *args)

    async def load(self, client: aioredis.Redis) -> None:
        await client.script_load(self.source)


class Scripts:
    """Every script of the engine, built once per process (:func:`scripts`): one attribute
    per file of ``engine/lua``, named as the file."""

    def __init__(self) -> None:
        self.by_name = {name: Script(name, _source(name, parts))
                        for name, parts in _PARTS.items()}
        get = self.by_name.__getitem__
        self.decide = get("decide")
        self.adjust = get("adjust")
        self.refund = get("refund")
        self.account_settings = get("account_settings")
        self.arm_recharge = get("arm_recharge")
        self.alert_set = get("alert_set")
        self.buyer_pause = get("buyer_pause")
        self.ping_hold = get("ping_hold")
        self.ping_release = get("ping_release")
        self.ping_sweep = get("ping_sweep")
        self.balance_close = get("balance_close")
        self.breaker_open = get("breaker_open")
        self.delivery_finish = get("delivery_finish")
        self.delivery_precheck = get("delivery_precheck")
        self.delivery_requeue = get("delivery_requeue")
        self.sync_claim = get("sync_claim")
        self.sync_final = get("sync_final")
        self.reconcile_snapshot = get("reconcile_snapshot")

    def all(self) -> list[Script]:
        return list(self.by_name.values())

    async def load(self, client: aioredis.Redis) -> None:
        """SCRIPT LOAD of every script (on a cluster, on every primary): the first calls
        then find them; a server that loses them later is sent them again (NOSCRIPT)."""
        for script in self.all():
            await script.load(client)


_scripts: Scripts | None = None


def scripts() -> Scripts:
    global _scripts  # noqa: PLW0603 - a process-wide cache of immutable objects
    if _scripts is None:
        _scripts = Scripts()
    return _scripts

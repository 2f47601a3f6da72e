"""Lua scripts: loaded once from package data, called by SHA, NOSCRIPT handled.

Each script is ``keys.lua_preamble()`` + ``_lib.lua`` + the script file, so the key layout
and the balance-change machinery (ledger entry, threshold events, pause/resume) are written
once and shared by every script that moves money.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from engine import keys

_LIB = "_lib.lua"


def _read(name: str) -> str:
    return resources.files("engine").joinpath("lua", name).read_text(encoding="utf-8")


class Script:
    """One Lua script. ``await script(redis, keys, args)`` runs EVALSHA, then EVAL on NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str | None = None) -> None:
        self.name = name
        if source is None:  # a money script: the key helpers, _lib.lua, the script
            source = keys.lua_preamble() + _read(_LIB) + "\n" + _read(name + ".lua")
        self.source = source
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys_: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys_), *keys_, *args)
        except NoScriptError:
            # The server lost its script cache (restart, SCRIPT FLUSH, failover): EVAL sends
            # the source once and caches it again under the same SHA.
            return await client.eval(self.source, len(keys_), *keys_, *args)

    async def load(self, client: aioredis.Redis) -> None:
        await client.script_load(self.source)


class Scripts:
    """Every script of the engine, built once per process."""

    def __init__(self) -> None:
        self.decide = Script("decide")
        self.adjust = Script("adjust")
        self.sync_account = Script("sync_account")
        self.refund = Script("refund")

    def all(self) -> list[Script]:
        return [self.decide, self.adjust, self.sync_account, self.refund]

    async def load(self, client: aioredis.Redis) -> None:
        for script in self.all():
            await script.load(client)


def housekeeping(name: str) -> str:
    """The source of a script that moves no money (delivery and sync-mode bookkeeping):
    the key helpers and the .lua file, for redis-py's ``register_script``, which also
    handles NOSCRIPT inside pipelines."""
    return keys.lua_preamble() + _read(name + ".lua")


def housekeeping_script(name: str) -> Script:
    """A housekeeping script as a :class:`Script`: built and hashed once, for a caller that
    runs it outside a pipeline (``register_script`` hashed the source on every call)."""
    return Script(name, housekeeping(name))


_scripts: Scripts | None = None


def scripts() -> Scripts:
    global _scripts  # noqa: PLW0603 - a process-wide cache of immutable objects
    if _scripts is None:
        _scripts = Scripts()
    return _scripts

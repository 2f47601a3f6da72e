"""Consumer groups as tests poll them."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


async def group(redis: aioredis.Redis, stream: str, name: str) -> dict[str, Any]:
    """Consumer group ``name`` of ``stream`` (str keys and values), or {} while the stream
    or the group does not exist yet (a worker makes them when it starts: a test that polls
    for them may ask first)."""
    if not await redis.exists(stream):
        return {}
    for g in await redis.xinfo_groups(stream):
        if g["name"] in (name, name.encode()):
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.items()}
    return {}

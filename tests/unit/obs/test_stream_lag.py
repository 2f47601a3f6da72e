"""leadflow_stream_lag_entries where Redis cannot tell a group's lag (engine.obs.telemetry)."""

from __future__ import annotations

import redis.asyncio as aioredis

from engine.obs.telemetry import _lag


async def test_a_lag_redis_cannot_tell_is_counted_after_the_groups_position(
        redis: aioredis.Redis) -> None:
    """Redis 7 answers a nil lag once entries past a group's position were deleted (a
    taken-back decide.lua try, acked deliveries): the entries after its last-delivered id
    are counted instead of reading 0; a known lag, or none at all (Redis 6.2), is kept."""
    ids = [await redis.xadd("s", {"n": str(i)}) for i in range(5)]
    await redis.xdel("s", ids[3])
    assert await _lag(redis, "s", {"lag": None, "last-delivered-id": ids[0]}) == 3
    assert await _lag(redis, "s", {"lag": None, "last-delivered-id": b"0-0"}) == 4
    assert await _lag(redis, "s", {"lag": 7, "last-delivered-id": ids[0]}) == 7
    assert await _lag(redis, "s", {"last-delivered-id": ids[0]}) == 0

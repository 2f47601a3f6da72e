"""``leadflow demo`` with its local buyer sink: sold leads are really delivered."""

from __future__ import annotations

import pytest

from engine import config as config_mod
from engine.demo import run_demo
from tests.conftest import EXAMPLE_CONFIG


async def test_demo_delivers_to_the_local_sink_and_reconciles(
    redis, redis_server, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_mod.load(EXAMPLE_CONFIG)
    assert await run_demo(cfg, leads=120, seed=3, redis_url=redis_server.url) == 0
    out = capsys.readouterr().out
    assert "buyer webhooks: local sink at http://127.0.0.1:" in out
    assert "deliveries (local buyer sink):" in out and "accepted" in out
    assert "reconcile: " in out and " 0 problems" in out
    assert "still pending" not in out

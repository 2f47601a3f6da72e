"""``leadflow demo`` with its local buyer sink: sold leads are really delivered."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.core.errors import LeadflowError
from engine.run import configfile
from engine.run.demo import run_demo
from tests.conftest import EXAMPLE_CONFIG, ROOT


async def test_demo_delivers_to_the_local_sink_and_reconciles(
    redis, redis_server, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = configfile.load(EXAMPLE_CONFIG)
    assert await run_demo(cfg, leads=120, seed=3, redis_url=redis_server.url) == 0
    out = capsys.readouterr().out
    assert "buyer webhooks: local sink at http://127.0.0.1:" in out
    # a demo buyer's portal login (the demo's known password)
    assert "/portal/login?t=" in out and "e-mail buyer@demo.example" in out
    assert "e-mail operator@demo.example" in out
    assert "password 'leadflow demo buyer'" in out
    assert "deliveries (local buyer sink):" in out and "accepted" in out
    assert "reconcile: " in out and " 0 problems" in out
    assert "still pending" not in out
    # the notify worker mailed into the demo's in-memory sink
    assert "e-mail the notify worker sent (in memory;" in out
    assert "still being mailed" not in out


@pytest.mark.parametrize("leads", [0, -5])
async def test_demo_needs_at_least_one_lead(leads: int, capsys) -> None:
    """--leads 0 ran the demo, printed "0 problems" and exited 1 (every one of its 0 leads
    was an ERROR); --leads -5 ran it and exited 0. Both are refused before anything
    starts, with a message naming the option."""
    cfg = configfile.load(EXAMPLE_CONFIG)
    with pytest.raises(LeadflowError, match=r"--leads must be at least 1"):
        await run_demo(cfg, leads=leads, seed=1, redis_url=None)
    assert "leadflow demo:" not in capsys.readouterr().out  # no engine, no Redis started


def test_demo_command_refuses_zero_leads() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.run.cli", "demo", "--leads", "0", "--config",
         str(EXAMPLE_CONFIG)], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == "error: --leads must be at least 1 (got 0)"
    assert proc.stdout == ""

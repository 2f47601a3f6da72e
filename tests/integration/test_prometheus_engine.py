"""A real Prometheus server scrapes the real engine's ``/metrics`` (tests.helpers.harness.running).

The engine serves on this test's event loop, so every blocking Prometheus call (start,
polling, queries) runs in a worker thread: the loop must stay free to answer the scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT
from tests.helpers.harness import buyer, campaign, make_config, running
from tests.helpers.prom import poll, prometheus_binary, run_prometheus

ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
CAMPAIGN = "promcamp"  # label values used by no other test: the process registry is shared

needs_prometheus = pytest.mark.skipif(
    prometheus_binary() is None,
    reason="prometheus server binary not installed (apt-get install prometheus; CI does)",
)
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (apt-get install prometheus; CI does)",
)


def _cfg() -> Any:
    return make_config(
        campaign(CAMPAIGN),
        buyer("pb1", campaign=CAMPAIGN, price="10.00",
              extra='filters = [{ field = "state", op = "states", values = ["CA"] }]'),
    )


async def _post_leads(eng: Any) -> None:
    """3 accepted, 1 rejected (no buyer matches NY), 1 error (bad e-mail)."""
    for n in range(3):
        status, body = await eng.lead(CAMPAIGN, email=f"p{n}@example.com", state="CA")
        assert (status, body["status"]) == (200, "ACCEPTED"), body
    status, body = await eng.lead(CAMPAIGN, email="ny@example.com", state="NY")
    assert (status, body["status"]) == (200, "REJECTED"), body
    status, body = await eng.lead(CAMPAIGN, email="not-an-email", state="CA")
    assert (status, body["status"]) == (422, "ERROR"), body


@pytest.mark.prometheus
@needs_prometheus
async def test_prometheus_scrapes_the_engine(redis, redis_server, tmp_path: Path) -> None:
    async with running(_cfg(), redis_server.url) as eng:
        eng.svc.export_balances()  # what `leadflow run` registers
        await _post_leads(eng)
        target = f"127.0.0.1:{eng.svc.port}"
        with contextlib.ExitStack() as stack:
            prom = await asyncio.to_thread(
                stack.enter_context, run_prometheus([target], tmp_path, rule_files=[ALERTS])
            )
            try:
                await _check(prom, target)
            finally:
                await asyncio.to_thread(stack.close)


async def _check(prom: Any, target: str) -> None:
    def wait(expr: str) -> float:
        return float(prom.wait_value(expr))

    targets = await asyncio.to_thread(prom.wait_targets_up, [target])
    assert targets[0]["scrapeUrl"] == f"http://{target}/metrics"
    sel = f'instance="{target}",campaign="{CAMPAIGN}"'
    got = {
        status: await asyncio.to_thread(
            wait, f'leadflow_leads_received_total{{{sel},status="{status}"}}')
        for status in ("accepted", "rejected", "error")
    }
    assert got == {"accepted": 3, "rejected": 1, "error": 1}
    assert await asyncio.to_thread(
        wait, f'sum(leadflow_leads_received_total{{{sel}}})') == 5
    assert await asyncio.to_thread(
        wait, f'leadflow_leads_sold_total{{{sel},buyer="pb1"}}') == 3
    assert await asyncio.to_thread(wait, f'leadflow_redis_up{{instance="{target}"}}') == 1
    # the balance export reads Redis at scrape time: c1 paid 3 x $10.00
    assert await asyncio.to_thread(
        wait, f'leadflow_account_balance_micros{{instance="{target}",account="c1"}}'
    ) == 70_000_000
    headroom = (f'leadflow_account_balance_micros{{instance="{target}",account="c1"}} '
                "- on(tenant, account) leadflow_account_floor_micros")
    assert await asyncio.to_thread(wait, headroom) == 90_000_000
    assert await asyncio.to_thread(
        wait, f'leadflow_account_balance_source_up{{instance="{target}"}}') == 1

    # the alert rules load and evaluate without errors against the engine's real series
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prom.api("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if not rules or any(r.get("lastEvaluation", "").startswith("0001") for r in rules):
            return None
        return rules

    rules = await asyncio.to_thread(
        poll, rules_evaluated, timeout=30, what="every rule evaluated once")
    assert len(rules) >= 10
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


@needs_promtool
async def test_engine_metrics_pass_promtool_check(redis, redis_server) -> None:
    async with running(_cfg(), redis_server.url) as eng:
        eng.svc.export_balances()
        await _post_leads(eng)
        for accept in ({}, {"Accept": "application/openmetrics-text; version=1.0.0"}):
            async with eng.http.get(eng.url + "/metrics", headers=accept) as r:
                assert r.status == 200
                body = await r.read()
            assert b"leadflow_leads_received_total{campaign=\"promcamp\"" in body
            if accept:  # promtool reads the text format; OpenMetrics must still end in # EOF
                assert body.endswith(b"# EOF\n")
                continue
            result = await asyncio.to_thread(
                subprocess.run, ["promtool", "check", "metrics"], input=body,
                capture_output=True, timeout=30, check=False)
            out = result.stdout.decode() + result.stderr.decode()
            assert result.returncode == 0, out
            assert out.strip() == "", out

"""A real Prometheus server scrapes leadflow's exposition and answers queries about it."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from engine.metrics import BalanceCollector, Metrics, start_worker_metrics_server
from tests.prom import poll, prometheus_binary, run_prometheus, serve_registry

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        prometheus_binary() is None,
        reason="prometheus server binary not installed (apt-get install prometheus; CI does)",
    ),
]

ALERTS = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "alerts.yml"


def test_prometheus_scrapes_render_and_worker_server(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, version="9.9.9", revision="abc123")
    m.leads_received("c1", "s1", "sold").inc(3)
    m.leads_received("c1", "s1", "rejected").inc()
    m.money_debited("lead_purchase").inc(12_500_000)
    m.redis_up.set(1)
    m.decision_duration.observe(0.0004)
    registry.register(
        BalanceCollector(lambda: [("t1", "wallet", 7_000_000, -20_000_000)], max_accounts=10)
    )

    worker_registry = CollectorRegistry()
    w = Metrics(worker_registry)
    w.deliveries("accepted").inc(5)
    server, thread = start_worker_metrics_server(0, worker_registry, addr="127.0.0.1")
    worker_target = f"127.0.0.1:{server.server_port}"
    try:
        with (
            serve_registry(registry) as api_target,
            run_prometheus([api_target, worker_target], tmp_path, rule_files=[ALERTS]) as prom,
        ):
            targets = prom.wait_targets_up([api_target, worker_target])
            assert {t["labels"]["job"] for t in targets} == {"leadflow"}

            sold = f'leadflow_leads_received_total{{instance="{api_target}",status="sold"}}'
            assert prom.wait_value(sold) == 3
            assert (
                prom.wait_value(f'sum(leadflow_leads_received_total{{instance="{api_target}"}})')
                == 4
            )
            assert (
                prom.wait_value(
                    "leadflow_money_debited_micros_total"
                    f'{{instance="{api_target}",kind="lead_purchase"}}'
                )
                == 12_500_000
            )
            assert prom.wait_value('leadflow_account_balance_micros{tenant="t1"}') == 7_000_000
            headroom = (
                "leadflow_account_balance_micros - on(tenant, account) "
                "leadflow_account_floor_micros"
            )
            assert prom.wait_value(headroom) == 27_000_000
            assert (
                prom.wait_value(
                    f'leadflow_deliveries_total{{instance="{worker_target}",outcome="accepted"}}'
                )
                == 5
            )
            assert (
                prom.wait_value(f'leadflow_build_info{{instance="{api_target}",version="9.9.9"}}')
                == 1
            )
            assert (
                prom.wait_value(
                    f'leadflow_decision_duration_seconds_count{{instance="{api_target}"}}'
                )
                == 1
            )

            # Our alert rules load into a real server and evaluate without errors (e.g. no
            # many-to-many matching) against real leadflow series.
            def rules_evaluated() -> list[dict[str, object]] | None:
                groups = prom.api("/api/v1/rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if not rules or any(r.get("lastEvaluation", "").startswith("0001") for r in rules):
                    return None
                return rules

            rules = poll(rules_evaluated, timeout=30, what="every rule evaluated once")
            assert len(rules) >= 10
            assert [r["name"] for r in rules if r["health"] != "ok"] == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

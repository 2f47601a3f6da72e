"""A real Prometheus server scrapes a worker process's exposition.

The API engine itself is scraped in tests/integration/test_prometheus_engine.py; this covers the other
serving path, :func:`engine.obs.metrics.start_worker_metrics_server` (``leadflow worker
--metrics-port``), which runs in a thread of its own, not on the engine's ASGI app.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from engine.obs.metrics import Metrics, start_worker_metrics_server
from tests.helpers.prom import prometheus_binary, run_prometheus

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        prometheus_binary() is None,
        reason="prometheus server binary not installed (apt-get install prometheus; CI does)",
    ),
]


def test_prometheus_scrapes_worker_metrics_server(tmp_path: Path) -> None:
    worker_registry = CollectorRegistry()
    w = Metrics(worker_registry, version="9.9.9", revision="abc123")
    w.deliveries("accepted").inc(5)
    w.delivery_duration.observe(0.2)
    server, thread = start_worker_metrics_server(0, worker_registry, addr="127.0.0.1")
    target = f"127.0.0.1:{server.server_port}"
    try:
        with run_prometheus([target], tmp_path) as prom:
            targets = prom.wait_targets_up([target])
            assert {t["labels"]["job"] for t in targets} == {"leadflow"}
            inst = f'instance="{target}"'
            assert prom.wait_value(f'leadflow_deliveries_total{{{inst},outcome="accepted"}}') == 5
            assert prom.wait_value(f'leadflow_deliveries_total{{{inst},outcome="timeout"}}') == 0
            assert prom.wait_value(f"leadflow_delivery_duration_seconds_count{{{inst}}}") == 1
            assert prom.wait_value(f'leadflow_build_info{{{inst},version="9.9.9"}}') == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

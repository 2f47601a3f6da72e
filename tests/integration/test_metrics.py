"""engine.obs.metrics: conventions, exposition validity (promtool), balance export, multiprocess."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis as blocking_redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from engine.core import keys
from engine.core.constants import DEFAULT_FLOOR
from engine.delivery.record import DeliveryEvent
from engine.obs import telemetry
from engine.obs.metrics import (
    CREDIT_KINDS,
    OTHER,
    BalanceCollector,
    Children,
    Metrics,
    count,
    metrics_asgi_app,
    observe,
    observe_all,
    redis_balance_source,
    registry_for_process,
    render,
    start_worker_metrics_server,
)
from engine.store.embedded import EmbeddedRedis
from tests.helpers import ROOT

PROM_DIR = ROOT / "config" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; CI does)"
)

# Labels that would make series per lead/person/account: never on Metrics' metrics.
FORBIDDEN_LABELS = {"lead", "lead_id", "email", "phone", "ip", "account", "account_id", "path"}


def touch_all(m: Metrics) -> None:
    """Record one value on every metric of ``m`` (label values are placeholders)."""
    for attr, value in vars(m).items():
        metric: Any = value.metric if isinstance(value, Children) else value
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        target: Any = value
        if isinstance(value, Children):
            target = value(*(f"{attr}_{n}" for n in metric._labelnames))
        elif metric._labelnames:
            target = metric.labels(*(f"x{i}" for i in range(len(metric._labelnames))))
        if isinstance(metric, Counter):
            target.inc()
        elif isinstance(metric, Gauge):
            target.set(1)
        else:
            target.observe(0.0004)


def families(registry: CollectorRegistry) -> dict[str, Any]:
    body, _ = render(registry)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def full_registry() -> tuple[CollectorRegistry, Metrics]:
    registry = CollectorRegistry(auto_describe=True)
    m = Metrics(registry, version="1.2.3", revision="deadbeef")
    touch_all(m)
    m.http_request("/v1/leads/{campaign}", 200, 0.002)
    m.delivery({"timeout": 1}, [5.0])
    registry.register(
        BalanceCollector(
            lambda: [("t1", "wallet", 12_000_000, -20_000_000), ("t1", "c1", 0, 0)],
            max_accounts=10,
        )
    )
    return registry, m


REQUIRED = {
    "leadflow_leads_received": ("counter", {"campaign", "supplier", "status"}),
    "leadflow_leads_sold": ("counter", {"campaign", "buyer"}),
    "leadflow_money_debited_micros": ("counter", {"kind"}),
    "leadflow_money_credited_micros": ("counter", {"kind"}),
    "leadflow_decision_duration_seconds": ("histogram", set()),
    "leadflow_redis_script_duration_seconds": ("histogram", {"script"}),
    "leadflow_events_emitted": ("counter", {"type"}),
    "leadflow_buyers_paused": ("counter", {"reason"}),
    "leadflow_recharge_attempts": ("counter", {"outcome"}),
    "leadflow_recharge_latency_seconds": ("histogram", set()),
    "leadflow_deliveries": ("counter", {"outcome"}),
    "leadflow_delivery_duration_seconds": ("histogram", set()),
    "leadflow_notify_sent": ("counter", {"channel", "kind"}),
    "leadflow_notify_failed": ("counter", {"channel", "kind"}),
    "leadflow_notify_dead_lettered": ("counter", {"channel", "kind"}),
    "leadflow_stream_lag_entries": ("gauge", {"stream", "group"}),
    "leadflow_stream_pending_entries": ("gauge", {"stream", "group"}),
    "leadflow_http_requests": ("counter", {"route", "code"}),
    "leadflow_http_request_duration_seconds": ("histogram", {"route"}),
    "leadflow_redis_up": ("gauge", set()),
    "leadflow_build_info": ("gauge", {"version", "revision", "python"}),
    "leadflow_account_balance_micros": ("gauge", {"tenant", "account"}),
    "leadflow_account_floor_micros": ("gauge", {"tenant", "account"}),
    "leadflow_pings": ("counter", {"campaign", "status"}),
    "leadflow_ping_posts": ("counter", {"campaign", "status"}),
    "leadflow_ping_bids": ("counter", {"campaign", "outcome"}),
    "leadflow_ping_bid_requests": ("counter", {"buyer", "outcome"}),
    "leadflow_ping_bid_duration_seconds": ("histogram", {"buyer"}),
    "leadflow_holds": ("counter", {"event"}),
}


def test_required_metrics_exist_with_type_and_labels() -> None:
    registry, _ = full_registry()
    fams = families(registry)
    for name, (kind, labels) in REQUIRED.items():
        assert name in fams, name
        assert fams[name].type == kind, name
        sample_labels = {k for s in fams[name].samples for k in s.labels} - {"le"}
        assert sample_labels == labels, name


def test_naming_conventions_and_bounded_labels() -> None:
    registry, m = full_registry()
    body, _ = render(registry)
    for fam in text_string_to_metric_families(body.decode()):
        assert fam.name.startswith("leadflow_"), fam.name
        assert not fam.name.endswith("_ms"), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
        if "money" in fam.name or "balance" in fam.name or "floor" in fam.name:
            assert "_micros" in fam.name or fam.name.startswith("leadflow_account_balance_source")
    for value in vars(m).values():
        metric = value.metric if isinstance(value, Children) else value
        if isinstance(metric, Counter | Gauge | Histogram):
            assert not FORBIDDEN_LABELS & set(metric._labelnames), metric._name


def test_known_label_values_exist_at_zero() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    fams = families(registry)
    outcomes = {s.labels["outcome"]: s.value for s in fams["leadflow_recharge_attempts"].samples}
    assert outcomes["failed"] == 0  # so increase(...[15m]) > 0 fires on the first failure
    assert "dead_letter" in {s.labels["outcome"] for s in fams["leadflow_deliveries"].samples}


@needs_promtool
def test_exposition_passes_promtool_check_metrics(tmp_path: Path) -> None:
    registry, _ = full_registry()
    body, _ = render(registry)
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"", result.stdout.decode()


@needs_promtool
def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(PROM_DIR / "alerts.yml")],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@needs_promtool
def test_promtool_alert_unit_tests_and_config() -> None:
    for args in (
        ["test", "rules", str(PROM_DIR / "alerts_test.yml")],
        ["check", "config", str(PROM_DIR / "prometheus.yml")],
    ):
        result = subprocess.run(
            [PROMTOOL, *args], capture_output=True, timeout=60, check=False, cwd=PROM_DIR
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_children_cache_returns_same_child_and_caps_cardinality() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, label_limit=3)
    first = m.leads_sold("c1", "b1")
    assert m.leads_sold("c1", "b1") is first
    m.leads_sold("c1", "b2").inc()
    m.leads_sold("c1", "b3").inc()
    m.leads_sold("c1", "b4").inc()  # 4th label set: folded
    m.leads_sold("c1", "b5").inc(2)
    assert len(m.leads_sold) == 3
    fams = families(registry)
    sold = {
        (s.labels["campaign"], s.labels["buyer"]): s.value
        for s in fams["leadflow_leads_sold"].samples
    }
    assert sold[(OTHER, OTHER)] == 3
    overflow = fams["leadflow_metric_label_overflow"].samples
    assert [(s.labels["metric"], s.value) for s in overflow] == [("leads_sold", 2)]
    for kind in (*CREDIT_KINDS, "new1"):
        m.money_credited(kind).inc()  # known kinds do not count against the limit
    assert len(m.money_credited) == len(CREDIT_KINDS) + 1


@pytest.mark.parametrize("amounts", [
    [], [0.004] * 7, [0.0, 0.01, 0.0100001, 0.5, 0.5, 30.0, 31.0, 0.002], [31.0, 45.5]])
def test_observe_all_exposes_what_repeated_observe_does(amounts: list[float]) -> None:
    bulk, one = CollectorRegistry(), CollectorRegistry()
    hb = Histogram("h", "h", buckets=(0.01, 0.5, 30.0), registry=bulk)
    ho = Histogram("h", "h", buckets=(0.01, 0.5, 30.0), registry=one)
    observe_all(hb, amounts)
    observe_all(hb, [])
    for a in amounts:
        ho.observe(a)
    each = CollectorRegistry()
    he = Histogram("h", "h", buckets=(0.01, 0.5, 30.0), registry=each)
    for a in amounts:
        observe(he, a)
    want = families(one)["h"].samples
    for reg in (bulk, each):
        got = families(reg)["h"].samples
        assert [(s.name, s.labels) for s in got] == [(s.name, s.labels) for s in want]
        assert [s.value for s in got] == pytest.approx([s.value for s in want])  # sum: fsum


def test_observe_and_count_on_a_labelled_parent_raise_as_prometheus_does() -> None:
    h = Histogram("h", "h", ["route"], registry=CollectorRegistry())
    c = Counter("c", "c", ["route"], registry=CollectorRegistry())
    with pytest.raises(ValueError):
        observe(h, 0.1)
    with pytest.raises(ValueError):
        count(c)


def test_count_is_counter_inc() -> None:
    reg = CollectorRegistry()
    c = Counter("c", "c", ["route"], registry=reg)
    count(c.labels("a"))
    count(c.labels("a"), 2.5)
    with pytest.raises(ValueError):
        count(c.labels("a"), -1)
    assert [(s.labels, s.value) for s in families(reg)["c"].samples
            if s.name == "c_total"] == [({"route": "a"}, 3.5)]


def test_delivery_observer_groups_a_batch_by_outcome_and_latency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = Metrics(CollectorRegistry())
    monkeypatch.setattr(telemetry, "METRICS", m)
    ev = [DeliveryEvent("t", "b", f"L{i}", kind, ms, 200, 1) for i, (kind, ms) in enumerate(
        [("accepted", 3), ("accepted", 3), ("rejected", 40), ("deferred", 0),
         ("dead_letter", 0), ("timeout", 5000)])]
    telemetry.delivery_observer(ev)
    fams = families(m.registry)
    counts = {s.labels["outcome"]: s.value for s in fams["leadflow_deliveries"].samples
              if s.name.endswith("_total")}
    assert {k: v for k, v in counts.items() if v} == {
        "accepted": 2, "rejected": 1, "deferred": 1, "dead_letter": 1, "timeout": 1}
    hist = {s.name + s.labels.get("le", ""): s.value
            for s in fams["leadflow_delivery_duration_seconds"].samples}
    # deferred and dead_letter made no request: no duration observed for them
    assert hist["leadflow_delivery_duration_seconds_count"] == 4
    assert hist["leadflow_delivery_duration_seconds_bucket0.01"] == 2
    assert hist["leadflow_delivery_duration_seconds_sum"] == pytest.approx(5.046)


def test_balance_collector_top_n_by_headroom() -> None:
    rows = [("t1", f"a{i}", i * 1_000_000, 0) for i in range(50)]
    registry = CollectorRegistry()
    registry.register(BalanceCollector(lambda: rows, max_accounts=5))
    fams = families(registry)
    exported = {s.labels["account"] for s in fams["leadflow_account_balance_micros"].samples}
    assert exported == {"a0", "a1", "a2", "a3", "a4"}
    assert fams["leadflow_account_balance_source_accounts"].samples[0].value == 50
    assert fams["leadflow_account_balance_source_up"].samples[0].value == 1


def test_balance_collector_reads_only_at_scrape_time_and_survives_errors() -> None:
    calls: list[int] = []

    def broken() -> list[tuple[str, str, int, int]]:
        calls.append(1)
        raise ConnectionError("redis down")

    registry = CollectorRegistry(auto_describe=True)  # like the default registry
    collector = BalanceCollector(broken)
    registry.register(collector)
    assert calls == []  # registering describes, it does not read
    Metrics(registry).redis_up.set(1)
    fams = families(registry)  # the scrape still succeeds
    assert len(calls) == 1
    assert fams["leadflow_account_balance_source_up"].samples[0].value == 0
    assert "leadflow_account_balance_micros" not in fams
    assert fams["leadflow_redis_up"].samples[0].value == 1

    collector.enabled = False  # opt-out
    assert "leadflow_account_balance_source_up" not in families(registry)
    assert len(calls) == 1


def test_redis_balance_source_reads_account_hashes(redis_server: EmbeddedRedis) -> None:
    client = blocking_redis.Redis.from_url(redis_server.url)
    try:
        names = [keys.acct("t1", a) for a in ("wallet", "c1", "c2", "qw")]
        client.delete(*names)  # an earlier test's
        client.hset(keys.acct("t1", "wallet"), mapping={"bal": 5_000_000, "floor": 0})
        client.hset(keys.acct("t1", "c1"), mapping={"bal": -1_500_000})
        client.hset(keys.acct("t1", "c2"), mapping={"bal": 1, "floor": -1, "mode": "realtime"})
        client.hset(keys.acct("t1", "qw"), mapping={"bal": -9, "floor": -20, "mode": "none"})
        wanted = [("t1", "wallet"), ("t1", "c1"), ("t1", "gone"), ("t1", "c2"), ("t1", "qw")]
        source = redis_balance_source(client, wanted)
        assert source() == [
            ("t1", "wallet", 5_000_000, 0),
            ("t1", "c1", -1_500_000, DEFAULT_FLOOR),  # no floor field: the scripts' default
            ("t1", "c2", 1, -1),
            ("t1", "qw", -9, None),  # billing "none": no floor at all
        ]
        assert redis_balance_source(client, [])() == []
    finally:
        client.delete(*names)
        client.close()


def test_render_negotiates_openmetrics() -> None:
    registry, _ = full_registry()
    body, content_type = render(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    om_body, om_type = render(registry, "application/openmetrics-text;version=1.0.0,*/*;q=0.1")
    assert om_type.startswith("application/openmetrics-text")
    assert om_body.rstrip().endswith(b"# EOF")
    assert b"leadflow_leads_received_total" in body


async def test_metrics_asgi_app_serves_exposition() -> None:
    registry, _ = full_registry()
    app = metrics_asgi_app(registry)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/plain")
    assert int(headers[b"content-length"]) == len(sent[1]["body"])
    assert b"leadflow_account_balance_micros" in sent[1]["body"]


def test_start_worker_metrics_server() -> None:
    registry = CollectorRegistry()
    Metrics(registry).deliveries("accepted").inc(7)
    server, thread = start_worker_metrics_server(0, registry, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        assert 'leadflow_deliveries_total{outcome="accepted"} 7.0' in text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_registry_for_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert registry_for_process() is REGISTRY
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    registry = registry_for_process()
    assert registry is not REGISTRY
    assert [type(c) for c in registry._collector_to_names] == [MultiProcessCollector]


_WORKER = textwrap.dedent(
    """
    import sys
    from engine.obs.metrics import METRICS
    METRICS.leads_received("c1", "s1", "accepted").inc(int(sys.argv[1]))
    METRICS.decision_duration.observe(0.001)
    METRICS.redis_up.set(int(sys.argv[2]))
    METRICS.delivery({"accepted": int(sys.argv[1])}, [0.004] * int(sys.argv[1]))  # mmap values
    """
)
_SCRAPER = textwrap.dedent(
    """
    import sys
    from engine.obs.metrics import registry_for_process, render
    sys.stdout.buffer.write(render(registry_for_process())[0])
    """
)


def test_multiprocess_mode_merges_processes(tmp_path: Path) -> None:
    """Two worker processes write to PROMETHEUS_MULTIPROC_DIR; a third exposes the merge."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def run(code: str, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=60,
            check=True,
        )
        return out.stdout.decode()

    run(_WORKER, "2", "1")
    run(_WORKER, "3", "0")
    text = run(_SCRAPER)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    sold = [s for s in fams["leadflow_leads_received"].samples if s.labels.get("status") == "accepted"]
    assert [s.value for s in sold] == [5]
    count = [
        s for s in fams["leadflow_decision_duration_seconds"].samples if s.name.endswith("_count")
    ]
    assert [s.value for s in count] == [2]
    hist = {s.name + s.labels.get("le", ""): s.value
            for s in fams["leadflow_delivery_duration_seconds"].samples}
    assert hist["leadflow_delivery_duration_seconds_count"] == 5
    assert hist["leadflow_delivery_duration_seconds_bucket0.01"] == 5
    assert hist["leadflow_delivery_duration_seconds_sum"] == pytest.approx(0.02)
    # livemin: both writers are (as far as the directory knows) alive, one saw Redis down
    assert [s.value for s in fams["leadflow_redis_up"].samples] == [0]


def _load_dashboard_builder() -> Any:
    path = ROOT / "config" / "grafana" / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("build_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grafana_dashboard_is_up_to_date_and_uses_exported_metrics() -> None:
    builder = _load_dashboard_builder()
    committed = (ROOT / "config" / "grafana" / "leadflow.json").read_text()
    assert committed == builder.render(), "run: python config/grafana/build_dashboard.py"
    registry, _ = full_registry()
    body, _ = render(registry)
    exported = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    used = set(re.findall(r"leadflow_[a-z_]+", committed))
    assert used <= exported, used - exported
    alerts = (PROM_DIR / "alerts.yml").read_text()
    used_in_alerts = set(re.findall(r"leadflow_[a-z_]+", alerts))
    assert used_in_alerts <= exported, used_in_alerts - exported

"""Generate ``leadflow.json``, the Grafana dashboard.

Run: ``python config/grafana/build_dashboard.py``.

The JSON is committed; ``tests/integration/test_metrics.py`` checks it is in sync with this
script and that every query references a metric ``engine.obs.metrics`` exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
OUT = Path(__file__).with_name("leadflow.json")
MICROS = "1e6"  # money metrics are in micros; panels show currency units


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    pid: int,
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    kind: str = "timeseries",
    description: str = "",
    stack: bool = False,
) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
        ],
    }


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    grp = f"le{', ' + by if by else ''}"
    pre = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({grp}) (rate({metric}_bucket[$__rate_interval])))",
            f"{pre}p{int(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


def row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def ping_post_row(rate: str, y: int) -> list[dict[str, Any]]:
    """The ping-post row (docs/pingpost.md): pings, bids, holds, the ping-to-post ratio,
    and each ping buyer's bid latency and timeout rate."""
    camp = 'campaign=~"$campaign"'
    return [
        row(100, "Ping-post", y),
        panel(101, "Pings by status (per second)", [
            (f"sum by (status) (rate(leadflow_pings_total{{{camp}}}{rate}))", "{{status}}"),
        ], unit="reqps", x=0, y=y + 1, w=8, stack=True),
        panel(102, "Bids by outcome (per second)", [
            (f"sum by (outcome) (rate(leadflow_ping_bids_total{{{camp}}}{rate}))",
             "{{outcome}}"),
        ], unit="reqps", x=8, y=y + 1, w=8, stack=True,
              description="Every ping buyer of a ping: bid, no_bid, timeout, error, or "
                          "ineligible (not asked: filters, schedule, caps, pause, funds)."),
        panel(103, "Holds placed / settled / released / expired (per second)", [
            (f"sum by (event) (rate(leadflow_holds_total{rate}))", "{{event}}"),
        ], unit="reqps", x=16, y=y + 1, w=8,
              description="Buyers' funds held at bid time: settled by a post, released at "
                          "its end (backups not tried), expired with the ping."),
        panel(104, "Ping-to-post ratio (pings per post)", [
            (f"sum by (campaign) (rate(leadflow_pings_total{{{camp}}}{rate}))"
             f" / sum by (campaign) (rate(leadflow_ping_posts_total{{{camp}}}{rate}))",
             "{{campaign}}"),
        ], x=0, y=y + 9, w=8,
              description="Pings answered per post received, by campaign (no series while a "
                          "campaign gets no post)."),
        panel(105, "Bid latency p50 / p99 by buyer",
              quantiles("leadflow_ping_bid_duration_seconds", "buyer"), unit="s",
              x=8, y=y + 9, w=8),
        panel(106, "Bid timeout rate by buyer", [
            (f"sum by (buyer) (rate(leadflow_ping_bid_requests_total{{outcome=\"timeout\"}}"
             f"{rate})) / sum by (buyer) (rate(leadflow_ping_bid_requests_total{rate}))",
             "{{buyer}}"),
        ], unit="percentunit", x=16, y=y + 9, w=8,
              description="Share of the bid requests sent to each ping buyer that timed out "
                          "(its timeout_ms or the ping's deadline). Alert: "
                          "LeadflowPingBuyerTimeouts."),
    ]  # fmt: skip


def dashboard() -> dict[str, Any]:
    rate = "[$__rate_interval]"
    panels = [
        panel(1, "Leads received by status", [
            ("sum by (status) (rate(leadflow_leads_received_total"
             f"{{campaign=~\"$campaign\"}}{rate}))", "{{status}}"),
        ], unit="reqps", x=0, y=0, stack=True),
        panel(2, "Leads sold by buyer", [
            (f"sum by (buyer) (rate(leadflow_leads_sold_total{{campaign=~\"$campaign\"}}{rate}))",
             "{{buyer}}"),
        ], unit="reqps", x=12, y=0, stack=True),
        panel(3, "Decision latency p50 / p99", quantiles("leadflow_decision_duration_seconds"),
              unit="s", x=0, y=8),
        panel(4, "Redis script latency p50 / p99",
              quantiles("leadflow_redis_script_duration_seconds", "script"), unit="s", x=12, y=8),
        panel(5, "Money flow (per second, currency units)", [
            (f"sum by (kind) (rate(leadflow_money_debited_micros_total{rate})) / {MICROS}",
             "debited {{kind}}"),
            (f"-sum by (kind) (rate(leadflow_money_credited_micros_total{rate})) / {MICROS}",
             "credited {{kind}}"),
        ], x=0, y=16, description="Debits positive, credits negative; exported in micros."),
        panel(6, "Wallet balance vs floor (currency units)", [
            (f"leadflow_account_balance_micros{{tenant=~\"$tenant\"}} / {MICROS}",
             "{{tenant}}/{{account}} balance"),
            (f"leadflow_account_floor_micros{{tenant=~\"$tenant\"}} / {MICROS}",
             "{{tenant}}/{{account}} floor"),
        ], x=12, y=16, description="Exported at scrape time for a bounded set of accounts."),
        panel(7, "Headroom above floor (lowest 10)", [
            (f"bottomk(10, (leadflow_account_balance_micros{{tenant=~\"$tenant\"}}"
             f" - on(tenant, account) leadflow_account_floor_micros) / {MICROS})",
             "{{tenant}}/{{account}}"),
        ], x=0, y=24, kind="bargauge"),
        panel(8, "Recharge attempts by outcome", [
            (f"sum by (outcome) (increase(leadflow_recharge_attempts_total{rate}))", "{{outcome}}"),
        ], x=12, y=24, stack=True),
        panel(9, "Recharge latency (threshold to credited)",
              quantiles("leadflow_recharge_latency_seconds"), unit="s", x=0, y=32),
        panel(10, "Deliveries by outcome", [
            (f"sum by (outcome) (rate(leadflow_deliveries_total{rate}))", "{{outcome}}"),
        ], unit="reqps", x=12, y=32, stack=True),
        panel(11, "Delivery duration p50 / p99", quantiles("leadflow_delivery_duration_seconds"),
              unit="s", x=0, y=40),
        panel(12, "Stream lag / pending", [
            ("sum by (stream, group) (leadflow_stream_lag_entries)", "lag {{stream}}/{{group}}"),
            ("sum by (stream, group) (leadflow_stream_pending_entries)",
             "pending {{stream}}/{{group}}"),
        ], x=12, y=40),
        panel(13, "HTTP requests by code", [
            (f"sum by (code) (rate(leadflow_http_requests_total{rate}))", "{{code}}"),
        ], unit="reqps", x=0, y=48, stack=True),
        panel(14, "HTTP latency p50 / p99 by route",
              quantiles("leadflow_http_request_duration_seconds", "route"), unit="s", x=12, y=48),
        panel(15, "Redis up", [("min(leadflow_redis_up)", "redis up")],
              x=0, y=56, w=6, h=6, kind="stat"),
        panel(16, "Balance export up", [("min(leadflow_account_balance_source_up)", "source up")],
              x=6, y=56, w=6, h=6, kind="stat"),
        panel(17, "Build", [("leadflow_build_info", "{{version}} {{revision}}")],
              x=12, y=56, w=12, h=6, kind="table"),
        panel(18, "Notifications by channel (sends per second)", [
            (f"sum by (channel) (rate(leadflow_notify_sent_total{rate}))", "sent {{channel}}"),
            (f"sum by (channel) (rate(leadflow_notify_failed_total{rate}))",
             "failed {{channel}}"),
            (f"sum by (channel) (rate(leadflow_notify_dead_lettered_total{rate}))",
             "dead-lettered {{channel}}"),
        ], unit="reqps", x=0, y=62, w=24,
              description="E-mail notifications: sent, failed (tried again later) and "
                          "dead-lettered (refused for good, or the event's last delivery)."),
    ]  # fmt: skip
    panels += ping_post_row(rate, y=70)

    def var(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": "query",
            "datasource": DS,
            "query": {"query": query, "refId": name},
            "definition": query,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "refresh": 2,
        }

    return {
        "title": "leadflow",
        "uid": "leadflow-overview",
        "tags": ["leadflow"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                var("campaign", "label_values(leadflow_leads_received_total, campaign)"),
                var("tenant", "label_values(leadflow_account_balance_micros, tenant)"),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())

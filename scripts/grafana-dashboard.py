#!/usr/bin/env python3
"""Haven's Grafana dashboard, written from one list of panels.

    scripts/grafana-dashboard.py > docs/grafana-dashboard.json
    scripts/grafana-dashboard.py --prometheus http://127.0.0.1:9090

The second form prints, for each panel, its title and a Prometheus
graph-page URL with its first query: that is how docs/metrics-panels.png
was rendered (Grafana is not in Debian's packages); docs/deployment.md
has the whole procedure.
"""

import json
import sys
import urllib.parse

# (title, unit, [(query, legend)])
PANELS = [
    ("Open sockets by role", "short", [("sum by (role) (haven_open_sockets)", "{{role}}")]),
    ("Open chats by mode", "short", [("max by (mode) (haven_sessions)", "{{mode}}")]),
    ("Messages stored per second, by sender", "ops",
     [("sum by (sender) (rate(haven_messages_stored_total[1m]))", "{{sender}}")]),
    ("Ack latency", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(haven_ack_latency_seconds_bucket[1m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(haven_ack_latency_seconds_bucket[1m])))", "p99"),
    ]),
    ("Group commit: writes per batch", "short", [
        ("sum(rate(haven_commit_batch_size_sum[1m])) / sum(rate(haven_commit_batch_size_count[1m]))", "mean"),
        ("histogram_quantile(0.99, sum by (le) (rate(haven_commit_batch_size_bucket[1m])))", "p99"),
    ]),
    ("Group commit: duration", "s", [
        ("histogram_quantile(0.99, sum by (le) (rate(haven_commit_batch_duration_seconds_bucket[1m])))", "p99"),
    ]),
    ("Companion latency (p99), by provider", "s", [
        ("histogram_quantile(0.99, sum by (le, provider) (rate(haven_companion_first_delta_seconds_bucket[1m])))",
         "first text {{provider}}"),
        ("histogram_quantile(0.99, sum by (le, provider) (rate(haven_companion_reply_seconds_bucket[1m])))",
         "committed {{provider}}"),
    ]),
    ("Provider errors per second", "ops",
     [("sum by (provider, kind) (rate(haven_provider_errors_total[5m]))", "{{provider}} {{kind}}")]),
    ("Takeovers and crisis flags (last hour)", "short", [
        ("sum(increase(haven_takeovers_total[1h]))", "takeovers"),
        ("sum by (level) (increase(haven_crisis_flags_total[1h]))", "flags {{level}}"),
    ]),
    ("Time to acknowledge a crisis flag (p90)", "s", [
        ("histogram_quantile(0.9, sum by (le) (rate(haven_crisis_acknowledgement_seconds_bucket[1h])))", "p90"),
    ]),
    ("Refused by a limit, per second", "ops",
     [("sum by (limit) (rate(haven_rate_limited_total[5m]))", "{{limit}}")]),
    ("Login failures and listener reconnects (last hour)", "short", [
        ("sum(increase(haven_login_failures_total[1h]))", "login failures"),
        ("sum(increase(haven_notification_reconnects_total[1h]))", "PostgreSQL reconnects"),
    ]),
    ("Running versions", "short", [("count by (version) (haven_build_info)", "{{version}}")]),
]


def grafana():
    panels = []
    for index, (title, unit, queries) in enumerate(PANELS):
        panels.append({
            "id": index + 1,
            "type": "timeseries",
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [
                {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend}
                for n, (expr, legend) in enumerate(queries)
            ],
        })
    return {
        "title": "Haven",
        "uid": "haven",
        "description": "Haven's Prometheus metrics (README, \"Metrics\").",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        ]},
        "panels": panels,
    }


def prometheus_urls(base):
    """One graph-page URL per panel, with the panel's first query."""
    for title, _, queries in PANELS:
        params = {"g0.expr": queries[0][0], "g0.tab": "0", "g0.range_input": "15m"}
        yield title, f"{base.rstrip('/')}/graph?{urllib.parse.urlencode(params)}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--prometheus":
        for title, url in prometheus_urls(sys.argv[2]):
            print(f"{title}\t{url}")
    else:
        print(json.dumps(grafana(), indent=2))

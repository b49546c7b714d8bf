"""The Grafana dashboard in packaging/grafana/: valid JSON Grafana imports (a datasource variable,
panels with targets), and every query names only metrics the daemon exports
(`peersync.admin.metrics.METRICS`, which tests/integration/test_admin.py checks against a live
scrape), so a renamed metric cannot leave a dashboard panel silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

from peersync.admin.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "peersync-dashboard.json"
NAME = re.compile(r"\b(peersync_[a-z0-9_]+)\b")


def exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_the_dashboard_is_importable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"


def test_every_expression_names_only_exported_metrics() -> None:
    seen: set[str] = set()
    for expr in exprs():
        names = set(NAME.findall(expr))
        assert names, f"no peersync metric in {expr!r}"
        assert names <= METRICS, f"{expr!r} names {sorted(names - METRICS)}, which the daemon does not export"
        seen |= names
    # the dashboard shows every family the issue asks for
    for family in ("peersync_bytes_total", "peersync_chunk_seconds_bucket", "peersync_hedges_total",
                   "peersync_corrupt_chunks_total", "peersync_dropped_peers_total", "peersync_cache_bytes",
                   "peersync_cache_budget_bytes", "peersync_cache_evictions_total", "peersync_tracker",
                   "peersync_elections_total", "peersync_members", "peersync_downloads_in_flight",
                   "peersync_unpacks_in_flight", "peersync_errors_total"):
        assert family in seen, family


def test_the_name_check_catches_an_unknown_metric() -> None:
    assert set(NAME.findall("rate(peersync_no_such_thing_total[5m])")) - METRICS

"""The Grafana dashboard and the Prometheus rules read metrics that exist, with the names our
processes export, and the dashboard is well formed and covers what operators look at."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from extproc.metrics import PickerMetrics
from extproc.state.collector import CollectorMetrics
from extproc.state.kv_events import KVEventMetrics
from tests.manifests import promql
from tests.sim.conftest import server_metrics

OBSERVABILITY = Path(__file__).resolve().parents[2] / "manifests" / "observability"


def _known_metrics() -> set[str]:
    registry = CollectorRegistry()
    PickerMetrics(registry)
    CollectorMetrics(registry)
    KVEventMetrics(registry)
    picker = promql.exported_names(registry)
    vllm = server_metrics(max_lora=4)
    return picker | promql.names_in_text(vllm.render().decode())


def _rules() -> list[dict[str, Any]]:
    spec = yaml.safe_load((OBSERVABILITY / "prometheusrule.yaml").read_text())["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def test_rules_read_metrics_that_exist() -> None:
    known = _known_metrics()
    recorded: set[str] = set()
    for rule in _rules():
        unknown = promql.unknown(promql.metric_names(rule["expr"]), known | recorded)
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"
        if "record" in rule:
            assert rule["record"] not in recorded, f"{rule['record']} recorded twice"
            recorded.add(rule["record"])


def test_dashboard_reads_metrics_and_rules_that_exist() -> None:
    known = _known_metrics() | {r["record"] for r in _rules() if "record" in r}
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", ()):
            unknown = promql.unknown(promql.metric_names(target["expr"]), known)
            assert not unknown, f"panel {panel['title']!r}: {unknown}"
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            unknown = promql.unknown(promql.metric_names(variable["definition"]), known)
            assert not unknown, f"variable {variable['name']}: {unknown}"


def test_every_recording_rule_is_charted_or_alerted_on() -> None:
    used = {
        name
        for panel in _panels(_dashboard())
        for target in panel.get("targets", ())
        for name in promql.metric_names(target["expr"])
    }
    used |= {n for r in _rules() if "alert" in r for n in promql.metric_names(r["expr"])}
    unused = sorted(r["record"] for r in _rules() if "record" in r and r["record"] not in used)
    assert not unused, f"recorded but never read: {unused}"


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        # Every query goes to the chosen Prometheus and the chosen namespace.
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} explains nothing"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert 'namespace="$namespace"' in target["expr"], panel["title"]


@pytest.mark.parametrize(
    ("row", "metric"),
    [
        ("Routing decisions", "strategy_outcome:extproc_requests:rate1m"),
        ("Prefix cache", "namespace:vllm_prefix_cache_hits:ratio_rate5m"),
        ("Per-pod load", "vllm:num_requests_waiting"),
        ("Picker", "strategy:extproc_pick_duration_seconds:p99_1m"),
        ("Tenants", "tenant_kind:extproc_tenant_tokens:rate5m"),
        ("Prefill/decode", "mode_outcome:extproc_disaggregation_decisions:rate5m"),
    ],
)
def test_dashboard_covers(row: str, metric: str) -> None:
    """The issue's list: routing decisions, prefix hit rates, per-pod load, picker latency and
    per-tenant usage, each a row with a panel on its key series."""
    current = None
    found = False
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
        elif current == row:
            found |= any(metric in promql.metric_names(t["expr"]) for t in panel["targets"])
    assert found, f"row {row!r} has no panel on {metric}"


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    root = OBSERVABILITY.parents[1]
    alerts = [r for r in _rules() if "alert" in r]
    assert alerts
    for alert in alerts:
        path, _, anchor = alert["annotations"]["runbook"].partition("#")
        # GitHub's heading anchors: lower case, spaces to hyphens, punctuation dropped.
        headings = {
            re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in (root / path).read_text().splitlines()
            if line.startswith("#")
        }
        assert anchor in headings, f"{alert['alert']}: no section #{anchor} in {path}"

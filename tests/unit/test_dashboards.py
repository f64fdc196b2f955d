"""Grafana dashboards and Prometheus alert rules: every query parses and selects
only metrics that Lull's catalogue or vLLM defines; vLLM's names are checked
against the installed vLLM's source."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from proto.telemetry.metrics import CATALOGUE, series_names
from proto.telemetry.vllm_metrics import VLLM_METRICS, vllm_series_names
from tests.promql import PromQLError, parse

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "platform" / "grafana").glob("*.json"))
KNOWN = series_names() | vllm_series_names()
LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*([a-zA-Z_]\w*)\s*\)$")


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_four_dashboards_exist_with_unique_uids():
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {"Lull / Cluster overview", "Lull / Sessions and idleness", "Lull / KV tiers", "Lull / Engine performance"}
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_parses_and_names_known_metrics(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["panels"], "a dashboard without panels"
    for title, expr in queries(dashboard):
        unknown = parse(expr).metrics - KNOWN
        assert not unknown, f"{path.name} / {title}: unknown metrics {unknown} in {expr}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"{path.name}: variable {variable['name']} is not label_values(metric, label)"
            assert match.group(1) in KNOWN, f"{path.name}: variable {variable['name']} selects {match.group(1)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panels_are_laid_out_and_use_the_datasource_variable(path):
    dashboard = json.loads(path.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']} leaves the 24-column grid"
        assert panel["datasource"]["uid"] == "${datasource}"
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


def test_every_catalogue_metric_is_on_a_dashboard():
    used = set().union(*(parse(e).metrics for p in DASHBOARDS for _, e in queries(json.loads(p.read_text()))))
    unused = [spec.name for spec in CATALOGUE if not spec.series_names() & used]
    assert not unused, f"metrics nobody can see: {unused}"


def test_alert_rules_cover_the_three_conditions_and_name_known_metrics():
    rules = [r for g in yaml.safe_load((ROOT / "platform" / "prometheus" / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    assert {"LullTierFull", "LullGateWaitsRising", "LullReplicaDown"} <= {r["alert"] for r in rules}
    for rule in rules:
        assert parse(rule["expr"]).type in ("vector", "scalar")
        unknown = parse(rule["expr"]).metrics - KNOWN
        assert not unknown, f"{rule['alert']}: unknown metrics {unknown}"
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and re.fullmatch(r"\d+[smh]", rule["for"])


def test_vllm_names_exist_in_installed_vllm_with_the_same_type():
    # Read the source without importing vLLM (its import takes half a minute).
    spec = importlib.util.find_spec("vllm")
    assert spec and spec.origin, "vLLM must be installed to check its metric names; run scripts/setup.sh"
    loggers = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    assert loggers.exists(), f"{loggers} is missing: has vLLM moved its metrics?"
    defined: dict[str, str] = {}
    for node in ast.walk(ast.parse(loggers.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("_gauge_cls", "_counter_cls", "_histogram_cls"):
            for keyword in node.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    defined[keyword.value.value] = node.func.attr[1:-len("_cls")]
    assert len(defined) > 20, "found too few metrics: has loggers.py changed shape?"
    for name, kind in VLLM_METRICS.items():
        assert defined.get(name) == kind, f"{name}: vLLM defines {defined.get(name)!r}, we say {kind!r}"


@pytest.mark.parametrize("query", [
    "rate(lull:kv_moves_total)",                    # rate needs a range
    "sum(lull:sessions[5m])",                       # aggregating a range vector
    "histogram_quantile(0.9, sum by (le) (rate(x[5m]))",  # unbalanced
    "sum by (le) lull:sessions",                    # aggregation without parentheses
    "rated(lull:sessions[5m])",                     # unknown function
    "lull:sessions{tier=gpu}",                      # unquoted label value
    "(lull:sessions)[5m]",                          # range on an expression
    "lull:sessions + bool lull:sessions",           # bool on arithmetic
    "lull:sessions and 1",                          # set operator with a scalar
])
def test_the_parser_rejects_invalid_promql(query):
    with pytest.raises(PromQLError):
        parse(query)


def test_the_parser_finds_every_selected_metric():
    expr = ('sum by (tier) (rate(a_total[$__rate_interval])) / on (tier) group_left '
            'max_over_time(b{x=~"$node"}[1h:5m]) > bool 0 or absent({__name__="c"}) unless d offset 5m')
    assert parse(expr).metrics == {"a_total", "b", "c", "d"}

"""deploy/prometheus/alerts.yml, deploy/grafana/cofeat-dashboard.json and the metric names
in docs/operations.md agree with each other and with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "cofeat-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
METRIC = re.compile(r"\bcofeat_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")
# The figures the dashboard must show (issue "The whole loop running").
REQUIRED_ON_DASHBOARD = {
    "cofeat_ingest_events_total", "cofeat_ingest_lag", "cofeat_ingest_batch_seconds",
    "cofeat_factors_step_seconds", "cofeat_refresh_last_success_timestamp_seconds",
    "cofeat_model_version", "cofeat_embed_freshness_seconds",
    "cofeat_serve_request_seconds", "cofeat_serve_requests_total",
}


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def exported_metrics() -> set[str]:
    """Metric names defined in the code (the first argument of a prometheus_client type)."""
    names = set()
    for path in list((ROOT / "services").rglob("*.py")) + list((ROOT / "shared").rglob("*.py")):
        names |= set(re.findall(r"\"(cofeat_[a-z0-9_]+)\"", path.read_text()))
    return names


def documented_metrics() -> set[str]:
    """Names in the first column of docs/operations.md's metric tables."""
    names = set()
    for line in OPERATIONS.read_text().splitlines():
        if line.startswith("| `cofeat_"):
            names |= set(METRIC.findall(line.split("|")[1]))
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules(path: Path = ALERTS) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def rule_problems(path: Path) -> list[str]:
    problems = []
    try:
        groups = yaml.safe_load(path.read_text())["groups"]
    except (yaml.YAMLError, KeyError, TypeError) as error:
        return [f"not a rules file: {error}"]
    seen = set()
    for group in groups:
        for rule in group["rules"]:
            name = rule.get("alert")
            if not name or name in seen:
                problems.append(f"missing or duplicate alert name {name!r}")
            seen.add(name)
            if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: severity must be warning or critical")
            if "summary" not in rule.get("annotations", {}):
                problems.append(f"{name}: no summary")
            if not balanced(rule.get("expr", "")):
                problems.append(f"{name}: unbalanced expression")
    return problems


def promtool(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not on PATH (Debian package prometheus); structural checks ran")
    return subprocess.run([binary, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)


# -- alerts ----------------------------------------------------------------------------------

def test_alert_rules_are_well_formed() -> None:
    assert rule_problems(ALERTS) == []
    names = {r["alert"] for r in alert_rules()}
    for wanted in ("CofeatIngestLagHigh", "CofeatDeadLetterRateHigh",
                   "CofeatFactorRefreshFailed", "CofeatRefreshStale",
                   "CofeatEmbedFreshnessSlow"):
        assert wanted in names


def test_promtool_accepts_rules() -> None:
    result = promtool(ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old,new", [
    ("severity: critical", "severity: page-me"),
    ("sum by (topic) (cofeat_ingest_lag) > 100000", "sum by (topic) (cofeat_ingest_lag > 100000"),
])
def test_broken_rules_are_rejected(tmp_path: Path, old: str, new: str) -> None:
    broken = tmp_path / "alerts.yml"
    text = ALERTS.read_text()
    assert old in text
    broken.write_text(text.replace(old, new, 1))
    assert rule_problems(broken)
    if shutil.which("promtool") and "severity" not in old:
        assert promtool(broken).returncode != 0


def test_docs_example_rules_match_the_file() -> None:
    blocks = re.findall(r"```yaml\n(groups:.*?)```", OPERATIONS.read_text(), re.S)
    assert blocks, "docs/operations.md has no example rules"
    in_file = {r["alert"]: r for r in alert_rules()}
    for block in blocks:
        for group in yaml.safe_load(block)["groups"]:
            for rule in group["rules"]:
                full = in_file[rule["alert"]]
                for key in ("expr", "for", "labels"):
                    assert rule.get(key) == full.get(key), (rule["alert"], key)
                assert rule["annotations"].items() <= full["annotations"].items()


# -- dashboard -------------------------------------------------------------------------------

def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert balanced(target["expr"]), target["expr"]
            assert target["datasource"]["uid"].strip("${}") in variables


def test_dashboard_shows_the_main_figures() -> None:
    used = {base_name(m) for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))
            for m in METRIC.findall(e)}
    assert used >= REQUIRED_ON_DASHBOARD, REQUIRED_ON_DASHBOARD - used


# -- names agree -----------------------------------------------------------------------------

def test_every_metric_used_is_exported_or_documented() -> None:
    known = exported_metrics() | documented_metrics()
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    exprs += [r["expr"] for r in alert_rules()]
    for expr in exprs:
        for name in METRIC.findall(expr):
            assert base_name(name) in known, f"{name} is neither exported nor in operations.md"


def test_documented_metrics_include_the_exported_ingest_ones() -> None:
    exported = {m for m in exported_metrics() if m.startswith("cofeat_ingest_")}
    assert exported <= documented_metrics()

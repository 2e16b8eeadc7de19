"""The provisioned Grafana dashboard: generated, well-formed, and querying only what the code exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.unit.ops.names import COMPOSE, PYTHON, check_expression, promtool, run

DASHBOARD = COMPOSE / "grafana" / "dashboards" / "otpgate.json"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = COMPOSE / "grafana" / "provisioning" / "dashboards" / "otpgate.yml"


def _dashboard() -> dict[str, object]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels() -> list[dict[str, object]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]  # type: ignore[union-attr, index]


def _expressions() -> list[tuple[str, str]]:
    return [(str(p["title"]), str(t["expr"])) for p in _panels() for t in p["targets"]]  # type: ignore[attr-defined]


def test_dashboard_json_is_what_the_generator_writes() -> None:
    result = run([PYTHON, str(COMPOSE / "grafana" / "dashboard.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_panels_are_laid_out_without_overlap_and_have_unique_ids() -> None:
    panels = _dashboard()["panels"]
    assert isinstance(panels, list)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_panels_use_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"] for d in provisioned}
    for panel in _panels():
        assert panel["datasource"]["uid"] in uids, panel["title"]  # type: ignore[index]
        for t in panel["targets"]:  # type: ignore[attr-defined]
            assert t["datasource"]["uid"] in uids
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + providers[0]["options"]["path"] + ":ro") for m in mounts)


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    exprs = " ".join(e for _, e in _expressions())
    for needle in (
        "sum by (status) (rate(otpgate_messages_total",
        "sum by (channel)",
        "sum by (bot) (rate(otpgate_messages_total",
        "histogram_quantile(0.5, sum by (le) (rate(otpgate_accept_to_sent_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(otpgate_accept_to_sent_seconds_bucket",
        "otpgate_verifications_total",
        'otpgate_verifications_total{outcome="approved"}',
        "otpgate_fraud_decisions_total",
        "otpgate_limiter_rejections_total",
        "otpgate_bot_flood_waits_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "otpgate_dispatch_lag_seconds_bucket",
    ):
        assert needle in exprs, needle


def test_every_panel_queries_metrics_labels_and_values_the_code_exports() -> None:
    problems = [f"{title}: {p}" for title, expr in _expressions() for p in check_expression(expr)]
    assert problems == []


def test_every_expression_is_valid_promql(tmp_path: object) -> None:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": re.sub(r"\$__\w+", "5m", expr)}
        for i, (_, expr) in enumerate(_expressions())
    ]
    path = tmp_path / "dashboard_rules.yml"  # type: ignore[operator]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([tool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr

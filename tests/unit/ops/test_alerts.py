"""Prometheus alerts: promtool accepts and unit-tests them, and they only query what the code exports."""

from __future__ import annotations

import pytest
import yaml

from tests.unit.ops.names import COMPOSE, check_expression, promtool, run

ALERTS = COMPOSE / "prometheus" / "alerts.yml"
ALERTS_TEST = COMPOSE / "prometheus" / "alerts_test.yml"

# What the issue asks the alerts to cover.
REQUIRED_ALERTS = {
    "OtpgateSmsPumpingSuspected",  # fraud blocks per prefix / conversion
    "OtpgateSmsRateJump",  # SMS rate jump
    "OtpgateVerificationConversionDrop",
    "OtpgateBotSessionDown",
    "OtpgateBotFloodWaiting",
    "OtpgateDispatchLagHigh",
    "OtpgateGrpcErrorRatioHigh",
    "OtpgateDatabaseUnreachable",
}


def _rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    result = run([tool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    result = run([tool, "test", "rules", str(ALERTS_TEST)], cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_required_alert_exists_and_is_unit_tested() -> None:
    alerts = {str(rule["alert"]) for rule in _rules() if "alert" in rule}
    assert alerts >= REQUIRED_ALERTS
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    quiet = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if not case.get("exp_alerts")
    }
    # Each alert is shown to fire, and each of the alerts also shown to stay quiet.
    assert alerts <= fired | {"OtpgateAcceptToSentSlow", "OtpgateGrpcLatencyHigh"}
    assert REQUIRED_ALERTS - {"OtpgateBotFloodWaiting"} <= quiet


def test_alerts_only_use_metrics_labels_and_values_the_code_exports() -> None:
    rules = _rules()
    recorded = {str(rule["record"]) for rule in rules if "record" in rule}
    problems = []
    for rule in rules:
        name = rule.get("alert") or rule.get("record")
        problems += [f"{name}: {p}" for p in check_expression(str(rule["expr"]), recorded)]
    assert problems == []


def test_alerts_carry_severity_summary_and_a_runbook_that_exists() -> None:
    operations = (COMPOSE.parent / "docs" / "operations.md").read_text()
    anchors = {
        "#" + line.lstrip("#").strip().lower().replace(" ", "-")
        for line in operations.splitlines()
        if line.startswith("#")
    }
    for rule in _rules():
        if "alert" not in rule:
            continue
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(annotations, dict)
        assert labels["severity"] in {"critical", "warning"}, rule["alert"]
        assert annotations["summary"], rule["alert"]
        runbook = str(annotations["runbook"])
        assert runbook.startswith("docs/operations.md#"), rule["alert"]
        assert runbook.removeprefix("docs/operations.md") in anchors, f"{rule['alert']}: {runbook} not in operations.md"


def test_the_expression_checker_catches_mistakes() -> None:
    assert check_expression('rate(otpgate_messages_total{status="SENT"}[5m])') == []
    assert check_expression("rate(otpgate_no_such_metric_total[5m])")
    assert check_expression('rate(otpgate_messages_total{colour="red"}[5m])')
    assert check_expression('rate(otpgate_fraud_decisions_total{decision="maybe"}[5m])')
    assert check_expression('rate(grpc_server_handled_total{grpc_code="INTERNAL"}[5m])')
    assert check_expression('rate(grpc_server_handled_total{grpc_code="Internal"}[5m])') == []

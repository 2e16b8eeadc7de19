"""`python -m bench` on a tiny load, against the test session's database: the script works end to
end and ends with a well-formed summary line. It measures nothing here (benchmarks are never timed
tests); `make bench` runs the real sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration.bench.conftest import RunBench

pytestmark = pytest.mark.e2e

SUMMARY = re.compile(
    r"^bench: pipeline/floor=\d+\.\d\d pipeline/floor_min=\d+\.\d\d cpu_ms_per_msg=\d+\.\d\d "
    r"db_ops_per_msg=\d+\.\d\d verify/send=\d+\.\d\d bot/limit=\d+\.\d\d pool/limit=\d+\.\d\d flood_errors=\d+$"
)
FRAUD = re.compile(
    r"^bench fraud: attack_sms=\d+\.\d\d% \(max \d+\.\d\d%\) legit_refused=\d+\.\d\d% \(max \d+\.\d\d%\) seeds=\d+$"
)


def test_bench_runs_on_a_tiny_load(run_bench: RunBench, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench("--tiny", "--skip-ceiling", "--skip-dispatch", "--out", str(out))
    lines = result.stdout.strip().splitlines()
    assert SUMMARY.match(lines[-2]), lines[-2]
    assert FRAUD.match(lines[-1]), lines[-1]
    report = json.loads(out.read_text())
    assert report["summary"] == lines[-2] and report["fraud"]["summary"] == lines[-1]
    # The fraud scenario ran every kind of traffic through the public API.
    kinds = report["fraud"]["runs"][0]["kinds"]
    assert kinds["legitimate"]["requests"] > 0 and kinds["ip_hammer"]["requests"] > 0
    pipeline = report["pipeline"]
    send = pipeline["send"][0]
    assert send["done"] > 0 and send["received"] == send["done"]
    assert pipeline["floor"][0]["done"] > 0
    assert pipeline["verify"][0]["done"] > 0
    mix = pipeline["op_mix"]["per_message"]
    # One message costs at least: its own insert and the recipient lookup in the directory.
    assert any(key.endswith("messages:insert:-") for key in mix), mix
    assert any("subscribers:find" in key for key in mix), mix

"""`python -m bench dispatch` on a tiny load, against the test session's database: two delivery
replicas with inline dispatch off run the steady load, the backlog and the inline comparison end to
end, every message arrives exactly once and the summary line is well formed. It measures nothing
here (benchmarks are never timed tests); `make bench` runs the real sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration.bench.conftest import RunBench

pytestmark = pytest.mark.e2e

SUMMARY = re.compile(r"^bench dispatch: lag_p99=\d+\.\d\d drain/inline=\d+\.\d\d$")


def test_dispatch_bench_runs_on_a_tiny_load(run_bench: RunBench, tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    result = run_bench("dispatch", "--tiny", "--out", str(out))
    last = result.stdout.strip().splitlines()[-1]
    assert SUMMARY.match(last), last
    report = json.loads(out.read_text())
    assert report["summary"] == last
    for run in ("steady", "backlog", "inline"):
        row = report[run]
        assert row["accepted"] > 0 and row["arrived"] == row["accepted"], (run, row)
        assert row["twice"] == 0 and row["lost"] == 0, (run, row)
    # The backlog waited for the dispatchers, and their claims account for every message of it.
    assert report["backlog"]["sent_before_restart"] == 0
    assert sum(report["backlog"]["claimed_by"].values()) >= report["backlog"]["accepted"]
    assert set(report["backlog"]["claimed_by"]) == {"delivery", "delivery-2"}
    assert report["backlog"]["rate"] > 0 and report["inline"]["rate"] > 0

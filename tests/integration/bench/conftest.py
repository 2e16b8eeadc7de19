"""Running `python -m bench` as a process against the test session's database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from services.core.devdb import ROOT

RunBench = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_bench(mongo_uri: str) -> RunBench:
    """`python -m bench <args>` with MONGODB_URI set to the session's database; fails on a non-zero exit."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "bench", *args],
            env={**os.environ, "MONGODB_URI": mongo_uri},
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    return run

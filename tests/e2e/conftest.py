"""The whole system as separate processes: dev database + five services, sandbox mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli.dev import SERVICES, ProcessStack
from services.core.crypto import Keyring
from services.core.devdb import ROOT, DevDatabase, free_port


@dataclass
class System:
    stack: ProcessStack
    env: dict[str, str]
    http: str

    def cli(self, *args: str) -> dict[str, object]:
        """Run `otpgate --json ...` against this system and parse its answer."""
        result = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "--json", *args],
            env={**os.environ, **self.stack.service_env()},
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def system_database() -> Iterator[str]:
    with DevDatabase() as database:
        yield database.uri


@asynccontextmanager
async def running_system(database_uri: str, logs: Path, **overrides: str) -> AsyncIterator[System]:
    """Every service as a process of its own in sandbox mode on `database_uri`, up and running its
    bots' sessions; stopped afterwards (with the tail of each log on stderr)."""
    http_port = free_port()
    env = {
        "MONGODB_URI": database_uri,
        "OTPGATE_KEYS": Keyring.generate_spec("e2e1"),
        "OTPGATE_ENV": "dev",
        "OTPGATE_SANDBOX": "true",
        "OTPGATE_EDGE_HTTP_PORT": str(http_port),
        "OTPGATE_TELEGRAMSIM_GATEWAY_PORT": str(free_port()),
        **overrides,
    }
    stack = ProcessStack(
        env=env,
        log_dir=logs,
        ports={name: free_port() for name in SERVICES},
        metrics_ports={name: free_port() for name in SERVICES},
    )
    stack.start()
    try:
        await stack.wait_healthy(timeout=120)
        assert await stack.wait_bots(timeout=120) == [], "botgateway's bot sessions did not start"
        yield System(stack=stack, env=env, http=f"http://127.0.0.1:{http_port}")
    finally:
        stack.stop()
        for name in SERVICES:
            log = logs / f"{name}.log"
            if log.exists():
                sys.stderr.write(f"--- {name} log (tail) ---\n{log.read_text()[-3000:]}\n")


@pytest.fixture(scope="session")
async def system(system_database: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(system_database, tmp_path_factory.mktemp("logs")) as system:
        yield system

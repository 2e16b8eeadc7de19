"""`otpgate dev` (what `make run` runs) as a person runs it in a terminal: on ports of its own, one
service stopped and started again, Ctrl-C to the whole process group, and a second run that finds
the sandbox as the first one left it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.dev import SERVICES, stack_dir
from services.core.devdb import ROOT, free_port

pytestmark = pytest.mark.e2e


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})  # noqa: S310 - the stack's own edge
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - the stack's own edge
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


class Runner:
    """One `otpgate dev` in its own process group, as a terminal starts it."""

    def __init__(self, env: dict[str, str], db_port: int, log: Path) -> None:
        self.env = env
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "dev", "--db-port", str(db_port)],
            env=env,
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while "otpgate is up" not in self.output():
            assert self.process.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.2)

    def control(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", "dev", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C: SIGINT to every process of the group at once."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            self._out.close()


@pytest.fixture
def ports() -> Iterator[dict[str, str]]:
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("OTPGATE_") and name != "MONGODB_URI"
    }
    for name in SERVICES:
        env[f"OTPGATE_{name.upper()}_PORT"] = str(free_port())
        env[f"OTPGATE_{name.upper()}_METRICS_PORT"] = str(free_port())
    env["OTPGATE_EDGE_HTTP_PORT"] = str(free_port())
    home = stack_dir(int(env["OTPGATE_EDGE_PORT"]))
    yield env
    shutil.rmtree(home, ignore_errors=True)


def test_dev_runner_on_its_own_ports_stops_and_starts_one_service_and_stops_cleanly_on_ctrl_c(
    ports: dict[str, str], tmp_path: Path
) -> None:
    db_port = free_port()
    edge = f"http://127.0.0.1:{ports['OTPGATE_EDGE_HTTP_PORT']}"
    first = Runner(ports, db_port, tmp_path / "first.log")
    try:
        first.wait_up()
        assert f"edge HTTP      {edge}" in first.output()
        assert f"telegramsim    gRPC 127.0.0.1:{ports['OTPGATE_TELEGRAMSIM_PORT']}" in first.output()
        assert http("GET", f"{edge}/healthz")[0] == 200
        assert http("POST", f"{edge}/sandbox/v1/users", {"user": {"userId": "4100", "phone": "+79994100000"}})[0] == 200

        stopped = first.control("stop", "botgateway")
        assert stopped.returncode == 0 and stopped.stdout.strip() == "botgateway stopped", stopped.stderr
        # The bot is offline now: the person's Start waits in the simulated Telegram, unanswered.
        status, started = http("POST", f"{edge}/sandbox/v1/users/4100/bots/smscodes_bot:start", {})
        assert status == 200 and started.get("replies", []) == []
        restarted = first.control("start", "botgateway")
        assert restarted.returncode == 0 and restarted.stdout.strip() == "botgateway running", restarted.stderr
        chat: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while not any(m.get("fromBot") for m in chat):
            assert time.monotonic() < deadline, "the reply never came after botgateway was back"
            time.sleep(0.2)
            chat = http("GET", f"{edge}/sandbox/v1/users/4100/bots/smscodes_bot/messages")[1].get("messages", [])
        assert chat[0]["text"] == "/start" and chat[1]["requestContact"]
    finally:
        code = first.interrupt()
    out = first.output()
    assert code == 0, out[-3000:]
    assert out.rstrip().endswith("otpgate dev: stopped"), out[-1000:]
    assert "unexpectedly" not in out and "Traceback" not in out

    # `make run` again: the sandbox is where the first run left it.
    second = Runner(ports, db_port, tmp_path / "second.log")
    try:
        second.wait_up()
        chat = http("GET", f"{edge}/sandbox/v1/users/4100/bots/smscodes_bot/messages")[1]["messages"]
        assert [m["text"] for m in chat][:1] == ["/start"] and any(m.get("requestContact") for m in chat)
    finally:
        assert second.interrupt() == 0, second.output()[-3000:]

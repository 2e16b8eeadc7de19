"""`otpgate dev`: the dev database and all five services as separate processes, in sandbox mode."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.core.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from services.core.crypto import Keyring
from services.core.devdb import ROOT, DevDatabase
from services.core.health import is_serving

# Start order: leaves first, so callers find their dependencies up.
SERVICES = ("directory", "verification", "delivery", "botgateway", "edge")
CACHE = ROOT / ".cache"
DEV_ENV = CACHE / "dev.env"


def dev_keys(path: Path = DEV_ENV) -> dict[str, str]:
    """Dev encryption keys, generated once and kept in .cache (never committed)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"OTPGATE_KEYS={Keyring.generate_spec('dev1')}\n")
        path.chmod(0o600)
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip()
    return values


@dataclass
class ProcessStack:
    """The five services as child processes, sharing one environment."""

    env: dict[str, str]
    log_dir: Path
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def service_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        for name in SERVICES:
            env[f"OTPGATE_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"OTPGATE_{name.upper()}_ADDR"] = f"127.0.0.1:{self.ports[name]}"
            env[f"OTPGATE_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def start(self) -> None:
        for name in SERVICES:
            self.start_one(name)

    def start_one(self, name: str) -> None:
        """Start one service (again, after it stopped)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen(  # noqa: S603 - our own modules
            [sys.executable, "-m", f"services.{name}"], env=self.service_env(), stdout=log, stderr=log, cwd=ROOT
        )

    def crashed(self) -> list[str]:
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    async def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(SERVICES)
        while pending:
            if dead := self.crashed():
                raise RuntimeError(f"{', '.join(dead)} exited during start-up; see {self.log_dir}/<service>.log")
            for name in list(pending):
                if await is_serving(f"127.0.0.1:{self.ports[name]}") and _metrics_up(self.metrics_ports[name]):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not healthy after {timeout:.0f}s: {', '.join(sorted(pending))}")
            await asyncio.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser("dev", help="run the dev database and all five services (sandbox mode)")
    dev.add_argument("--db-port", type=int, default=27017, help="dev database port (ignored with MONGODB_URI)")
    dev.add_argument("--fresh", action="store_true", help="start with an empty dev database")
    dev.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    database: DevDatabase | None = None
    uri = os.environ.get("MONGODB_URI", "")
    if not uri:
        data = CACHE / "devdb" / "data"
        if args.fresh and data.exists():
            import shutil

            shutil.rmtree(data)
        database = DevDatabase(data_dir=data, port=args.db_port, log_file=CACHE / "logs" / "devdb.log")
        (CACHE / "logs").mkdir(parents=True, exist_ok=True)
        uri = database.start()
    env = {"MONGODB_URI": uri, "OTPGATE_ENV": "dev", "OTPGATE_SANDBOX": "true", **dev_keys()}
    for name in ("OTPGATE_KEYS",):  # an operator's own keys win over the dev ones
        if os.environ.get(name):
            env[name] = os.environ[name]
    stack = ProcessStack(env=env, log_dir=CACHE / "logs")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start()
        asyncio.run(stack.wait_healthy())
        _print_addresses(args.json, uri, stack)
        while not stopping:
            if dead := stack.crashed():
                print(f"otpgate dev: {', '.join(dead)} stopped unexpectedly; see {stack.log_dir}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"otpgate dev: {exc}", file=sys.stderr)
        return 1
    finally:
        print("otpgate dev: stopping…", file=sys.stderr)
        stack.stop()
        if database is not None:
            database.stop()
        with contextlib.suppress(Exception):
            sys.stderr.flush()


def _print_addresses(as_json: bool, uri: str, stack: ProcessStack) -> None:
    rows = {
        name: {
            "grpc": f"127.0.0.1:{stack.ports[name]}",
            "metrics": f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics",
        }
        for name in SERVICES
    }
    env = stack.service_env()
    scheme = "https" if env.get("OTPGATE_EDGE_TLS_CERT") else "http"
    http = f"{scheme}://127.0.0.1:" + env.get("OTPGATE_EDGE_HTTP_PORT", "8080")
    console = f"{http}/console/"
    if as_json:
        print(
            json.dumps({"database": _safe_uri(uri), "edge_http": http, "console": console, "services": rows}),
            flush=True,
        )
        return
    print(f"otpgate is up (sandbox mode). Database: {_safe_uri(uri)}", flush=True)
    print(f"  console        {console}   (sign in with a client's API key)")
    print(f"  edge HTTP      {http}   (OpenAPI: {http}/openapi.json)")
    for name, row in rows.items():
        print(f"  {name:<14} gRPC {row['grpc']:<18} metrics {row['metrics']}")
    print(
        f"Logs: {stack.log_dir}/<service>.log. Create a client: otpgate clients create NAME. Ctrl-C stops everything.",
        flush=True,
    )


def _safe_uri(uri: str) -> str:
    """Hide credentials in a MongoDB URI."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"

"""`otpgate dev`: the dev database, the simulated Telegram and the five services as separate
processes, in sandbox mode.

    otpgate dev [--db-port N] [--fresh]       run the stack until Ctrl-C (or SIGTERM)
    otpgate dev stop|start|restart SERVICE    act on one process of a running stack

Ports come from the same variables the services read (`OTPGATE_<SERVICE>_PORT`,
`OTPGATE_<SERVICE>_METRICS_PORT`, `OTPGATE_EDGE_HTTP_PORT`; the database's from `--db-port` or
`OTPGATE_DEVDB_PORT`), so two stacks run side by side. Each stack keeps its logs and database
files under .cache, by its edge port. A stack is driven through a control socket there: stopping
botgateway and starting it again is how to watch the catch-up work.

It says it is up once the services answer and the shared bots' sessions run (from botgateway's
otpgate_bot_sessions metric), so the first /start is answered.

Ctrl-C reaches every process of the terminal's process group at once: each service stops
gracefully on SIGINT, and the runner says "stopped" and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from services.core.config import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    DEFAULT_SHARED_BOTS,
    SIMULATOR,
    SIMULATOR_GATEWAY_PORT,
    SIMULATOR_METRICS_PORT,
    SIMULATOR_PORT,
)
from services.core.crypto import Keyring
from services.core.devdb import ROOT, DevDatabase
from services.core.health import is_serving

# Start order: leaves first, so callers find their dependencies up (the gateway needs its Telegram).
SERVICES = (SIMULATOR, "directory", "verification", "delivery", "botgateway", "edge")
PORTS = {**DEFAULT_PORTS, SIMULATOR: SIMULATOR_PORT}
METRICS_PORTS = {**DEFAULT_METRICS_PORTS, SIMULATOR: SIMULATOR_METRICS_PORT}
DEFAULT_HTTP_PORT = 8080
DEFAULT_DB_PORT = 27017
CACHE = ROOT / ".cache"
DEV_ENV = CACHE / "dev.env"
T = TypeVar("T")


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


def ports_from(environ: Mapping[str, str]) -> tuple[dict[str, int], dict[str, int], int]:
    """gRPC ports, metrics ports and the edge's HTTP port, from the services' own variables."""

    def port(name: str, default: int) -> int:
        raw = environ.get(name, "")
        if not raw:
            return default
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise ValueError(f"{name}={raw!r} is not a port")
        return int(raw)

    grpc_ports = {name: port(f"OTPGATE_{name.upper()}_PORT", PORTS[name]) for name in SERVICES}
    metrics = {name: port(f"OTPGATE_{name.upper()}_METRICS_PORT", METRICS_PORTS[name]) for name in SERVICES}
    return grpc_ports, metrics, port("OTPGATE_EDGE_HTTP_PORT", DEFAULT_HTTP_PORT)


def stack_dir(edge_port: int) -> Path:
    """Where a stack keeps its logs, database files and control socket (by its edge gRPC port)."""
    return CACHE if edge_port == PORTS["edge"] else CACHE / f"dev-{edge_port}"


@dataclass(frozen=True)
class Replica:
    service: str
    port: int
    metrics_port: int


@dataclass
class ProcessStack:
    """The services as child processes, sharing one environment."""

    env: dict[str, str]
    log_dir: Path
    ports: Mapping[str, int] = field(default_factory=lambda: dict(PORTS))
    metrics_ports: Mapping[str, int] = field(default_factory=lambda: dict(METRICS_PORTS))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Services stopped on purpose (`otpgate dev stop`): not a crash.
    stopped: set[str] = field(default_factory=set)
    # Further processes of a service, each on ports of its own, by process name (`delivery-2`).
    replicas: dict[str, Replica] = field(default_factory=dict)

    def service_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        for name in SERVICES:
            env[f"OTPGATE_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"OTPGATE_{name.upper()}_ADDR"] = self.target(name)
            env[f"OTPGATE_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def target(self, name: str) -> str:
        """The gRPC target callers of a service use: all of its processes (channels balance round robin)."""
        ports = [self.ports[name], *(r.port for r in self.replicas.values() if r.service == name)]
        addresses = ",".join(f"127.0.0.1:{port}" for port in ports)
        return f"ipv4:{addresses}" if len(ports) > 1 else addresses

    def command(self, name: str, env: dict[str, str], process: str) -> list[str]:
        """How one process of service `name` runs (the bench runs them instrumented)."""
        return [sys.executable, "-m", f"services.{name}"]

    def add_replica(self, process: str, service: str, port: int, metrics_port: int) -> None:
        """Run one more process of `service` on its own ports, named `process` (before start())."""
        if process in SERVICES or service not in SERVICES:
            raise ValueError(f"{process!r} cannot be a replica of {service!r}")
        self.replicas[process] = Replica(service, port, metrics_port)

    def start(self) -> None:
        for name in (*SERVICES, *self.replicas):
            self.start_service(name)

    def start_service(self, name: str, extra_env: Mapping[str, str] | None = None) -> None:
        """Start a service (or a replica, by its process name), with `extra_env` over the stack's."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self.service_env()
        service = name
        if (replica := self.replicas.get(name)) is not None:
            service = replica.service
            env[f"OTPGATE_{service.upper()}_PORT"] = str(replica.port)
            env[f"OTPGATE_{service.upper()}_METRICS_PORT"] = str(replica.metrics_port)
        env.update(extra_env or {})
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen(  # noqa: S603 - our own modules
            self.command(service, env, name), env=env, stdout=log, stderr=log, cwd=ROOT
        )
        self.stopped.discard(name)

    def grpc_port(self, process: str) -> int:
        replica = self.replicas.get(process)
        return replica.port if replica is not None else self.ports[process]

    def metrics_port(self, process: str) -> int:
        replica = self.replicas.get(process)
        return replica.metrics_port if replica is not None else self.metrics_ports[process]

    def stop_service(self, name: str, grace: float = 10.0) -> None:
        self.stopped.add(name)
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def crashed(self) -> list[str]:
        return [name for name, proc in self.processes.items() if proc.poll() is not None and name not in self.stopped]

    async def wait_healthy(self, timeout: float = 90.0, names: tuple[str, ...] = ()) -> None:
        """Until every named process (default: all of them, replicas too) serves."""
        deadline = time.monotonic() + timeout
        pending = set(names or (*SERVICES, *self.replicas))
        while pending:
            if dead := [name for name in self.crashed() if name in pending]:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up; see {self.log_dir}/<service>.log")
            for name in list(pending):
                if await is_serving(f"127.0.0.1:{self.grpc_port(name)}") and _metrics_up(self.metrics_port(name)):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not healthy after {timeout:.0f}s: {', '.join(sorted(pending))}")
            await asyncio.sleep(0.2)

    def shared_bots(self) -> list[str]:
        raw = self.env.get("OTPGATE_SHARED_BOTS") or os.environ.get("OTPGATE_SHARED_BOTS", "")
        names = [name.strip().lower() for name in raw.split(",") if name.strip()]
        return names or list(DEFAULT_SHARED_BOTS)

    async def wait_bots(self, timeout: float = 60.0) -> list[str]:
        """Wait until botgateway runs a session for every shared bot (a person's /start is answered
        from then on); the ones still not running when `timeout` passes."""
        deadline = time.monotonic() + timeout
        wanted = set(self.shared_bots())
        while True:
            missing = wanted - running_bots(self.metrics_ports["botgateway"])
            if not missing or time.monotonic() > deadline:
                return sorted(missing)
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


_RUNNING = re.compile(r'^otpgate_bot_sessions\{bot="([^"]+)",state="running"\} 1(\.0)?$', re.MULTILINE)


def running_bots(port: int) -> set[str]:
    """The bots whose session botgateway runs, from its metrics (otpgate_bot_sessions)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as reply:
            text = reply.read().decode(errors="replace")
    except OSError:
        return set()
    return {match.group(1) for match in _RUNNING.finditer(text)}


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser(
        "dev",
        help="run the dev database, the simulated Telegram and the five services (sandbox mode)",
        description=(
            "Run the whole system locally in sandbox mode until Ctrl-C. Ports come from OTPGATE_<SERVICE>_PORT, "
            "OTPGATE_<SERVICE>_METRICS_PORT and OTPGATE_EDGE_HTTP_PORT, so two stacks run side by side. "
            "`otpgate dev stop|start|restart SERVICE` acts on one process of the running stack (found by "
            "OTPGATE_EDGE_PORT)."
        ),
    )
    dev.add_argument(
        "--db-port",
        type=int,
        default=int(os.environ.get("OTPGATE_DEVDB_PORT") or DEFAULT_DB_PORT),
        help="dev database port (default: OTPGATE_DEVDB_PORT or 27017; ignored with MONGODB_URI)",
    )
    dev.add_argument("--fresh", action="store_true", help="start with an empty dev database")
    dev.set_defaults(handler=_run)
    actions = dev.add_subparsers(dest="action", metavar="ACTION")
    for verb, text in (
        ("stop", "stop one service of the running stack (the others keep running)"),
        ("start", "start a service of the running stack again"),
        ("restart", "stop a service of the running stack and start it again"),
    ):
        action = actions.add_parser(verb, help=text)
        action.add_argument("service", choices=SERVICES, help="which process")
        action.set_defaults(handler=_control)


# Running -------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    try:
        ports, metrics, http_port = ports_from(os.environ)
    except ValueError as exc:
        print(f"otpgate dev: {exc}", file=sys.stderr)
        return 2
    home = stack_dir(ports["edge"])
    database: DevDatabase | None = None
    uri = os.environ.get("MONGODB_URI", "")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Ctrl-C sends SIGINT to the whole process group: the services stop on their own, we follow.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    env: dict[str, str] = {}
    stack: ProcessStack | None = None
    control: socket.socket | None = None
    code = 0
    try:
        if not uri:
            data = home / "devdb" / ("data" if args.db_port == DEFAULT_DB_PORT else f"data-{args.db_port}")
            if args.fresh and data.exists():
                shutil.rmtree(data)
            (home / "logs").mkdir(parents=True, exist_ok=True)
            database = DevDatabase(data_dir=data, port=args.db_port, log_file=home / "logs" / "devdb.log")
            uri = database.start()
        env = {
            "MONGODB_URI": uri,
            "OTPGATE_ENV": "dev",
            "OTPGATE_SANDBOX": "true",
            "OTPGATE_EDGE_HTTP_PORT": str(http_port),
            **dev_keys(),
        }
        for name in ("OTPGATE_KEYS",):  # an operator's own keys win over the dev ones
            if os.environ.get(name):
                env[name] = os.environ[name]
        stack = ProcessStack(env=env, log_dir=home / "logs", ports=ports, metrics_ports=metrics)
        stack.start()
        asyncio.run(_unless(stack.wait_healthy(), lambda: stopping))
        missing = asyncio.run(_unless(stack.wait_bots(), lambda: stopping)) or []
        control = _listen(home / "control.sock")
        if not stopping:
            _bots_warning(missing, stack)
            _print_addresses(args.json, uri, stack, http_port)
        code = _supervise(stack, control, lambda: stopping)
    except RuntimeError as exc:
        if not stopping:
            print(f"otpgate dev: {exc}", file=sys.stderr)
            code = 1
    finally:
        if stack is not None:
            print("otpgate dev: stopping…", file=sys.stderr, flush=True)
            stack.stop()
        if database is not None:
            database.stop()
        if control is not None:
            control.close()
            with contextlib.suppress(OSError):
                (home / "control.sock").unlink()
        if code == 0:
            print("otpgate dev: stopped", file=sys.stderr, flush=True)
    return code


async def _unless(work: Coroutine[Any, Any, T], stopping: Callable[[], bool]) -> T | None:
    """`work`, unless Ctrl-C comes first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        if stopping():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        await asyncio.sleep(0.1)
    return task.result()


def _bots_warning(missing: list[str], stack: ProcessStack) -> None:
    if missing:
        print(
            f"otpgate dev: bots not running yet: {', '.join(missing)} (see {stack.log_dir}/botgateway.log); "
            "what people send them waits in the simulated Telegram until they are",
            file=sys.stderr,
        )


def _supervise(stack: ProcessStack, control: socket.socket, stopping: Callable[[], bool]) -> int:
    """Until stopped: answer control commands; a service that exits on its own ends the stack."""
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    while not stopping():
        for _ in selector.select(timeout=0.5):
            _answer(stack, control)
        if stopping():
            break  # Ctrl-C: the services got it too and are stopping; nothing unexpected
        if dead := stack.crashed():
            codes = ", ".join(f"{name} (exit code {stack.processes[name].returncode})" for name in dead)
            print(f"otpgate dev: {codes} stopped unexpectedly; see {stack.log_dir}", file=sys.stderr)
            return 1
    return 0


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(OSError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.setblocking(False)
    return server


def _answer(stack: ProcessStack, control: socket.socket) -> None:
    try:
        connection, _ = control.accept()
    except BlockingIOError:
        return
    with connection:
        connection.settimeout(5.0)
        verb, _, name = connection.recv(256).decode(errors="replace").strip().partition(" ")
        if name not in SERVICES or verb not in ("stop", "start", "restart"):
            connection.sendall(f"error: unknown command {verb} {name}\n".encode())
            return
        if verb in ("stop", "restart"):
            stack.stop_service(name)
            print(f"otpgate dev: {name} stopped (otpgate dev start {name} starts it again)", file=sys.stderr)
        if verb in ("start", "restart"):
            running = stack.processes.get(name)
            if running is None or running.poll() is not None:
                stack.start_service(name)
            try:
                asyncio.run(stack.wait_healthy(timeout=60, names=(name,)))
            except RuntimeError as exc:
                connection.sendall(f"error: {exc}\n".encode())
                return
            if name == "botgateway":
                _bots_warning(asyncio.run(stack.wait_bots(30)), stack)
            print(f"otpgate dev: {name} started", file=sys.stderr)
        connection.sendall(f"ok: {name} {'stopped' if verb == 'stop' else 'running'}\n".encode())


def _control(args: argparse.Namespace) -> int:
    ports, _, _ = ports_from(os.environ)
    path = stack_dir(ports["edge"]) / "control.sock"
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(90.0)
    try:
        client.connect(str(path))
    except OSError:
        raise RuntimeError(
            f"no running stack with its edge on port {ports['edge']} (start one with `make run`)"
        ) from None
    with client:
        client.sendall(f"{args.action} {args.service}\n".encode())
        answer = client.recv(4096).decode().strip()
    if not answer.startswith("ok:"):
        raise RuntimeError(answer.removeprefix("error: "))
    print(answer.removeprefix("ok: "))
    return 0


def _print_addresses(as_json: bool, uri: str, stack: ProcessStack, http_port: int) -> None:
    rows = {
        name: {
            "grpc": f"127.0.0.1:{stack.ports[name]}",
            "metrics": f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics",
        }
        for name in SERVICES
    }
    env = stack.service_env()
    scheme = "https" if env.get("OTPGATE_EDGE_TLS_CERT") else "http"
    http = f"{scheme}://127.0.0.1:{http_port}"
    console = f"{http}/console/"
    gateway = f"http://127.0.0.1:{env.get('OTPGATE_TELEGRAMSIM_GATEWAY_PORT') or SIMULATOR_GATEWAY_PORT}"
    if as_json:
        print(
            json.dumps(
                {
                    "database": _safe_uri(uri),
                    "edge_http": http,
                    "console": console,
                    "telegram_gateway": gateway,
                    "services": rows,
                }
            ),
            flush=True,
        )
        return
    print(f"otpgate is up (sandbox mode). Database: {_safe_uri(uri)}", flush=True)
    print(f"  console        {console}   (sign in with a client's API key)")
    print(f"  edge HTTP      {http}   (OpenAPI: {http}/openapi.json)")
    print(f"  tg gateway     {gateway}   (the local Telegram Gateway API, in the simulated Telegram)")
    for name, row in rows.items():
        print(f"  {name:<14} gRPC {row['grpc']:<18} metrics {row['metrics']}")
    print(
        f"Logs: {stack.log_dir}/<service>.log. Create a client: otpgate clients create NAME. "
        "Stop or start one service: otpgate dev stop|start SERVICE. Ctrl-C stops everything.",
        flush=True,
    )


def _safe_uri(uri: str) -> str:
    """Hide credentials in a MongoDB URI."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"

"""`otpgate status`: gRPC health of every service and a database ping, as a table or JSON.

Reads the same environment as the services: OTPGATE_<SERVICE>_ADDR for the addresses,
OTPGATE_TLS_CERT / OTPGATE_TLS_KEY / OTPGATE_TLS_CA for mTLS, MONGODB_URI for the database.
Exit code 0 when everything asked for is healthy, 1 otherwise (so it serves as a container
healthcheck: `otpgate status --service directory --no-database`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from services.core.config import SIMULATOR, ConfigError, Env, TlsConfig, read_mode, service_addresses
from services.core.grpc_client import channel_credentials
from services.core.health import health_status

# Shown in this order: the public edge first, then the internal services (and in sandbox mode the
# simulated Telegram, which is not part of a production deployment).
SERVICE_ORDER = ("edge", "delivery", "verification", "directory", "botgateway", SIMULATOR)
_STATUS_NAMES = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
}


@dataclass(frozen=True)
class StatusSettings:
    addresses: dict[str, str]
    tls: TlsConfig
    mongodb_uri: str
    sandbox: bool = False


@dataclass
class Check:
    name: str
    target: str
    status: str  # SERVING, NOT_SERVING, UNREACHABLE, ... ; database: OK, UNREACHABLE, SKIPPED
    healthy: bool
    latency_ms: float | None = None
    error: str = ""


def load_settings(environ: Mapping[str, str] | None = None) -> StatusSettings:
    """The subset of the services' configuration that `status` needs (same names, same defaults)."""
    env = Env(environ)
    _, sandbox = read_mode(env)
    addresses = service_addresses(env, sandbox)
    tls = TlsConfig(
        cert_file=env.text("OTPGATE_TLS_CERT", "", "PEM certificate for internal gRPC (enables TLS)"),
        key_file=env.text("OTPGATE_TLS_KEY", "", "PEM private key for OTPGATE_TLS_CERT", secret=True),
        ca_file=env.text("OTPGATE_TLS_CA", "", "PEM CA that signs peers' certificates (enables mTLS)"),
    )
    env.check()
    # Optional here (the services require it): read directly so the declared setting stays "required".
    uri = (os.environ if environ is None else environ).get("MONGODB_URI", "")
    return StatusSettings(addresses=addresses, tls=tls, mongodb_uri=uri, sandbox=sandbox)


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
        return f"{exc.code().name}: {detail}"[:200]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


async def check_service(name: str, address: str, tls: TlsConfig, timeout: float) -> Check:
    """grpc.health.v1 Check of the whole server ("" service) at `address`."""
    started = time.perf_counter()
    try:
        if tls.enabled or tls.ca_file:
            channel = grpc.aio.secure_channel(address, channel_credentials(tls))
        else:
            channel = grpc.aio.insecure_channel(address)
        async with channel:
            code = await health_status(channel, "", timeout)
    except (grpc.aio.AioRpcError, OSError, ValueError) as exc:
        return Check(name, address, "UNREACHABLE", False, None, _short_error(exc))
    latency = round((time.perf_counter() - started) * 1000, 1)
    status = _STATUS_NAMES.get(code, str(code))
    return Check(name, address, status, code == health_pb2.HealthCheckResponse.SERVING, latency)


def _redact_uri(uri: str) -> str:
    """mongodb://user:secret@host/... -> mongodb://user:***@host/... (never print a password)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "***"
    credentials, at, hosts = rest.rpartition("@")
    if not at:
        return uri
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hosts}"


async def check_database(uri: str, timeout: float) -> Check:
    if not uri:
        return Check("database", "", "SKIPPED", True, None, "MONGODB_URI is not set; service health covers it")
    target = _redact_uri(uri)
    started = time.perf_counter()
    client: AsyncMongoClient[dict[str, Any]] | None = None
    try:
        client = AsyncMongoClient(
            uri,
            appname="otpgate-status",
            serverSelectionTimeoutMS=int(timeout * 1000),
            connectTimeoutMS=int(timeout * 1000),
        )
        await client.admin.command("ping")
    except (PyMongoError, ValueError) as exc:
        return Check("database", target, "UNREACHABLE", False, None, _short_error(exc))
    finally:
        if client is not None:
            await client.close()
    return Check("database", target, "OK", True, round((time.perf_counter() - started) * 1000, 1))


async def collect(settings: StatusSettings, services: Sequence[str], *, database: bool, timeout: float) -> list[Check]:
    jobs = [check_service(name, settings.addresses[name], settings.tls, timeout) for name in services]
    if database:
        jobs.append(check_database(settings.mongodb_uri, timeout))
    return list(await asyncio.gather(*jobs))


async def collect_until_healthy(
    settings: StatusSettings, services: Sequence[str], *, database: bool, timeout: float, wait: float
) -> list[Check]:
    """Check once, or with --wait keep checking (every half second) until all are healthy or time is up."""
    deadline = time.monotonic() + wait
    while True:
        checks = await collect(settings, services, database=database, timeout=timeout)
        if all(c.healthy for c in checks) or time.monotonic() >= deadline:
            return checks
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def render_table(checks: Sequence[Check]) -> str:
    rows = [("COMPONENT", "TARGET", "STATUS", "LATENCY", "DETAIL")]
    for c in checks:
        latency = f"{c.latency_ms:.1f} ms" if c.latency_ms is not None else "-"
        rows.append((c.name, c.target or "-", c.status, latency, c.error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    healthy = sum(c.healthy for c in checks)
    lines.append(f"{healthy}/{len(checks)} healthy")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status",
        help="health of every service (gRPC health) and the database",
        description=(
            "Asks every service for its grpc.health.v1 status (a service reports NOT_SERVING while it cannot reach "
            "its database) and pings MongoDB. Addresses, TLS and the database come from the services' environment "
            "variables (OTPGATE_<SERVICE>_ADDR, OTPGATE_TLS_CERT/KEY/CA, MONGODB_URI). Exit code 0: all healthy."
        ),
    )
    status.add_argument(
        "--service",
        action="append",
        choices=SERVICE_ORDER,
        metavar="NAME",
        help=f"check only this service (repeatable; one of {', '.join(SERVICE_ORDER)}; default: all)",
    )
    status.add_argument(
        "--target",
        action="append",
        type=_target,
        default=[],
        metavar="NAME=HOST:PORT",
        help="check NAME at this address instead of $OTPGATE_<NAME>_ADDR (e.g. a container's own replica)",
    )
    status.add_argument("--no-database", action="store_true", help="do not ping MongoDB")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds per check (default 2)")
    status.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="keep checking until all are healthy, up to SECONDS"
    )
    status.set_defaults(handler=_status)


def _target(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or name not in SERVICE_ORDER or ":" not in address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT with NAME one of {', '.join(SERVICE_ORDER)}")
    return name, address


def _status(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise SystemExit(f"otpgate status: {exc}") from None
    settings.addresses.update(dict(args.target))
    services = [
        name for name in SERVICE_ORDER if (name in args.service if args.service else name in settings.addresses)
    ]
    database = not args.no_database
    checks = asyncio.run(
        collect_until_healthy(settings, services, database=database, timeout=args.timeout, wait=args.wait)
    )
    ok = all(c.healthy for c in checks)
    if args.json:
        print(json.dumps({"healthy": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render_table(checks))
    return 0 if ok else 1

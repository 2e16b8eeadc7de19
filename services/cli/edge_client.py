"""The operator CLI's way to the edge's AdminService: where the edge is, the admin key, TLS, one
synchronous client, errors as one line, secrets read from files or the environment, and output
as a table or JSON. Used by `otpgate policies`, `usage`, `bots` and `fraud`.

Every call goes over gRPC to the edge (OTPGATE_EDGE_ADDR, default: this host on
OTPGATE_EDGE_PORT) with an API key that has the admin scope (OTPGATE_ADMIN_KEY, or --admin-key;
the variable is preferred: a command-line argument is visible to other users of the machine).
TLS: with OTPGATE_TLS_CA (or --ca-file) the CLI verifies the edge against that CA and presents
OTPGATE_TLS_CERT/KEY when set; --tls uses the system's roots; otherwise plaintext (the dev setup).
Secrets (bot tokens, webhook secrets, Gateway tokens) are read from a file, standard input or an
environment variable, never from arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from otpgate.edge.v1 import edge_pb2_grpc

from services.core.config import local_address
from services.core.errors import parse_rpc_error

DEFAULT_EDGE_ADDR = "127.0.0.1:50051"


# Variables only the operator CLI reads: (name, default, help). Listed in docs/configuration.md.
CLI_ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("OTPGATE_ADMIN_KEY", "", "API key with the admin scope for `otpgate policies` and `otpgate bots` (secret)"),
    (
        "OTPGATE_EDGE_ADDR",
        DEFAULT_EDGE_ADDR,
        "edge gRPC address the admin commands call (default port: OTPGATE_EDGE_PORT)",
    ),
    ("OTPGATE_BOT_TOKEN", "", "bot token read by `otpgate bots register` by default (secret; unset it afterwards)"),
)


R = TypeVar("R", bound=Message)


class CliError(Exception):
    """A failure to show the operator as one line (exit code 1)."""


@dataclass(frozen=True)
class EdgeTarget:
    address: str
    admin_key: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls: bool = False
    timeout: float = 10.0


def edge_target(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EdgeTarget:
    env = os.environ if environ is None else environ
    key = getattr(args, "admin_key", None) or env.get("OTPGATE_ADMIN_KEY", "")
    if not key:
        raise CliError("an admin API key is required: set OTPGATE_ADMIN_KEY (or pass --admin-key)")
    return EdgeTarget(
        address=getattr(args, "edge_addr", None) or env.get("OTPGATE_EDGE_ADDR", "") or local_address("edge", env),
        admin_key=key,
        ca_file=getattr(args, "ca_file", None) or env.get("OTPGATE_TLS_CA", ""),
        cert_file=env.get("OTPGATE_TLS_CERT", ""),
        key_file=env.get("OTPGATE_TLS_KEY", ""),
        tls=bool(getattr(args, "tls", False)),
        timeout=float(getattr(args, "timeout", 10.0)),
    )


def open_channel(target: EdgeTarget) -> grpc.Channel:
    if target.ca_file or target.tls:
        root = Path(target.ca_file).read_bytes() if target.ca_file else None
        cert = Path(target.cert_file).read_bytes() if target.cert_file and target.key_file else None
        key = Path(target.key_file).read_bytes() if target.cert_file and target.key_file else None
        return grpc.secure_channel(
            target.address,
            grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert),
        )
    return grpc.insecure_channel(target.address)


class AdminClient:
    """A thin synchronous client of otpgate.edge.v1.AdminService."""

    def __init__(self, target: EdgeTarget) -> None:
        self._target = target
        self._channel = open_channel(target)
        self.stub = edge_pb2_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def call(self, method: Callable[..., R], request: Message) -> R:
        try:
            return method(
                request,
                timeout=self._target.timeout,
                metadata=(("authorization", f"Bearer {self._target.admin_key}"),),
            )
        except grpc.RpcError as err:
            raise CliError(describe_rpc_error(err)) from None


def describe_rpc_error(err: grpc.RpcError) -> str:
    failure = parse_rpc_error(err)
    head = failure.code.name + (f" {failure.reason}" if failure.reason else "")
    text = f"{head}: {failure.message}" if failure.message else head
    if failure.field_violations:
        text += " (" + "; ".join(f"{f}: {d}" for f, d in failure.field_violations) + ")"
    if failure.retry_after:
        text += f" (retry after {failure.retry_after:g} s)"
    return text


def read_secret(source: str, what: str) -> str:
    """A secret from `-` (standard input), `env:NAME` or a file path; surrounding whitespace dropped."""
    if source == "-":
        value = sys.stdin.readline()
    elif source.startswith("env:"):
        value = os.environ.get(source[4:], "")
        if not value:
            raise CliError(f"{what}: environment variable {source[4:]} is empty")
    else:
        try:
            value = Path(source).read_text()
        except OSError as exc:
            raise CliError(f"{what}: cannot read {source}: {exc.strerror}") from None
    value = value.strip()
    if not value:
        raise CliError(f"{what} is empty")
    return value


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in all_rows)


def emit(args: argparse.Namespace, data: Mapping[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--edge-addr", help=f"edge gRPC address (default: $OTPGATE_EDGE_ADDR or {DEFAULT_EDGE_ADDR})")
    group.add_argument(
        "--admin-key", help="API key with the admin scope (default: $OTPGATE_ADMIN_KEY; prefer the variable)"
    )
    group.add_argument("--ca-file", help="PEM CA to verify the edge with (default: $OTPGATE_TLS_CA); enables TLS")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds (default 10)")

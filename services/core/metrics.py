"""Prometheus metrics with go-grpc-prometheus names, served on a separate port."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LABELS = ("grpc_type", "grpc_service", "grpc_method")

server_started = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
server_handled = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, regardless of success.", (*_LABELS, "grpc_code")
)
server_msg_received = Counter("grpc_server_msg_received_total", "RPC messages received on the server.", _LABELS)
server_msg_sent = Counter("grpc_server_msg_sent_total", "RPC messages sent by the server.", _LABELS)
server_handling = Histogram(
    "grpc_server_handling_seconds", "Response latency of RPCs handled by the server.", _LABELS, buckets=LATENCY_BUCKETS
)

client_started = Counter("grpc_client_started_total", "RPCs started on the client.", _LABELS)
client_handled = Counter(
    "grpc_client_handled_total", "RPCs completed by the client, regardless of success.", (*_LABELS, "grpc_code")
)
client_msg_received = Counter("grpc_client_msg_received_total", "RPC messages received by the client.", _LABELS)
client_msg_sent = Counter("grpc_client_msg_sent_total", "RPC messages sent by the client.", _LABELS)
client_handling = Histogram(
    "grpc_client_handling_seconds",
    "Latency of RPCs until the client got the response.",
    _LABELS,
    buckets=LATENCY_BUCKETS,
)

database_unavailable_total = Counter(
    "otpgate_database_unavailable_total",
    "Database operations that failed because the database was unreachable or did not answer in time.",
)


def code_label(code: grpc.StatusCode) -> str:
    """go-grpc-prometheus spells codes as Go does: OK, InvalidArgument, DeadlineExceeded..."""
    return "OK" if code is grpc.StatusCode.OK else "".join(part.capitalize() for part in code.name.split("_"))


def split_method(full_method: str) -> tuple[str, str]:
    """'/otpgate.directory.v1.DirectoryService/ResolvePhone' -> (service, method)."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics; returns the bound port (0 picks a free one, None disables)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)

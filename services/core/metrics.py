"""Prometheus metrics with go-grpc-prometheus names, served on a separate port."""

from __future__ import annotations

from typing import Any

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

# (started, messages received, messages sent, handling seconds, handled) of each side
_SERVER_SIDE = (server_started, server_msg_received, server_msg_sent, server_handling, server_handled)
_CLIENT_SIDE = (client_started, client_msg_received, client_msg_sent, client_handling, client_handled)

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


class MethodMetrics:
    """One unary method's series on the server or the client side, looked up once (a status code's
    handled counter the first time it is seen), so a call only increments and observes."""

    def __init__(self, method: str, *, server: bool) -> None:
        service, self.name = split_method(method)
        labels = ("unary", service, self.name)
        started, received, sent, handling, handled = _SERVER_SIDE if server else _CLIENT_SIDE
        self.started = started.labels(*labels)
        self.received = received.labels(*labels)
        self.sent = sent.labels(*labels)
        self.handling = handling.labels(*labels)
        self._labels = labels
        self._handled_family = handled
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = self._handled_family.labels(*self._labels, code_label(code))
        return counter


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics; returns the bound port (0 picks a free one, None disables)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)

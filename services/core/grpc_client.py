"""Channels to internal services: deadlines (the served request's, carried on: deadline.py),
retries, keepalive, request-id propagation, metrics, TLS."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.core import metrics
from services.core.config import TlsConfig
from services.core.deadline import call_timeout
from services.core.logging import request_id_var

# Methods that may be retried on UNAVAILABLE: reads, and writes made idempotent by their keys.
_IDEMPOTENT_PREFIXES = ("Get", "List", "Resolve", "Check")
_NOT_IDEMPOTENT = frozenset({"CheckVerification"})


def idempotent_methods(service: ServiceDescriptor, extra: Iterable[str] = ()) -> list[str]:
    names = set(extra)
    for method in service.methods:
        if method.name.startswith(_IDEMPOTENT_PREFIXES) and method.name not in _NOT_IDEMPOTENT:
            names.add(method.name)
    return sorted(names)


def service_config(services: Iterable[ServiceDescriptor], timeout: float, extra_idempotent: Iterable[str] = ()) -> str:
    retried: list[dict[str, str]] = []
    other: list[dict[str, str]] = []
    extra = set(extra_idempotent)
    for service in services:
        safe = set(idempotent_methods(service, extra & {m.name for m in service.methods}))
        for method in service.methods:
            (retried if method.name in safe else other).append({"service": service.full_name, "method": method.name})
    # A target naming several processes (a DNS name of replicas, an ipv4: list) gets calls spread over all.
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": []}
    if retried:
        config["methodConfig"].append(
            {
                "name": retried,
                "timeout": f"{timeout}s",
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    if other:
        config["methodConfig"].append({"name": other, "timeout": f"{timeout}s"})
    return json.dumps(config)


class _ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, default_timeout: float) -> None:
        self._timeout = default_timeout

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, name = metrics.split_method(method)
        labels = ("unary", service, name)
        md = list(details.metadata or [])
        rid = request_id_var.get()
        if rid and not any(k == "x-request-id" for k, _ in md):
            md.append(("x-request-id", rid))
        new_details = grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=call_timeout(details.timeout if details.timeout is not None else self._timeout),
            metadata=grpc.aio.Metadata(*md),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
        metrics.client_started.labels(*labels).inc()
        metrics.client_msg_sent.labels(*labels).inc()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            call = await continuation(new_details, request)
            response = await call
            code = grpc.StatusCode.OK
            metrics.client_msg_received.labels(*labels).inc()
            return response
        except grpc.aio.AioRpcError as error:
            code = error.code()
            raise
        finally:
            metrics.client_handled.labels(*labels, metrics.code_label(code)).inc()
            metrics.client_handling.labels(*labels).observe(time.perf_counter() - started)


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    root = Path(tls.ca_file).read_bytes() if tls.ca_file else None
    cert = Path(tls.cert_file).read_bytes() if tls.cert_file else None
    key = Path(tls.key_file).read_bytes() if tls.key_file else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def make_channel(
    target: str,
    services: Iterable[ServiceDescriptor],
    *,
    timeout: float = 5.0,
    tls: TlsConfig | None = None,
    tls_server_name: str = "",
    extra_idempotent: Iterable[str] = (),
) -> grpc.aio.Channel:
    """A long-lived channel: create once per process and share it."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(services, timeout, extra_idempotent)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    interceptors = [_ClientInterceptor(timeout)]
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

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
            if method.server_streaming or method.client_streaming:
                continue  # a stream lives as long as its caller keeps it: no default deadline
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


class _CountedUnaryUnary(grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    """One method of a channel: its calls carry the request id and the served request's deadline, and
    are counted. Built once per method (when a stub is made), so a call only reads two context
    variables; a grpc.aio interceptor would run a task and rebuild the call's details for every call."""

    def __init__(self, inner: grpc.aio.UnaryUnaryMultiCallable[Any, Any], method: str, default_timeout: float) -> None:
        self._inner = inner
        self._timeout = default_timeout
        self._metrics = metrics.MethodMetrics(method, server=False)

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:  # an awaitable of the response, as a call is
        return self._call(request, timeout, metadata, credentials, wait_for_ready, compression)

    async def _call(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        md = tuple(metadata or ())
        rid = request_id_var.get()
        if rid and not any(key == "x-request-id" for key, _ in md):
            md = (*md, ("x-request-id", rid))
        self._metrics.started.inc()
        self._metrics.sent.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await self._inner(
                request,
                timeout=call_timeout(self._timeout if timeout is None else timeout),
                metadata=md,
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
            code = grpc.StatusCode.OK
            self._metrics.received.inc()
            return response
        except grpc.aio.AioRpcError as error:
            code = error.code()
            raise
        finally:
            self._metrics.handled(code).inc()
            self._metrics.handling.observe(time.perf_counter() - started)


class _Channel(grpc.aio.Channel):
    """A channel whose unary methods are counted and carry request ids and deadlines (_CountedUnaryUnary);
    streams pass through as they are."""

    def __init__(self, inner: grpc.aio.Channel, default_timeout: float) -> None:
        self._inner = inner
        self._timeout = default_timeout

    def unary_unary(  # the generated stubs pass _registered_method, as to grpc's own channel
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        inner = self._inner.unary_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _CountedUnaryUnary(inner, method, self._timeout)

    def unary_stream(self, *args: Any, **kwargs: Any) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return self._inner.unary_stream(*args, **kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return self._inner.stream_unary(*args, **kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return self._inner.stream_stream(*args, **kwargs)

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()

    async def __aenter__(self) -> _Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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
    if tls is not None and tls.enabled:
        return _Channel(grpc.aio.secure_channel(target, channel_credentials(tls), options=options), timeout)
    return _Channel(grpc.aio.insecure_channel(target, options=options), timeout)

"""gRPC server bootstrap shared by every service.

    app = ServiceApp(name="directory", database=db, servicers=[...])
    await run_service(app, config)            # python -m services.directory

Gives every service: request ids from `x-request-id` metadata bound to its logs,
go-grpc-prometheus metrics, ServiceError -> rich status, a database outage -> UNAVAILABLE
within the request's deadline (services/core/outage.py), an undecodable request ->
INVALID_ARGUMENT, health (NOT_SERVING while MongoDB is unreachable), reflection in dev,
graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pymongo.asynchronous.database import AsyncDatabase

from services.core import deadline, metrics
from services.core.config import CommonConfig, TlsConfig
from services.core.errors import ServiceError, invalid_argument
from services.core.logging import get_logger, request_id_var
from services.core.mongo import Document, ping
from services.core.outage import OutageLog, database_deadline

log = get_logger(__name__)
Register = Callable[[grpc.aio.Server], None]


@dataclass
class ServiceApp:
    """What a service contributes; the bootstrap does the rest."""

    name: str
    # (add_XxxServicer_to_server, servicer, full service name); the add function is given a _Registrar
    servicers: Sequence[tuple[Callable[[Any, Any], None], Any, str]]
    database: AsyncDatabase[Document] | None = None
    # Long-running loops (dispatchers, purgers); cancelled on stop.
    background: Sequence[Callable[[], Awaitable[None]]] = ()
    # Called once on stop, after the server drained.
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    health_interval: float = 2.0
    # Database outages of this service: logged once each, answered UNAVAILABLE.
    outages: OutageLog = field(default_factory=OutageLog)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class _Undecodable:
    """What a request body that is not a valid message of its type deserialises to."""

    type_name: str


def _tolerant(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any] | None:
    """The method's deserializer, answering _Undecodable instead of raising (gRPC would answer
    UNKNOWN and log a traceback for a body that does not parse)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable(type_name)

    return deserialize


def _request_type_name(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    owner = getattr(handler.request_deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the method's request message"))


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:64]
    return _new_request_id()


def _serving(
    method: str, handler: grpc.RpcMethodHandler[Any, Any], request_timeout: float, outages: OutageLog
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary method's handler with what every request gets: its request id bound to the logs, its
    deadline carried on, its database operations bounded by it, its metrics, and its errors answered as
    statuses. Built once per method at registration, so a request pays only for its own work."""
    if handler.unary_unary is None:
        return handler
    counted = metrics.MethodMetrics(method, server=True)
    name = counted.name
    inner = handler.unary_unary

    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = request_id_var.set(_request_id(context))
        remaining = context.time_remaining()
        answer_by = deadline.serve_until(remaining)
        counted.started.inc()
        counted.received.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, _Undecodable):
                raise invalid_argument(
                    [("", f"the request body is not a valid {request.type_name}")], "MALFORMED_REQUEST"
                )
            with database_deadline(remaining, request_timeout):
                response = await inner(request, context)  # type: ignore[arg-type]  # aio handlers take aio contexts
            counted.sent.inc()
            return response
        except ServiceError as err:
            code = err.code
            log.info("rpc_refused", method=name, status=err.code.name, reason=err.reason)
            await context.abort_with_status(err.to_grpc_status())
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if context.code() not in (None, grpc.StatusCode.OK):  # aborted by the servicer itself
                code = context.code()
                raise
            if (outage := outages.answer(exc)) is not None:
                code = outage.code
                await context.abort_with_status(outage.to_grpc_status())
            code = grpc.StatusCode.INTERNAL
            log.exception("rpc_failed", method=name, error=type(exc).__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            counted.handled(code).inc()
            counted.handling.observe(time.perf_counter() - started)
            deadline.reset(answer_by)
            request_id_var.reset(token)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=_tolerant(handler.request_deserializer, _request_type_name(handler)),
        response_serializer=handler.response_serializer,
    )


class _Registrar:
    """The server as a generated add_XxxServicer_to_server sees it: every method handler it registers
    reaches the real server wrapped by _serving, once per method. (A grpc.aio server interceptor would
    run a coroutine and build the wrapper again for every request.)"""

    def __init__(self, server: grpc.aio.Server, request_timeout: float, outages: OutageLog) -> None:
        self._server = server
        self._request_timeout = request_timeout
        self._outages = outages
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = _serving(method, handler, self._request_timeout, self._outages)
        return wrapped

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_WrappedGeneric(handler, self) for handler in generic_rpc_handlers])

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {name: self.wrap(f"/{service_name}/{name}", handler) for name, handler in method_handlers.items()},
        )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped (the server asks it for every request whose
    method was not registered by name)."""

    def __init__(self, inner: grpc.GenericRpcHandler, registrar: _Registrar) -> None:
        self._inner = inner
        self._registrar = registrar

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._registrar.wrap(handler_call_details.method, handler)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    pair = [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())]
    if tls.ca_file:
        return grpc.ssl_server_credentials(
            pair, root_certificates=Path(tls.ca_file).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


class RunningService:
    """A started server; tests start services in-process on port 0 with this."""

    def __init__(self, app: ServiceApp, server: grpc.aio.Server, health: health_aio.HealthServicer, port: int) -> None:
        self.app = app
        self.server = server
        self.health = health
        self.port = port
        self._health_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _set_all(self, status: int) -> None:
        for name in ["", *(full for _, _, full in self.app.servicers)]:
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        serving: bool | None = None
        while True:
            healthy = self.app.database is None or await ping(self.app.database)
            if healthy:
                self.app.outages.reachable()
            if healthy != serving:
                serving = healthy
                state = (
                    health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self._set_all(state)
                log.info("health_changed", serving=healthy)
            await asyncio.sleep(self.app.health_interval)

    def start_background(self) -> None:
        self._health_task = asyncio.create_task(self._watch_database())
        for loop in self.app.background:
            self.app.tasks.append(asyncio.create_task(_supervised(loop, self.app.outages)))

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        tasks = [*self.app.tasks, *([self._health_task] if self._health_task else [])]
        for task in tasks:
            task.cancel()
        await self.server.stop(grace)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for hook in self.app.on_stop:
            with contextlib.suppress(Exception):
                await hook()


async def _supervised(loop: Callable[[], Awaitable[None]], outages: OutageLog) -> None:
    """Keep a background loop alive across unexpected errors."""
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if outages.answer(exc) is None:  # an outage is logged once, not once a second
                log.exception("background_loop_failed", loop=getattr(loop, "__qualname__", str(loop)))
            await asyncio.sleep(1.0)


async def start_service(
    app: ServiceApp,
    host: str,
    port: int,
    *,
    tls: TlsConfig | None = None,
    reflection_on: bool = False,
    request_timeout: float = 5.0,
) -> RunningService:
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_receive_message_length", 1 << 20),
            # gRPC shares a port with another server by default (SO_REUSEPORT): calls would then reach
            # whichever answers ("Method not found"). A port in use must fail the start instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    registrar = _Registrar(server, request_timeout, app.outages)
    for add, servicer, _ in app.servicers:
        add(servicer, registrar)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [full for _, _, full in app.servicers]
    if reflection_on:
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, server_credentials(tls))
        if tls and tls.enabled
        else server.add_insecure_port(address)
    )
    await server.start()
    running = RunningService(app, server, health, bound)
    # Without a database a service is ready at once; with one, it is ready after the first ping.
    initial = (
        health_pb2.HealthCheckResponse.SERVING if app.database is None else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await running._set_all(initial)
    running.start_background()
    log.info("service_started", address=f"{host}:{bound}", tls=bool(tls and tls.enabled), reflection=reflection_on)
    return running


async def run_service(app: ServiceApp, config: CommonConfig, grace: float = 5.0) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""
    from services.core.metrics import start_metrics_server

    if config.metrics_port:
        start_metrics_server(config.metrics_port, config.metrics_host)
    running = await start_service(
        app, config.host, config.port, tls=config.tls, reflection_on=config.dev, request_timeout=config.rpc_timeout
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("service_stopping", grace_seconds=grace)
    await running.stop(grace)
    log.info("service_stopped")

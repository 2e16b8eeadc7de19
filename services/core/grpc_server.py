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
    # (add_XxxServicer_to_server, servicer, full service name)
    servicers: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]]
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


class _ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, request_timeout: float, outages: OutageLog) -> None:
        # The longest a request's database operations may take (the deadline shortens it).
        self._request_timeout = request_timeout
        self._outages = outages

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or details.method.startswith("/grpc."):
            return handler
        service, method = metrics.split_method(details.method)
        labels = ("unary", service, method)
        incoming = dict(details.invocation_metadata or ())
        inner = handler.unary_unary
        request_timeout, outages = self._request_timeout, self._outages

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            rid = str(incoming.get("x-request-id") or _new_request_id())[:64]
            token = request_id_var.set(rid)
            answer_by = deadline.serve_until(context.time_remaining())
            metrics.server_started.labels(*labels).inc()
            metrics.server_msg_received.labels(*labels).inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, _Undecodable):
                    raise invalid_argument(
                        [("", f"the request body is not a valid {request.type_name}")], "MALFORMED_REQUEST"
                    )
                with database_deadline(context.time_remaining(), request_timeout):
                    response = await inner(request, context)  # type: ignore[arg-type]  # aio handlers take aio contexts
                metrics.server_msg_sent.labels(*labels).inc()
                return response
            except ServiceError as err:
                code = err.code
                log.info("rpc_refused", method=method, status=err.code.name, reason=err.reason)
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
                log.exception("rpc_failed", method=method, error=type(exc).__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                metrics.server_handled.labels(*labels, metrics.code_label(code)).inc()
                metrics.server_handling.labels(*labels).observe(time.perf_counter() - started)
                deadline.reset(answer_by)
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer, _request_type_name(handler)),
            response_serializer=handler.response_serializer,
        )


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
        interceptors=[_ServerInterceptor(request_timeout, app.outages)],
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_receive_message_length", 1 << 20),
            # gRPC shares a port with another server by default (SO_REUSEPORT): calls would then reach
            # whichever answers ("Method not found"). A port in use must fail the start instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    for add, servicer, _ in app.servicers:
        add(servicer, server)
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

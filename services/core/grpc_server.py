"""gRPC server bootstrap shared by every service.

    app = ServiceApp(name="directory", database=db, servicers=[...])
    await run_service(app, config)            # python -m services.directory

Gives every service: request ids from `x-request-id` metadata bound to its logs,
go-grpc-prometheus metrics, ServiceError -> rich status, health (NOT_SERVING while
MongoDB is unreachable), reflection in dev, graceful stop on SIGTERM/SIGINT.
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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pymongo.asynchronous.database import AsyncDatabase

from services.core import metrics
from services.core.config import CommonConfig, TlsConfig
from services.core.errors import ServiceError
from services.core.logging import get_logger, request_id_var
from services.core.mongo import Document, ping

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
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class _ServerInterceptor(grpc.aio.ServerInterceptor):
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

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            rid = str(incoming.get("x-request-id") or _new_request_id())[:64]
            token = request_id_var.set(rid)
            metrics.server_started.labels(*labels).inc()
            metrics.server_msg_received.labels(*labels).inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
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
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_failed", method=method, error=type(exc).__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                metrics.server_handled.labels(*labels, metrics.code_label(code)).inc()
                metrics.server_handling.labels(*labels).observe(time.perf_counter() - started)
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
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
            self.app.tasks.append(asyncio.create_task(_supervised(loop)))

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


async def _supervised(loop: Callable[[], Awaitable[None]]) -> None:
    """Keep a background loop alive across unexpected errors."""
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background_loop_failed", loop=getattr(loop, "__qualname__", str(loop)))
            await asyncio.sleep(1.0)


async def start_service(
    app: ServiceApp, host: str, port: int, *, tls: TlsConfig | None = None, reflection_on: bool = False
) -> RunningService:
    server = grpc.aio.server(
        interceptors=[_ServerInterceptor()],
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_receive_message_length", 1 << 20),
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
    running = await start_service(app, config.host, config.port, tls=config.tls, reflection_on=config.dev)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("service_stopping", grace_seconds=grace)
    await running.stop(grace)
    log.info("service_stopped")

"""The HTTP/JSON gateway (aiohttp), in the edge process beside the gRPC server.

Routes come from the `google.api.http` annotations of PublicService and AdminService (and, in
sandbox mode, of the sandbox services); each request is turned into the same request message the
gRPC API takes and handled by the same PublicApi / AdminApi, so both transports answer alike.
Errors are google.rpc.Status JSON with the HTTP status mapped from the gRPC code. The web
console's files are served at /console (services/edge/console.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from services.core.config import TELEGRAM_GATEWAY_REPORT_PATH
from services.core.errors import ServiceError, Violations, http_status_for, invalid_argument, not_found
from services.core.health import SERVING, health_status
from services.core.logging import get_logger, request_id_var
from services.core.outage import OutageLog, database_deadline
from services.edge import metrics
from services.edge.admin import AdminApi
from services.edge.api import ADMIN_SCOPES, PUBLIC_SCOPES, PublicApi
from services.edge.console import DEFAULT_DIR as DEFAULT_CONSOLE_DIR
from services.edge.console import ConsoleFiles
from services.edge.downstream import Caller, forward
from services.edge.jsonproto import parse_message, put_path_values, query_to_json, to_json
from services.edge.openapi import PUBLIC_SERVICES, SANDBOX_SERVICES, without_sandbox
from services.edge.origin import OriginResolver
from services.edge.routes import HttpRule, rules_for

log = get_logger(__name__)
JSON = "application/json"


@dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    max_body_bytes: int
    timeout: float
    sandbox: bool
    tls_cert: str = ""
    tls_key: str = ""
    console_dir: Path = DEFAULT_CONSOLE_DIR
    # A sandbox person's action waits for the bot's answer (the simulated Telegram waits up to
    # OTPGATE_SANDBOX_REPLY_WAIT, 10 s by default): its deadline leaves room for that.
    sandbox_timeout: float = 15.0


def ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def status_body(error: ServiceError) -> dict[str, Any]:
    status = error.to_status_proto()
    return {
        "code": status.code,
        "message": status.message,
        "details": [json_format.MessageToDict(detail) for detail in status.details],
    }


def error_response(error: ServiceError, http_status: int | None = None) -> web.Response:
    status = http_status or http_status_for(error.code)
    headers: dict[str, str] = {}
    has_retry = any(isinstance(d, error_details_pb2.RetryInfo) for d in error.details)
    if status == 429 or has_retry:
        headers["Retry-After"] = str(_retry_after(error))
    return web.json_response(status_body(error), status=status, headers=headers)


def _retry_after(error: ServiceError) -> int:
    for detail in error.details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            seconds: float = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
            return max(1, math.ceil(seconds))
    return 1


class Downstream:
    """A sandbox route's target: a stub method on another service."""

    def __init__(self, stubs: Mapping[str, Any]) -> None:
        self._stubs = stubs

    def method(self, rule: HttpRule) -> Callable[..., Awaitable[Message]]:
        stub = self._stubs[rule.service.full_name]
        return getattr(stub, rule.method.name)  # type: ignore[no-any-return]


class HttpGateway:
    def __init__(
        self,
        api: PublicApi,
        admin: AdminApi,
        origins: OriginResolver,
        settings: HttpSettings,
        document: dict[str, Any],
        sandbox_stubs: Mapping[str, Any],
        health_channels: Mapping[str, grpc.aio.Channel],
        database_ping: Callable[[], Awaitable[bool]],
        outages: OutageLog,
    ) -> None:
        self._api = api
        self._admin = admin
        self._origins = origins
        self._settings = settings
        self._public = [rule for service in PUBLIC_SERVICES for rule in rules_for(service)]
        self._sandbox = (
            [rule for service in SANDBOX_SERVICES for rule in rules_for(service)] if settings.sandbox else []
        )
        self._document = json.dumps(document if settings.sandbox else without_sandbox(document)).encode()
        self._downstream = Downstream(sandbox_stubs)
        self._health_channels = dict(health_channels)
        self._database_ping = database_ping
        self._outages = outages
        self._console = ConsoleFiles(settings.console_dir)
        self._health_cache: tuple[float, int, dict[str, Any]] | None = None
        self._runner: web.AppRunner | None = None

    # Serving -----------------------------------------------------------------

    def application(self) -> web.Application:
        # Bodies are read by dispatch with its own limit (and a Status answer); this is a backstop.
        app = web.Application(client_max_size=self._settings.max_body_bytes + 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        self._runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._settings.host,
            self._settings.port,
            ssl_context=ssl_context(self._settings.tls_cert, self._settings.tls_key),
            backlog=1024,
        )
        await site.start()
        bound = self._runner.addresses
        port = int(bound[0][1]) if bound else self._settings.port
        log.info("http_started", address=f"{self._settings.host}:{port}", tls=bool(self._settings.tls_cert))
        return port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Dispatch ----------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Every answer carries X-Request-Id (the caller's, or a new one), which also travels downstream."""
        given = request.headers.get("X-Request-Id", "")
        rid = given[:64] if given.isprintable() and given.strip() else uuid.uuid4().hex[:16]
        token = request_id_var.set(rid)
        try:
            response = await self._dispatch(request)
        finally:
            request_id_var.reset(token)
        response.headers["X-Request-Id"] = rid
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = "unmatched"
        code = "OK"
        try:
            path = request.raw_path.split("?", 1)[0]
            if request.method == "GET" and path == "/healthz":
                route = "GET /healthz"
                return await self._healthz()
            if request.method == "GET" and path == "/openapi.json":
                route = "GET /openapi.json"
                return web.Response(body=self._document, content_type=JSON)
            if request.method == "POST" and path == TELEGRAM_GATEWAY_REPORT_PATH:
                route = f"POST {TELEGRAM_GATEWAY_REPORT_PATH}"
                return await self._gateway_report(request)
            page = self._console.respond(request.method, path)
            if page is not None:
                route = "GET /console"
                return page
            rule, values, allowed = self._match(request.method, path)
            if rule is None:
                if allowed:
                    code = "UNIMPLEMENTED"
                    error = ServiceError(grpc.StatusCode.UNIMPLEMENTED, "METHOD_NOT_ALLOWED", "method not allowed")
                    response = error_response(error, 405)
                    response.headers["Allow"] = ", ".join(sorted(allowed))
                    return response
                code = "NOT_FOUND"
                return error_response(not_found("route", "ROUTE_NOT_FOUND"))
            route = f"{rule.verb} {rule.template}"
            with database_deadline(None, self._settings.timeout):
                reply = await self._handle(request, rule, values)
            return web.json_response(to_json(reply))
        except ServiceError as error:
            code = error.code.name
            return error_response(error, error.http_status if isinstance(error, HttpStatusError) else None)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            if (outage := self._outages.answer(exc)) is not None:
                code = outage.code.name
                return error_response(outage)
            code = "INTERNAL"
            log.exception("http_failed", route=route, error=type(exc).__name__)
            return error_response(ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error"))
        finally:
            metrics.requests_total.labels(route, code).inc()
            log.debug("http_request", route=route, status=code, ms=round((time.perf_counter() - started) * 1000, 2))

    async def _gateway_report(self, request: web.Request) -> web.Response:
        """Telegram's Gateway wants 200 for a report it may forget; anything else is retried."""
        body = await request.content.read(self._settings.max_body_bytes + 1)
        if len(body) > self._settings.max_body_bytes:
            raise HttpStatusError(413, grpc.StatusCode.INVALID_ARGUMENT, "BODY_TOO_LARGE", "the body is too large")
        with database_deadline(None, self._settings.timeout):
            await self._api.gateway_report(
                body,
                request.headers.get("X-Request-Timestamp", ""),
                request.headers.get("X-Request-Signature", ""),
                self._settings.timeout,
            )
        return web.json_response({"ok": True})

    async def _healthz(self) -> web.Response:
        """Cheap: cached for 2 s; the edge database and each downstream's gRPC health, 1 s each."""
        now = time.monotonic()
        if self._health_cache is None or now - self._health_cache[0] >= 2.0:
            names = list(self._health_channels)
            results = await asyncio.gather(
                self._database_ping(), *(self._downstream_serving(self._health_channels[n]) for n in names)
            )
            checks = {"database": results[0], **dict(zip(names, results[1:], strict=True))}
            healthy = all(checks.values())
            body = {
                "status": "SERVING" if healthy else "NOT_SERVING",
                "checks": {name: "SERVING" if ok else "NOT_SERVING" for name, ok in checks.items()},
            }
            self._health_cache = (now, 200 if healthy else 503, body)
        _, status, body = self._health_cache
        return web.json_response(body, status=status)

    @staticmethod
    async def _downstream_serving(channel: grpc.aio.Channel) -> bool:
        try:
            return await health_status(channel, "", timeout=1.0) == SERVING
        except grpc.aio.AioRpcError:
            return False

    def _match(self, method: str, path: str) -> tuple[HttpRule | None, dict[str, str], set[str]]:
        allowed: set[str] = set()
        for rule in (*self._public, *self._sandbox):
            values = rule.match(path)
            if values is None:
                continue
            if rule.verb == method:
                return rule, values, allowed
            allowed.add(rule.verb)
        return None, {}, allowed

    def _caller(self, request: web.Request) -> Caller:
        ip = self._origins.client_ip(request.remote or "", request.headers.get("X-Forwarded-For", ""))
        return Caller(authorization=request.headers.get("Authorization", ""), ip=ip, timeout=self._settings.timeout)

    async def _handle(self, request: web.Request, rule: HttpRule, values: dict[str, str]) -> Message:
        caller = self._caller(request)
        service = rule.service.name
        declared = request.content_length
        if declared is not None and declared > self._settings.max_body_bytes:
            raise _too_large(self._settings.max_body_bytes)
        if service == "AdminService":
            principal = await self._api.admit(caller, ADMIN_SCOPES)
            message = await self._read(request, rule, values)
            return await self._admin.handlers[rule.method.name](principal, caller, message)
        if service == "PublicService":
            principal = await self._api.admit(caller, PUBLIC_SCOPES[rule.method.name])
            message = await self._read(request, rule, values)
            return await self._api.handle(rule.method.name, principal, caller, message)
        self._api.limits.check_ip(caller.ip)
        message = await self._read(request, rule, values)
        # The sandbox: a person's action may wait for the bot's answer.
        return await forward(
            self._downstream.method(rule), message, max(caller.timeout, self._settings.sandbox_timeout)
        )

    async def _read(self, request: web.Request, rule: HttpRule, values: dict[str, str]) -> Message:
        cls = _message_class(rule)
        problems = Violations()
        data: Any
        if rule.body:
            raw = await _read_body(request, self._settings.max_body_bytes)
            if raw.strip():
                try:
                    data = json.loads(raw)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    raise invalid_argument([("body", "is not valid JSON")]) from None
            else:
                data = {}
            if rule.body != "*":
                # The body is one field; the others come from the query (HTTP transcoding rules).
                query = query_to_json(rule.method.input_type, request.rel_url.query.items(), problems)
                if rule.body in query:
                    problems.add(rule.body, "is the request body; it cannot be set in the query string")
                data = {**query, rule.body: data}
            if not isinstance(data, dict):
                raise invalid_argument([("body", "must be a JSON object")])
        else:
            data = query_to_json(rule.method.input_type, request.rel_url.query.items(), problems)
        put_path_values(rule.method.input_type, data, values)
        return parse_message(cls, data, problems)


def _message_class(rule: HttpRule) -> type[Message]:
    return message_factory.GetMessageClass(rule.method.input_type)


async def _read_body(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class HttpStatusError(ServiceError):
    """A refusal that only HTTP has (413), answered with its own status."""

    def __init__(self, http_status: int, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(code, reason, message)
        self.http_status = http_status


def _too_large(limit: int) -> ServiceError:
    return HttpStatusError(
        413, grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE", f"the request body exceeds {limit} bytes"
    )

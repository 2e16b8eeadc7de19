"""The local Gateway's HTTP face, as gatewayapi.telegram.org serves it: `/<method>` by GET or
POST, parameters in the query string, a form or a JSON body, method names in any case, the token
as `Authorization: Bearer <token>` or the `access_token` parameter; the answer is always JSON with
`ok`. Reports go out with aiohttp to the callback_url the request named (plain http is accepted
here, on loopback, where Telegram demands https)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from services.core.logging import get_logger
from services.telegramsim.gateway import GatewayError, SimulatedGateway

log = get_logger(__name__)
MAX_BODY = 16 * 1024
Method = Callable[[str, Mapping[str, Any]], Awaitable[Any]]


class GatewayHttp:
    def __init__(self, gateway: SimulatedGateway, host: str, port: int) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._methods: dict[str, Method] = {
            "sendverificationmessage": gateway.send_verification_message,
            "checksendability": gateway.check_send_ability,
            "checkverificationstatus": gateway.check_verification_status,
            "revokeverificationmessage": gateway.revoke_verification_message,
        }

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{method}", self.handle)
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False)
        await site.start()
        bound = self._runner.addresses
        self.port = int(bound[0][1]) if bound else self.port
        log.info("gateway_http_started", address=f"{self.host}:{self.port}")
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "POST"):
            return _answer({"ok": False, "error": "METHOD_NOT_ALLOWED"}, 405)
        method = self._methods.get(request.match_info["method"].lower())
        if method is None:
            return _answer({"ok": False, "error": "METHOD_NOT_FOUND"}, 404)
        try:
            params = await _params(request)
            token = _token(request, params)
            result = await method(token, params)
        except GatewayError as error:
            return _answer({"ok": False, "error": error.error}, error.http_status)
        return _answer({"ok": True, "result": result}, 200)


async def _params(request: web.Request) -> dict[str, Any]:
    params: dict[str, Any] = dict(request.query)
    if request.method != "POST" or not request.can_read_body:
        return params
    kind = request.content_type
    if kind == "application/json":
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise GatewayError("JSON_INVALID") from None
        if not isinstance(body, dict):
            raise GatewayError("JSON_INVALID")
        params.update(body)
    elif kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    return params


def _token(request: web.Request, params: Mapping[str, Any]) -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return str(params.get("access_token") or "")


def _answer(body: dict[str, Any], status: int) -> web.Response:
    return web.json_response(body, status=status)


class ReportPoster:
    """Posts a report; the HTTP status it got, 0 when the URL could not be reached."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(url, data=body, headers=dict(headers)) as answer:
                return answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("gateway_report_unreachable", error=type(exc).__name__)
            return 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

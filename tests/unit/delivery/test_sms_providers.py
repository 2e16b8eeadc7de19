"""smsc and webhook SMS providers against a local HTTP server: success, error codes, 5xx, timeouts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.core.clock import ManualClock
from services.delivery.sms import (
    DELIVERED,
    FAILED,
    HttpSettings,
    SmscProvider,
    SmsError,
    WebhookSmsProvider,
    signature,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(routes: dict[str, Handler]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


FAST = HttpSettings(timeout=0.5, retries=2, retry_backoff=0.01)


async def test_smsc_send_posts_the_documented_fields_and_reads_the_id() -> None:
    seen: list[dict[str, Any]] = []

    async def send(request: web.Request) -> web.Response:
        seen.append(dict(await request.post()))
        return web.json_response({"id": 4711, "cnt": 1})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": 1 if request.query["id"] == "4711" else 22, "last_date": "x"})

    async with serve({"/sys/send.php": send, "/sys/status.php": status}) as base, aiohttp.ClientSession() as session:
        provider = SmscProvider(session, base + "/sys/", "acme", "pa55", FAST)
        sent = await provider.send("01HZX", "+79991234567", "Code 1234", "otpgate")
        assert sent.provider_id == "4711" and not sent.delivered
        form = seen[0]
        assert form["login"] == "acme" and form["psw"] == "pa55" and form["phones"] == "79991234567"
        assert form["mes"] == "Code 1234" and form["sender"] == "otpgate" and form["fmt"] == "3"
        assert await provider.status("4711", "+79991234567") == (DELIVERED, "1")
        assert await provider.status("4712", "+79991234567") == (FAILED, "22")


@pytest.mark.parametrize(
    ("code", "name", "permanent"),
    [
        (2, "BAD_CREDENTIALS", True),
        (3, "INSUFFICIENT_FUNDS", True),
        (7, "BAD_PHONE_FORMAT", True),
        (9, "TOO_MANY_REQUESTS", False),
    ],
)
async def test_smsc_error_codes_map_to_clear_errors(code: int, name: str, permanent: bool) -> None:
    async def send(request: web.Request) -> web.Response:
        return web.json_response({"error": "whatever", "error_code": code})

    async with serve({"/send.php": send}) as base, aiohttp.ClientSession() as session:
        provider = SmscProvider(session, base, "acme", "pa55", FAST)
        with pytest.raises(SmsError) as failure:
            await provider.send("01HZX", "+79991234567", "x", "")
        assert failure.value.code == name and failure.value.permanent is permanent
        assert "pa55" not in str(failure.value)


async def test_smsc_retries_5xx_then_succeeds_and_times_out_as_a_transient_error() -> None:
    calls = {"n": 0}

    async def flaky(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            return web.Response(status=503)
        return web.json_response({"id": 1, "cnt": 1})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({"id": 2})

    async with serve({"/a/send.php": flaky, "/b/send.php": slow}) as base, aiohttp.ClientSession() as session:
        sent = await SmscProvider(session, base + "/a/", "l", "p", FAST).send("m", "+79991234567", "x", "")
        assert sent.provider_id == "1" and calls["n"] == 3
        with pytest.raises(SmsError) as failure:
            await SmscProvider(session, base + "/b/", "l", "p", HttpSettings(timeout=0.2)).send(
                "m", "+79991234567", "x", ""
            )
        assert failure.value.code == "TIMEOUT" and not failure.value.permanent
        # Nobody listens: connection errors are retried, then transient.
        with pytest.raises(SmsError) as failure:
            await SmscProvider(session, "http://127.0.0.1:9/", "l", "p", FAST).send("m", "+79991234567", "x", "")
        assert failure.value.code == "CONNECT_FAILED" and not failure.value.permanent
        with pytest.raises(SmsError):
            await SmscProvider(session, "http://127.0.0.1:9/", "l", "p", FAST).status("1", "+79991234567")


async def test_webhook_provider_signs_the_body_and_maps_statuses() -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    answers = [
        web.json_response({"id": "prov-1", "status": "delivered"}),
        web.Response(status=400),
        web.Response(status=500),
    ]

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return answers.pop(0)

    clock = ManualClock()
    async with serve({"/sms": hook}) as base, aiohttp.ClientSession() as session:
        provider = WebhookSmsProvider(session, base + "/sms", "hook-secret", FAST, clock)
        sent = await provider.send("m1", "+79991234567", "Code 9", "otpgate")
        assert sent.provider_id == "prov-1" and sent.delivered
        headers, body = received[0]
        assert json.loads(body) == {"id": "m1", "to": "+79991234567", "text": "Code 9", "sender": "otpgate"}
        assert headers["X-Otpgate-Signature"] == signature("hook-secret", headers["X-Otpgate-Timestamp"], body)
        with pytest.raises(SmsError) as rejected:
            await provider.send("m2", "+79991234567", "x", "")
        assert rejected.value.permanent
        with pytest.raises(SmsError) as broken:
            await provider.send("m3", "+79991234567", "x", "")
        assert not broken.value.permanent

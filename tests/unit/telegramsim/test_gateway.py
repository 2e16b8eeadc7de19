"""The local Telegram Gateway as a client meets it over HTTP: the four methods and their shapes,
the token, charges, refunds on ttl, statuses, the signed reports and their retries, the person's
"Verification Codes" chat, and its state across a restart."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.telegramsim.gateway import GatewaySettings, SimulatedGateway
from services.telegramsim.gateway_http import GatewayHttp, ReportPoster
from services.telegramsim.gateway_store import GatewayStore
from services.telegramsim.model import SandboxLimits
from services.telegramsim.store import TelegramStore
from services.telegramsim.telegram import SimulatedTelegram

TOKEN = "sandbox-test-token"
PHONE = "+79991234567"


@dataclass
class Callbacks:
    """A callback_url server: what it received, and the HTTP statuses it answers with next."""

    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    def statuses(self) -> list[str]:
        return [json.loads(body).get("delivery_status", {}).get("status", "") for _, body in self.received]


@dataclass
class World:
    telegram: SimulatedTelegram
    gateway: SimulatedGateway
    http: aiohttp.ClientSession
    base: str
    callbacks: Callbacks
    clock: ManualClock

    async def call(self, method: str, token: str = TOKEN, **params: Any) -> tuple[int, dict[str, Any]]:
        async with self.http.post(
            f"{self.base}/{method}", json=params, headers={"Authorization": f"Bearer {token}"}
        ) as answer:
            return answer.status, await answer.json()

    async def ok(self, method: str, **params: Any) -> dict[str, Any]:
        status, body = await self.call(method, **params)
        assert status == 200 and body["ok"] is True, body
        result: dict[str, Any] = body["result"]
        return result

    async def error(self, method: str, token: str = TOKEN, **params: Any) -> str:
        status, body = await self.call(method, token, **params)
        assert body["ok"] is False and status >= 400, body
        return str(body["error"])

    async def balance(self) -> float:
        found = await self.gateway.store.balance(self.gateway.store.account_id(TOKEN))
        assert found is not None
        return found / 1_000_000


async def open_world(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, callbacks: Callbacks, balance: float
) -> tuple[SimulatedTelegram, SimulatedGateway, GatewayHttp]:
    limits = SandboxLimits(bot_rate=10, bot_burst=3, chat_rate=1, chat_burst=2, reply_wait=1)
    telegram = SimulatedTelegram(TelegramStore(database, keyring), limits, clock)
    await telegram.store.create_indexes()
    await telegram.load()
    gateway = SimulatedGateway(
        GatewayStore(database, keyring), telegram, clock, GatewaySettings(0.01, balance), ReportPoster()
    )
    await gateway.load((TOKEN,))
    http = GatewayHttp(gateway, "127.0.0.1", 0)
    await http.start()
    return telegram, gateway, http


@pytest.fixture
async def world(database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[World]:
    callbacks = Callbacks()
    app = web.Application()
    app.router.add_post("/reports", callbacks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    callbacks.url = f"http://127.0.0.1:{runner.addresses[0][1]}/reports"
    telegram, gateway, http = await open_world(database, keyring, clock, callbacks, 1.0)
    async with aiohttp.ClientSession() as session:
        yield World(telegram, gateway, session, f"http://127.0.0.1:{http.port}", callbacks, clock)
    await http.stop()
    await gateway.post_report.close()  # type: ignore[attr-defined]
    await runner.cleanup()


def signed_by(token: str, headers: dict[str, str], body: bytes) -> bool:
    """Telegram's check, written out from the reference (not through the code under test)."""
    secret = hashlib.sha256(token.encode()).digest()
    data = headers["X-Request-Timestamp"].encode() + b"\n" + body
    return hmac.compare_digest(hmac.new(secret, data, hashlib.sha256).hexdigest(), headers["X-Request-Signature"])


async def test_check_then_send_is_charged_once_and_reaches_the_verification_codes_chat(world: World) -> None:
    user = await world.telegram.create_user(phone=PHONE)
    checked = await world.ok("checkSendAbility", phone_number=PHONE)
    assert checked["phone_number"] == PHONE[1:] and checked["request_cost"] == 0.01
    assert checked["remaining_balance"] == pytest.approx(0.99) and "delivery_status" not in checked
    sent = await world.ok(
        "sendVerificationMessage",
        phone_number=PHONE,
        request_id=checked["request_id"],
        code="482913",
        ttl=60,
        payload="msg-1",
        callback_url=world.callbacks.url,
    )
    assert sent["request_id"] == checked["request_id"] and "remaining_balance" not in sent
    assert sent["delivery_status"]["status"] == "delivered" and sent["payload"] == "msg-1"
    assert await world.balance() == pytest.approx(0.99)  # the send under the check's id was free
    assert await world.error(
        "sendVerificationMessage", phone_number=PHONE, request_id=checked["request_id"], code="1234"
    ) == ("REQUEST_ID_ALREADY_USED")
    # The person sees it in "Verification Codes"; listing does not read it, opening does.
    listed = await world.gateway.codes_chat(user.user_id)
    assert [r.delivery_status for r in listed] == ["delivered"] and "482913" in listed[0].text
    opened = await world.gateway.codes_chat(user.user_id, open_chat=True)
    assert [r.delivery_status for r in opened] == ["read"]
    status = await world.ok("checkVerificationStatus", request_id=checked["request_id"])
    assert status["delivery_status"]["status"] == "read"
    # Reports for each change, signed with SHA256(token) as the key.
    await world.gateway.post_due_reports()
    assert world.callbacks.statuses() == ["sent", "delivered", "read"]
    assert all(signed_by(TOKEN, headers, body) for headers, body in world.callbacks.received)
    assert not signed_by("another-token", *world.callbacks.received[0])


async def test_who_cannot_be_reached_and_bad_requests_change_nothing(world: World) -> None:
    await world.telegram.create_user(phone="+79990000002", deactivated=True)
    assert await world.error("checkSendAbility", phone_number="+79990000001") == "PHONE_NUMBER_NOT_AVAILABLE"
    assert await world.error("checkSendAbility", phone_number="+79990000002") == "PHONE_NUMBER_NOT_AVAILABLE"
    assert await world.error("checkSendAbility", phone_number="12ab") == "PHONE_NUMBER_INVALID"
    assert await world.error("checkSendAbility", token="wrong", phone_number=PHONE) == "ACCESS_TOKEN_INVALID"
    assert await world.error("checkSendAbility", token="", phone_number=PHONE) == "ACCESS_TOKEN_REQUIRED"
    await world.telegram.create_user(phone=PHONE)
    for params, error in (
        ({"code": "12a4"}, "CODE_INVALID"),
        ({"code": "123"}, "CODE_INVALID"),
        ({"code_length": 3}, "CODE_LENGTH_INVALID"),
        ({}, "CODE_LENGTH_INVALID"),
        ({"code": "1234", "ttl": 29}, "TTL_INVALID"),
        ({"code": "1234", "ttl": 3601}, "TTL_INVALID"),
        ({"code": "1234", "payload": "x" * 129}, "PAYLOAD_INVALID"),
        ({"code": "1234", "callback_url": "ftp://x"}, "CALLBACK_URL_INVALID"),
        ({"code": "1234", "request_id": "404"}, "REQUEST_ID_INVALID"),
    ):
        assert await world.error("sendVerificationMessage", phone_number=PHONE, **params) == error
    assert await world.balance() == 1.0
    assert await world.error("checkVerificationStatus", request_id="404") == "REQUEST_ID_INVALID"
    async with world.http.get(f"{world.base}/noSuchMethod", params={"access_token": TOKEN}) as answer:
        assert answer.status == 404 and (await answer.json())["error"] == "METHOD_NOT_FOUND"


async def test_query_string_form_and_any_case_work_as_the_json_body_does(world: World) -> None:
    await world.telegram.create_user(phone=PHONE)
    async with world.http.get(
        f"{world.base}/CHECKSENDABILITY", params={"access_token": TOKEN, "phone_number": PHONE}
    ) as answer:
        checked = (await answer.json())["result"]
    async with world.http.post(
        f"{world.base}/sendverificationmessage",
        data={"access_token": TOKEN, "phone_number": PHONE, "request_id": checked["request_id"], "code_length": "6"},
    ) as answer:
        body = await answer.json()
    assert body["ok"] and body["result"]["delivery_status"]["status"] == "delivered"


async def test_a_code_not_delivered_within_its_ttl_is_refunded(world: World) -> None:
    user = await world.telegram.create_user(phone=PHONE)
    await world.gateway.set_device_online(user.user_id, False)
    sent = await world.ok(
        "sendVerificationMessage", phone_number=PHONE, code="1111", ttl=60, callback_url=world.callbacks.url
    )
    assert sent["delivery_status"]["status"] == "sent" and sent["remaining_balance"] == pytest.approx(0.99)
    world.clock.advance(59)
    assert await world.gateway.expire_due() == 0
    world.clock.advance(1)
    assert await world.gateway.expire_due() == 1
    status = await world.ok("checkVerificationStatus", request_id=sent["request_id"])
    assert status["delivery_status"]["status"] == "expired" and status["is_refunded"] is True
    assert await world.balance() == 1.0
    await world.gateway.set_device_online(user.user_id, True)  # too late: the message is gone
    assert await world.gateway.codes_chat(user.user_id) == []
    await world.gateway.post_due_reports()
    assert world.callbacks.statuses()[-1] == "expired"


async def test_delivered_codes_are_not_refunded_and_read_ones_stay(world: World) -> None:
    user = await world.telegram.create_user(phone=PHONE)
    unread = await world.ok("sendVerificationMessage", phone_number=PHONE, code="2222", ttl=30)
    read = await world.ok("sendVerificationMessage", phone_number=PHONE, code="3333", ttl=30)
    await world.gateway.codes_chat(user.user_id, after_message_id=1, open_chat=True)  # opens from the second on
    world.clock.advance(31)
    await world.gateway.expire_due()
    assert await world.balance() == pytest.approx(0.98)
    assert "is_refunded" not in await world.ok("checkVerificationStatus", request_id=unread["request_id"])
    assert [r.request_id for r in await world.gateway.codes_chat(user.user_id)] == [read["request_id"]]


async def test_codes_telegram_generates_are_checked_with_attempts(world: World) -> None:
    await world.telegram.create_user(phone=PHONE)
    sent = await world.ok("sendVerificationMessage", phone_number=PHONE, code_length=6)
    request = await world.gateway.store.get(sent["request_id"])
    assert request is not None and len(request.code) == 6 and request.code.isdigit()
    wrong = "000000" if request.code != "000000" else "111111"
    checked = await world.ok("checkVerificationStatus", request_id=sent["request_id"], code=wrong)
    assert checked["verification_status"]["status"] == "code_invalid"
    assert checked["verification_status"]["code_entered"] == wrong
    right = await world.ok("checkVerificationStatus", request_id=sent["request_id"], code=request.code)
    assert right["verification_status"]["status"] == "code_valid"
    other = await world.ok("sendVerificationMessage", phone_number=PHONE, code="123456")
    for _ in range(5):  # the fifth wrong code ends it
        last = await world.ok("checkVerificationStatus", request_id=other["request_id"], code="654321")
    assert last["verification_status"]["status"] == "code_max_attempts_exceeded"
    again = await world.ok("checkVerificationStatus", request_id=other["request_id"], code="123456")
    assert again["verification_status"]["status"] == "code_max_attempts_exceeded"


async def test_revoke_removes_only_what_was_not_delivered(world: World) -> None:
    user = await world.telegram.create_user(phone=PHONE)
    delivered = await world.ok("sendVerificationMessage", phone_number=PHONE, code="4444")
    await world.gateway.set_device_online(user.user_id, False)
    pending = await world.ok("sendVerificationMessage", phone_number=PHONE, code="5555")
    assert await world.ok("revokeVerificationMessage", request_id=pending["request_id"]) is True  # type: ignore[comparison-overlap]
    assert await world.ok("revokeVerificationMessage", request_id=delivered["request_id"]) is True  # type: ignore[comparison-overlap]
    await world.gateway.set_device_online(user.user_id, True)
    statuses = [
        (await world.ok("checkVerificationStatus", request_id=r["request_id"]))["delivery_status"]["status"]
        for r in (delivered, pending)
    ]
    assert statuses == ["delivered", "revoked"]
    assert [r.request_id for r in await world.gateway.codes_chat(user.user_id)] == [delivered["request_id"]]


async def test_the_balance_runs_out(world: World) -> None:
    await world.telegram.create_user(phone=PHONE)
    world.gateway._price = 600_000  # 0.6 credits a request, against a balance of 1
    await world.ok("checkSendAbility", phone_number=PHONE)
    assert await world.error("checkSendAbility", phone_number=PHONE) == "BALANCE_NOT_ENOUGH"
    assert await world.error("sendVerificationMessage", phone_number=PHONE, code="1234") == "BALANCE_NOT_ENOUGH"
    assert await world.balance() == pytest.approx(0.4)


async def test_reports_are_retried_with_growing_delays_until_200(world: World) -> None:
    await world.telegram.create_user(phone=PHONE)
    world.callbacks.answers = [500, 503]
    await world.ok("sendVerificationMessage", phone_number=PHONE, code="1234", callback_url=world.callbacks.url)
    assert await world.gateway.post_due_reports() == 0  # two reports (sent, delivered): 500 and 503
    assert await world.gateway.post_due_reports() == 0  # not due yet
    world.clock.advance(2)
    assert await world.gateway.post_due_reports() == 2
    assert len(world.callbacks.received) == 4
    world.callbacks.answers = [500] * 20
    await world.ok("sendVerificationMessage", phone_number=PHONE, code="1234", callback_url=world.callbacks.url)
    for _ in range(12):
        await world.gateway.post_due_reports()
        world.clock.advance(3600)
    assert len(world.callbacks.received) == 4 + 2 * 11  # the first try and 10 retries of each, then given up


async def test_state_survives_a_restart(
    world: World, database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    user = await world.telegram.create_user(phone=PHONE)
    sent = await world.ok("sendVerificationMessage", phone_number=PHONE, code="7777", ttl=120)
    telegram, gateway, http = await open_world(database, keyring, clock, world.callbacks, 50.0)
    try:
        assert (await gateway.store.balance(gateway.store.account_id(TOKEN))) == 990_000  # not opened again
        assert [r.request_id for r in await gateway.codes_chat(user.user_id)] == [sent["request_id"]]
        assert telegram.user(user.user_id).last_message_id == 1  # the person's numbering goes on
    finally:
        await http.stop()
        await gateway.post_report.close()  # type: ignore[attr-defined]

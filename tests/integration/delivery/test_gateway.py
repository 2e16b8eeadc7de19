"""The Telegram Gateway channel and the ladder, against the local Gateway of the simulated Telegram
over real HTTP, with the edge receiving its signed reports: explicit sends, bot -> Gateway -> SMS,
no double send when the Gateway's answer is lost, refunds on ttl, revocation, the fraud guard on the
Gateway leg, usage and cost per channel, and the Verify API through the Gateway."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.config import TELEGRAM_GATEWAY_REPORT_PATH
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.core.sandbox import sandbox_gateway_token
from services.delivery.tg_gateway import report_signature
from services.telegramsim.gateway import SimulatedGateway
from tests.integration.delivery.support import QUIET, engine_of, refused, ttl
from tests.support.stack import Stack, running_stack

C = common_pb2
SHARED = ["smsccode_bot", "smsc_code_bot", "smscodes_bot"]
LADDER = [
    C.LadderStep(channel=C.CHANNEL_TELEGRAM),
    C.LadderStep(channel=C.CHANNEL_TELEGRAM_GATEWAY),
    C.LadderStep(channel=C.CHANNEL_SMS),
]
# The Gateway rung falls back when its code is not delivered within a minute.
FALLBACK = [LADDER[0], C.LadderStep(channel=C.CHANNEL_TELEGRAM_GATEWAY, fallback_after=ttl(60)), LADDER[2]]
FELL_BACK = {"channel": "TELEGRAM_GATEWAY", "reason": "NOT_DELIVERED"}
_ids = itertools.count(random.randrange(10**8, 9 * 10**8), 17)
_numbers = itertools.count(random.randrange(10**6, 9 * 10**6))


def new_phone() -> str:
    return f"+7999{next(_numbers) % 10**7:07d}"


@dataclass
class LossyGateway:
    """Between delivery and the local Gateway: passes every call on, and for the sends named in
    `lose` holds the answer back past delivery's timeout (the send happened, its answer is lost).
    While `down`, nothing reaches the Gateway and every call gets a 502 without a JSON body, as
    from a load balancer in front of a Gateway that is away. `before` runs something on the
    person's side just before a call of that method reaches the Gateway (a race, made certain)."""

    target: str
    lose: int = 0
    calls: list[str] = field(default_factory=list)
    url: str = ""
    down: bool = False
    before: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        self.calls.append(method)
        if self.down:
            return web.Response(text="502 Bad Gateway", status=502)
        if method in self.before:
            await self.before.pop(method)()
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.target}/{method}", data=await request.read(), headers=request.headers) as answer,
        ):
            body = await answer.read()
        if method == "sendVerificationMessage" and self.lose > 0:
            self.lose -= 1
            await asyncio.sleep(2.0)
        return web.Response(body=body, status=answer.status, content_type="application/json")


@dataclass
class World:
    stack: Stack
    clock: ManualClock
    delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub
    sms: delivery_pb2_grpc.SmsSandboxServiceAsyncStub
    telegram: telegramsim_pb2_grpc.SandboxServiceAsyncStub
    verification: verification_pb2_grpc.VerificationServiceAsyncStub
    lossy: LossyGateway

    @property
    def gateway(self) -> SimulatedGateway:
        gateway: SimulatedGateway = self.stack.app("telegramsim").gateway
        return gateway

    async def person(self, *bots: str, telegram: bool = True) -> tuple[int, str]:
        user_id, phone = next(_ids), new_phone()
        if telegram:
            await self.telegram.CreateSandboxUser(
                telegramsim_pb2.CreateSandboxUserRequest(
                    user=telegramsim_pb2.SandboxUser(user_id=user_id, first_name="T", language_code="en", phone=phone)
                )
            )
        for bot in bots:
            await self.telegram.StartBot(telegramsim_pb2.StartBotRequest(user_id=user_id, bot_id=bot))
            await self.telegram.ShareContact(telegramsim_pb2.ShareContactRequest(user_id=user_id, bot_id=bot))
        return user_id, phone

    async def policy(self, **fields: Any) -> None:
        await self.delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=C.ClientPolicy(client_id="shop", **fields),
                update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            )
        )

    async def send(self, phone: str, code: str = "482913", **fields: Any) -> C.Message:
        request = delivery_pb2.SendMessageRequest(
            client_id="shop",
            phone=phone,
            text=f"Your code: {code}",
            code=code,
            purpose=delivery_pb2.MESSAGE_PURPOSE_VERIFICATION,
        )
        for name, value in fields.items():
            if name == "ttl":
                request.ttl.CopyFrom(value)
            else:
                setattr(request, name, value)
        return (await self.delivery.SendMessage(request)).message

    async def message(self, message_id: str) -> C.Message:
        reply = await self.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message_id))
        return reply.message

    async def codes(self, user_id: int, open_chat: bool = False) -> list[str]:
        if open_chat:
            opened = await self.telegram.OpenVerificationCodes(
                telegramsim_pb2.OpenVerificationCodesRequest(user_id=user_id)
            )
            return [m.text for m in opened.messages]
        listed = await self.telegram.ListVerificationCodes(
            telegramsim_pb2.ListVerificationCodesRequest(user_id=user_id)
        )
        return [m.text for m in listed.messages]

    async def inbox(self, phone: str) -> list[str]:
        reply = await self.sms.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone=phone))
        return [m.text for m in reply.messages]

    async def balance(self) -> float:
        store = self.gateway.store
        found = await store.balance(store.account_id(sandbox_gateway_token()))
        assert found is not None
        return found / 1_000_000

    async def reports(self) -> None:
        """The local Gateway posts its due reports to the edge now (its loop, off here, would)."""
        await self.gateway.post_due_reports()

    async def online(self, user_id: int, online: bool = True) -> None:
        await self.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=user_id, online=online))

    async def usage(self) -> dict[int, delivery_pb2.UsageRecord]:
        reply = await self.delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="shop"))
        return {r.channel: r for r in reply.records}


@pytest.fixture
async def world(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[World]:
    lossy = LossyGateway("")
    app = web.Application()
    app.router.add_post("/{method}", lossy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    overrides = {
        **QUIET,
        "OTPGATE_SHARED_BOTS": ",".join(SHARED),
        "OTPGATE_TELEGRAM_GATEWAY_URL": f"http://127.0.0.1:{runner.addresses[0][1]}",
        "OTPGATE_TELEGRAM_GATEWAY_TIMEOUT": "0.5",
        "OTPGATE_SANDBOX_GATEWAY_BALANCE": "5",
        # The local Gateway's reports are posted when a test asks (world.reports): a loop of its
        # own would race the test's steps on the real clock and hold the message's claim.
        "OTPGATE_SANDBOX_GATEWAY_LOOP_INTERVAL": "0",
    }
    services = ["telegramsim", "directory", "verification", "delivery", "botgateway", "edge"]
    async with running_stack(mongo_client, keyring, services, overrides=overrides, clock=clock) as stack:
        lossy.target = f"http://127.0.0.1:{stack.app('telegramsim').gateway_port}"
        d = stack.channel("delivery")
        yield World(
            stack,
            clock,
            delivery_pb2_grpc.DeliveryServiceStub(d),  # type: ignore[arg-type]
            delivery_pb2_grpc.SmsSandboxServiceStub(d),  # type: ignore[arg-type]
            telegramsim_pb2_grpc.SandboxServiceStub(stack.channel("telegramsim")),  # type: ignore[arg-type]
            verification_pb2_grpc.VerificationServiceStub(stack.channel("verification")),  # type: ignore[arg-type]
            lossy,
        )
    await runner.cleanup()


async def test_an_explicit_gateway_code_is_delivered_then_read_and_costs_what_telegram_charged(world: World) -> None:
    user, phone = await world.person()
    sent = await world.send(phone, "482913", channel=C.CHANNEL_TELEGRAM_GATEWAY)
    assert sent.channel == C.CHANNEL_TELEGRAM_GATEWAY and sent.status == C.MESSAGE_STATUS_DELIVERED
    assert sent.cost == pytest.approx(0.01) and await world.balance() == pytest.approx(4.99)
    assert any("482913" in text for text in await world.codes(user))
    await world.codes(user, open_chat=True)  # the person opens "Verification Codes"
    await world.reports()  # sent, delivered, read: signed, checked by delivery through the edge
    read = await world.message(sent.id)
    assert read.status == C.MESSAGE_STATUS_READ and read.HasField("read_time")
    usage = await world.usage()
    assert usage[C.CHANNEL_TELEGRAM_GATEWAY].messages == 1
    assert usage[C.CHANNEL_TELEGRAM_GATEWAY].cost == pytest.approx(0.01)


async def test_a_number_without_telegram_is_not_charged_and_bad_requests_are_refused(world: World) -> None:
    _, phone = await world.person(telegram=False)
    failed = await world.send(phone, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    assert failed.status == C.MESSAGE_STATUS_FAILED and failed.failure_reason == C.FAILURE_REASON_NOT_CONNECTED
    assert await world.balance() == 5.0 and failed.cost == 0
    no_code = await refused(world.send(phone, code="", channel=C.CHANNEL_TELEGRAM_GATEWAY))
    assert no_code.reason == "INVALID_ARGUMENT" or "code" in str(no_code.field_violations)
    bad_code = await refused(world.send(phone, code="12ab", channel=C.CHANNEL_TELEGRAM_GATEWAY))
    assert [v[0] for v in bad_code.field_violations] == ["code"]


async def test_the_ladder_takes_the_first_channel_that_reaches_the_person(world: World) -> None:
    await world.policy(ladder=LADDER, sms_fallback=True, sms_countries_any=True)
    _, with_bot = await world.person("smsc_code_bot")
    _, telegram_only = await world.person()
    _, no_telegram = await world.person(telegram=False)
    by_bot = await world.send(with_bot, "111111")
    assert by_bot.channel == C.CHANNEL_TELEGRAM and by_bot.status == C.MESSAGE_STATUS_SENT
    by_gateway = await world.send(telegram_only, "222222")
    assert by_gateway.channel == C.CHANNEL_TELEGRAM_GATEWAY and by_gateway.status == C.MESSAGE_STATUS_DELIVERED
    by_sms = await world.send(no_telegram, "333333")
    assert by_sms.channel == C.CHANNEL_SMS and by_sms.status == C.MESSAGE_STATUS_DELIVERED
    assert await world.inbox(no_telegram) == ["Your code: 333333"] and await world.inbox(telegram_only) == []
    assert await world.balance() == pytest.approx(4.99)  # the refused check of no_telegram cost nothing
    usage = await world.usage()
    assert {ch: (u.messages, round(u.cost, 2)) for ch, u in usage.items()} == {
        C.CHANNEL_TELEGRAM: (1, 0.0),
        C.CHANNEL_TELEGRAM_GATEWAY: (1, 0.01),
        C.CHANNEL_SMS: (1, 0.05),
    }
    # A rung may serve some countries only, and has a daily cap: past it the next rung carries.
    await world.policy(
        ladder=[LADDER[0], C.LadderStep(channel=C.CHANNEL_TELEGRAM_GATEWAY, daily_cap=1), LADDER[2]],
    )
    _, second = await world.person()
    assert (await world.send(second, "444444")).channel == C.CHANNEL_TELEGRAM_GATEWAY
    _, third = await world.person()
    assert (await world.send(third, "555555")).channel == C.CHANNEL_SMS
    await world.policy(ladder=[LADDER[0], C.LadderStep(channel=C.CHANNEL_TELEGRAM_GATEWAY, countries=["DE"])])
    _, russian = await world.person()
    assert (await world.send(russian, "666666")).status == C.MESSAGE_STATUS_FAILED


async def test_a_gateway_send_whose_answer_was_lost_is_never_sent_again_nor_by_sms(world: World) -> None:
    await world.policy(ladder=LADDER, sms_fallback=True, sms_countries_any=True)
    user, phone = await world.person()
    world.lossy.lose = 1
    first = await world.send(phone, "777777")
    assert first.status == C.MESSAGE_STATUS_QUEUED  # unknown: not failed over to SMS
    assert await world.inbox(phone) == [] and len(await world.codes(user)) == 1
    world.clock.advance(10)
    assert await engine_of(world.stack).dispatch_due_once() == 1
    resolved = await world.message(first.id)
    assert resolved.status == C.MESSAGE_STATUS_DELIVERED and resolved.channel == C.CHANNEL_TELEGRAM_GATEWAY
    assert len(await world.codes(user)) == 1 and await world.inbox(phone) == []
    assert world.lossy.calls.count("sendVerificationMessage") == 1  # asked, not sent again
    assert world.lossy.calls[-1] == "checkVerificationStatus"
    assert await world.balance() == pytest.approx(4.99)


async def test_a_code_not_delivered_within_its_ttl_expires_and_is_refunded(world: World) -> None:
    user, phone = await world.person()
    await world.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=user, online=False))
    sent = await world.send(phone, channel=C.CHANNEL_TELEGRAM_GATEWAY, ttl=ttl(60))
    assert sent.status == C.MESSAGE_STATUS_SENT and await world.balance() == pytest.approx(4.99)
    world.clock.advance(61)
    await world.gateway.expire_due()
    await world.reports()
    expired = await world.message(sent.id)
    assert expired.status == C.MESSAGE_STATUS_EXPIRED and expired.cost == 0
    assert await world.balance() == 5.0
    usage = (await world.usage())[C.CHANNEL_TELEGRAM_GATEWAY]
    assert (usage.messages, usage.cost, usage.refunded) == (1, 0.0, 1)


async def test_cancel_revokes_a_code_not_yet_delivered(world: World) -> None:
    user, phone = await world.person()
    await world.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=user, online=False))
    sent = await world.send(phone, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    canceled = await world.delivery.CancelMessage(delivery_pb2.CancelMessageRequest(client_id="shop", id=sent.id))
    assert canceled.message.status == C.MESSAGE_STATUS_CANCELED
    await world.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=user, online=True))
    assert await world.codes(user) == []  # revoked before it reached the device


async def test_reports_are_checked_signature_and_age(world: World) -> None:
    user, phone = await world.person()
    await world.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=user, online=False))
    sent = await world.send(phone, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    record = await engine_of(world.stack).store.get(sent.id)
    assert record is not None and record.provider_id
    body = json.dumps(
        {
            "request_id": record.provider_id,
            "phone_number": phone[1:],
            "request_cost": 0.01,
            "delivery_status": {"status": "read", "updated_at": int(world.clock.now().timestamp())},
        }
    ).encode()
    url = f"http://127.0.0.1:{world.stack.env['OTPGATE_EDGE_HTTP_PORT']}{TELEGRAM_GATEWAY_REPORT_PATH}"
    token = sandbox_gateway_token()

    async def post(timestamp: int, signature: str) -> int:
        headers = {"X-Request-Timestamp": str(timestamp), "X-Request-Signature": signature}
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as answer:
            return answer.status

    now = int(world.clock.now().timestamp())
    assert await post(now, report_signature("not-the-token", str(now), body)) == 403
    assert await post(now, "00" * 32) == 403
    stale = now - 301
    assert await post(stale, report_signature(token, str(stale), body)) == 403
    assert (await world.message(sent.id)).status == C.MESSAGE_STATUS_SENT
    assert await post(now, report_signature(token, str(now), body)) == 200
    assert (await world.message(sent.id)).status == C.MESSAGE_STATUS_READ


async def test_a_report_that_finds_its_message_busy_waits_for_it_and_applies(world: World) -> None:
    user, phone = await world.person()
    await world.online(user, online=False)
    sent = await world.send(phone, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    engine = engine_of(world.stack)
    record = await engine.store.get(sent.id)
    assert record is not None and sent.status == C.MESSAGE_STATUS_SENT
    held = await engine.dispatcher.claim(record)  # as the attempt that sent it holds it
    assert held is not None
    await world.online(user)
    await world.codes(user, open_chat=True)  # delivered and read: the local Gateway queues its reports

    async def finish_the_attempt() -> None:
        await asyncio.sleep(0.2)  # the holder writes its outcome a moment later
        await engine.dispatcher.claims.release(held)

    releasing = asyncio.create_task(finish_the_attempt())
    posted = await world.gateway.post_due_reports()  # counts those answered 200, not MESSAGE_BUSY
    assert posted >= 2
    await releasing
    assert (await world.message(sent.id)).status == C.MESSAGE_STATUS_READ


async def test_the_fraud_guard_and_the_ip_limit_guard_the_gateway_leg(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    request = {"client_id": "shop", "text": "Code 1234", "code": "1234", "channel": C.CHANNEL_TELEGRAM_GATEWAY}
    verify = delivery_pb2.MESSAGE_PURPOSE_VERIFICATION
    overrides = {**QUIET, "OTPGATE_FRAUD_MODE": "block"}
    async with running_stack(
        mongo_client, keyring, ["telegramsim", "delivery"], overrides=overrides, clock=clock
    ) as stack:
        delivery = delivery_pb2_grpc.DeliveryServiceStub(stack.channel("delivery"))
        first = C.Origin(ip="198.51.100.1")
        await delivery.SendMessage(
            delivery_pb2.SendMessageRequest(phone="+4915112340001", purpose=verify, origin=first, **request)
        )
        # A second number of the prefix with no code entered, where no CAPTCHA can be shown: refused
        # before the Gateway is asked (nothing charged), as an SMS would be.
        second = C.Origin(ip="198.51.100.2")
        burst = await refused(
            delivery.SendMessage(
                delivery_pb2.SendMessageRequest(phone="+4915112347777", purpose=verify, origin=second, **request)
            )
        )
        assert burst.reason == "FRAUD_SUSPECTED" and burst.metadata["signal"] == "PREFIX_VELOCITY"
        assert burst.message.startswith("Telegram Gateway code refused by the fraud guard")
        gateway: SimulatedGateway = stack.app("telegramsim").gateway
        assert await gateway.store.balance(gateway.store.account_id(sandbox_gateway_token())) == 10_000_000
    overrides = {**QUIET, "OTPGATE_FRAUD_MODE": "off", "OTPGATE_DELIVERY_LIMIT_IP_SMS": "2/1800"}
    async with running_stack(
        mongo_client, keyring, ["telegramsim", "delivery"], overrides=overrides, clock=clock
    ) as stack:
        delivery = delivery_pb2_grpc.DeliveryServiceStub(stack.channel("delivery"))
        origin = C.Origin(ip="203.0.113.9")
        for i in range(2):
            await delivery.SendMessage(
                delivery_pb2.SendMessageRequest(phone=f"+7916{i:03d}{i:04d}", origin=origin, **request)
            )
        limited = await refused(
            delivery.SendMessage(delivery_pb2.SendMessageRequest(phone="+79169990000", origin=origin, **request))
        )
        assert limited.code.name == "RESOURCE_EXHAUSTED"


async def test_the_verify_api_sends_its_code_through_the_gateway_and_cancel_revokes_it(world: World) -> None:
    user, phone = await world.person()
    started = await world.verification.StartVerification(
        verification_pb2.StartVerificationRequest(client_id="shop", phone=phone, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    )
    assert started.verification.channel == C.CHANNEL_TELEGRAM_GATEWAY
    texts = await world.codes(user, open_chat=True)
    code = re.search(r"\d{6}", texts[0])
    assert code is not None
    checked = await world.verification.CheckVerification(
        verification_pb2.CheckVerificationRequest(client_id="shop", id=started.verification.id, code=code.group())
    )
    assert checked.verification.status == C.VERIFICATION_STATUS_APPROVED
    other_user, other = await world.person()
    await world.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=other_user, online=False))
    pending = await world.verification.StartVerification(
        verification_pb2.StartVerificationRequest(client_id="shop", phone=other, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    )
    await world.verification.CancelVerification(
        verification_pb2.CancelVerificationRequest(client_id="shop", id=pending.verification.id)
    )
    message = await world.message(pending.verification.message_id)
    assert message.status == C.MESSAGE_STATUS_CANCELED
    await world.telegram.SetDeviceOnline(telegramsim_pb2.SetDeviceOnlineRequest(user_id=other_user, online=True))
    assert await world.codes(other_user) == []


async def test_without_a_callback_url_the_statuses_are_polled_until_read(world: World) -> None:
    engine = engine_of(world.stack)
    engine.gateway.settings = replace(engine.gateway.settings, callback_url="")  # as in production, unset
    user, phone = await world.person()
    sent = await world.send(phone, channel=C.CHANNEL_TELEGRAM_GATEWAY)
    assert sent.status == C.MESSAGE_STATUS_DELIVERED
    world.clock.advance(31)
    assert await engine.poll_sms_once() == 1
    assert (await world.message(sent.id)).status == C.MESSAGE_STATUS_DELIVERED
    await world.codes(user, open_chat=True)
    world.clock.advance(31)
    assert await engine.poll_sms_once() == 1
    assert (await world.message(sent.id)).status == C.MESSAGE_STATUS_READ
    world.clock.advance(31)
    assert await engine.poll_sms_once() == 0  # read: nothing more to ask


async def test_a_code_the_gateway_makes_is_checked_through_the_gateway(world: World) -> None:
    user, phone = await world.person()
    start = verification_pb2.StartVerificationRequest(
        client_id="shop", phone=phone, channel=C.CHANNEL_TELEGRAM_GATEWAY, gateway_code=True, code_length=5
    )
    started = (await world.verification.StartVerification(start)).verification
    texts = await world.codes(user)
    code = re.search(r"\d{5}", texts[0])
    assert code is not None
    record = await world.stack.app("verification").database["verifications"].find_one({"_id": started.id})
    assert record is not None and "code_hash" not in record and "code" not in record  # Telegram's alone
    wrong = "00000" if code.group() != "00000" else "11111"
    check = verification_pb2.CheckVerificationRequest(client_id="shop", id=started.id, code=wrong)
    first = (await world.verification.CheckVerification(check)).verification
    assert first.status == C.VERIFICATION_STATUS_PENDING and first.check_attempts_left == 4
    check.code = code.group()
    assert (await world.verification.CheckVerification(check)).verification.status == C.VERIFICATION_STATUS_APPROVED
    refused_start = await refused(
        world.verification.StartVerification(
            verification_pb2.StartVerificationRequest(client_id="shop", phone=phone, gateway_code=True)
        )
    )
    assert [v[0] for v in refused_start.field_violations] == ["gateway_code"]


async def test_a_code_not_delivered_in_time_is_revoked_and_only_then_goes_by_sms(world: World) -> None:
    await world.policy(ladder=FALLBACK, sms_fallback=True, sms_countries_any=True, webhook_secret="s" * 16)
    engine = engine_of(world.stack)
    user, phone = await world.person()
    await world.online(user, False)  # the person's Telegram is offline
    fell_back_before = REGISTRY.get_sample_value("otpgate_ladder_fallbacks_total", FELL_BACK) or 0
    sent = await world.send(phone, "246810", callback_url="http://127.0.0.1:9/otp-status")
    assert sent.status == C.MESSAGE_STATUS_SENT and sent.channel == C.CHANNEL_TELEGRAM_GATEWAY
    world.clock.advance(59)
    assert await engine.dispatch_due_once() == 0  # not yet
    world.clock.advance(2)
    world.lossy.down = True  # neither the revoke nor the status check is answered: it stays put
    assert await engine.dispatch_due_once() == 1
    waiting = await world.message(sent.id)
    assert waiting.status == C.MESSAGE_STATUS_SENT and waiting.channel == C.CHANNEL_TELEGRAM_GATEWAY
    assert await world.inbox(phone) == []
    world.lossy.down = False
    world.clock.advance(5)
    assert await engine.dispatch_due_once() == 1
    assert world.lossy.calls[-2:] == ["revokeVerificationMessage", "checkVerificationStatus"]
    fell = await world.message(sent.id)
    assert fell.channel == C.CHANNEL_SMS and fell.status == C.MESSAGE_STATUS_DELIVERED
    assert await world.inbox(phone) == ["Your code: 246810"]
    # Telegram refunds a code not delivered within its ttl; a revoked one keeps its fee.
    assert fell.cost == pytest.approx(0.06) and await world.balance() == pytest.approx(4.99)
    usage = await world.usage()
    assert {ch: (u.messages, round(u.cost, 2)) for ch, u in usage.items()} == {
        C.CHANNEL_TELEGRAM_GATEWAY: (1, 0.01),
        C.CHANNEL_SMS: (1, 0.05),
    }
    assert REGISTRY.get_sample_value("otpgate_ladder_fallbacks_total", FELL_BACK) == fell_back_before + 1
    events = world.stack.app("delivery").database["webhooks"].find({"_id": {"$regex": f"^{sent.id}:"}})
    # The client hears of the Gateway's send, then of the SMS's (the sandbox delivers it at once).
    assert sorted([doc["_id"].removeprefix(sent.id) async for doc in events]) == [":DELIVERED:SMS", ":SENT"]
    await world.online(user)
    assert await world.codes(user) == []  # revoked before it reached the device: one code in all
    await world.reports()  # the Gateway's "revoked" report finds the message and changes nothing
    after = await world.message(sent.id)
    assert after.channel == C.CHANNEL_SMS and after.status == C.MESSAGE_STATUS_DELIVERED
    world.clock.advance(3600)
    assert await engine.dispatch_due_once() == 0


async def test_a_code_delivered_as_its_revoke_leaves_is_not_sent_again(world: World) -> None:
    await world.policy(ladder=FALLBACK, sms_fallback=True, sms_countries_any=True)
    engine = engine_of(world.stack)
    user, phone = await world.person()
    await world.online(user, False)
    sent = await world.send(phone, "135790")
    world.clock.advance(61)

    async def device_back() -> None:
        await world.online(user)

    world.lossy.before["revokeVerificationMessage"] = device_back  # the code lands first
    assert await engine.dispatch_due_once() == 1
    kept = await world.message(sent.id)
    assert kept.status == C.MESSAGE_STATUS_DELIVERED and kept.channel == C.CHANNEL_TELEGRAM_GATEWAY
    assert await world.inbox(phone) == [] and len(await world.codes(user)) == 1
    assert {ch: u.messages for ch, u in (await world.usage()).items()} == {C.CHANNEL_TELEGRAM_GATEWAY: 1}
    world.clock.advance(60)
    assert await engine.dispatch_due_once() == 0


async def test_no_fallback_without_a_rung_after_that_can_take_the_message(world: World) -> None:
    await world.policy(ladder=FALLBACK, sms_fallback=False)  # the SMS rung needs sms_fallback
    engine = engine_of(world.stack)
    user, phone = await world.person()
    await world.online(user, False)
    sent = await world.send(phone, "975310")
    world.clock.advance(61)
    assert await engine.dispatch_due_once() == 0
    assert (await world.message(sent.id)).status == C.MESSAGE_STATUS_SENT
    assert "revokeVerificationMessage" not in world.lossy.calls


async def test_fallback_after_is_for_a_gateway_rung_with_a_rung_after_it(world: World) -> None:
    gateway, bot, sms = FALLBACK[1], LADDER[0], LADDER[2]
    on_bot = C.LadderStep(channel=C.CHANNEL_TELEGRAM, fallback_after=ttl(60))
    cases = {
        "only the TELEGRAM_GATEWAY rung can fall back": [on_bot, sms],
        "needs a rung after it to fall back to": [bot, gateway],
        "must be between 15 seconds and 1 hour": [
            C.LadderStep(channel=C.CHANNEL_TELEGRAM_GATEWAY, fallback_after=ttl(5)),
            sms,
        ],
    }
    for why, ladder in cases.items():
        failure = await refused(world.policy(ladder=ladder))
        assert failure.code.name == "INVALID_ARGUMENT"
        assert [(f, m[: len(why)]) for f, m in failure.field_violations] == [
            (f"policy.ladder[{0 if ladder[0].HasField('fallback_after') else 1}].fallback_after", why)
        ]
    await world.policy(ladder=FALLBACK)
    policy = await world.delivery.GetClientPolicy(delivery_pb2.GetClientPolicyRequest(client_id="shop"))
    assert policy.policy.ladder[1].fallback_after.seconds == 60


async def test_the_local_gateway_lets_a_revoke_or_a_delivery_win_never_both(world: World) -> None:
    token = sandbox_gateway_token()
    for _ in range(4):
        user, phone = await world.person()
        await world.online(user, False)
        sent = await world.gateway.send_verification_message(token, {"phone_number": phone, "code": "8642"})
        request = {"request_id": sent["request_id"]}
        revoked, _ = await asyncio.gather(
            world.gateway.revoke_verification_message(token, request), world.gateway.set_device_online(user, True)
        )
        assert revoked is True  # "received", whatever came of it, as Telegram answers
        status = (await world.gateway.check_verification_status(token, request))["delivery_status"]["status"]
        shown = await world.codes(user)
        assert (status, len(shown)) in (("revoked", 0), ("delivered", 1))


async def test_a_gateway_code_check_during_an_outage_uses_up_no_attempt(world: World) -> None:
    user, phone = await world.person()
    start = verification_pb2.StartVerificationRequest(
        client_id="shop", phone=phone, channel=C.CHANNEL_TELEGRAM_GATEWAY, gateway_code=True, code_length=5
    )
    started = (await world.verification.StartVerification(start)).verification
    code = re.search(r"\d{5}", (await world.codes(user))[0])
    assert code is not None
    check = verification_pb2.CheckVerificationRequest(client_id="shop", id=started.id, code=code.group())
    world.lossy.down = True
    for _ in range(6):  # more than its five attempts: none of them is used up
        failure = await refused(world.verification.CheckVerification(check))
        assert failure.code.name == "UNAVAILABLE" and failure.retry_after
    world.lossy.down = False
    get = verification_pb2.GetVerificationRequest(client_id="shop", id=started.id)
    pending = (await world.verification.GetVerification(get)).verification
    assert pending.status == C.VERIFICATION_STATUS_PENDING and pending.check_attempts_left == 5
    check.code = "00000" if code.group() != "00000" else "11111"
    assert (await world.verification.CheckVerification(check)).verification.check_attempts_left == 4
    check.code = code.group()
    assert (await world.verification.CheckVerification(check)).verification.status == C.VERIFICATION_STATUS_APPROVED

"""Routing with the real directory and bot gateway (sandbox Telegram): shared pool, own bots,
fallback to SMS, people who blocked a bot, Telegram rate limits, and the hold for re-confirmation."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.delivery.engine import Engine
from tests.integration.delivery.support import QUIET, engine_of, refused, ttl
from tests.support.stack import Stack, running_stack

SHARED = ["smsccode_bot", "smsc_code_bot", "smscodes_bot"]
_ids = itertools.count(random.randrange(10**8, 9 * 10**8), 17)
_numbers = itertools.count(random.randrange(10**6, 9 * 10**6))


def new_phone() -> str:
    return f"+7999{next(_numbers) % 10**7:07d}"


@dataclass
class World:
    stack: Stack
    delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub
    sms: delivery_pb2_grpc.SmsSandboxServiceAsyncStub
    bots: botgateway_pb2_grpc.BotGatewayServiceAsyncStub
    telegram: telegramsim_pb2_grpc.SandboxServiceAsyncStub
    engine: Engine

    async def person(self, *bots: str) -> tuple[int, str]:
        user_id, phone = next(_ids), new_phone()
        await self.telegram.CreateSandboxUser(
            telegramsim_pb2.CreateSandboxUserRequest(
                user=telegramsim_pb2.SandboxUser(user_id=user_id, first_name="T", language_code="en", phone=phone)
            )
        )
        for i, bot in enumerate(bots):
            await self.telegram.StartBot(telegramsim_pb2.StartBotRequest(user_id=user_id, bot_id=bot))
            if i == 0:
                await self.telegram.ShareContact(telegramsim_pb2.ShareContactRequest(user_id=user_id, bot_id=bot))
        return user_id, phone

    async def chat(self, user_id: int, bot: str) -> list[str]:
        reply = await self.telegram.ListChatMessages(
            telegramsim_pb2.ListChatMessagesRequest(user_id=user_id, bot_id=bot)
        )
        return [m.text for m in reply.messages if m.from_bot]

    async def policy(self, client_id: str, **fields: object) -> None:
        await self.delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id=client_id, **fields),  # type: ignore[arg-type]
                update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
            )
        )

    async def send(self, phone: str, text: str, **fields: object) -> common_pb2.Message:
        request = delivery_pb2.SendMessageRequest(
            client_id=str(fields.pop("client_id", "shop")), phone=phone, text=text
        )
        for name, value in fields.items():
            if name == "ttl":
                request.ttl.CopyFrom(value)  # type: ignore[arg-type]
            else:
                setattr(request, name, value)
        return (await self.delivery.SendMessage(request)).message


def world_of(stack: Stack) -> World:
    d, b = stack.channel("delivery"), stack.channel("botgateway")
    return World(
        stack,
        delivery_pb2_grpc.DeliveryServiceStub(d),  # type: ignore[arg-type]
        delivery_pb2_grpc.SmsSandboxServiceStub(d),  # type: ignore[arg-type]
        botgateway_pb2_grpc.BotGatewayServiceStub(b),  # type: ignore[arg-type]
        telegramsim_pb2_grpc.SandboxServiceStub(stack.channel("telegramsim")),  # type: ignore[arg-type]
        engine_of(stack),
    )


def overrides(**extra: str) -> dict[str, str]:
    return {**QUIET, "OTPGATE_SHARED_BOTS": ",".join(SHARED), **extra}


@pytest.fixture
async def world(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[World]:
    async with running_stack(
        mongo_client, keyring, ["directory", "botgateway", "delivery"], overrides=overrides(), clock=clock
    ) as stack:
        yield world_of(stack)


async def test_shared_pool_uses_the_bot_the_person_is_connected_to_preferring_the_named_one(world: World) -> None:
    user, phone = await world.person("smsc_code_bot")
    via_pool = await world.send(phone, "Code 1111", bot="smscodes_bot")
    assert via_pool.status == common_pb2.MESSAGE_STATUS_SENT and via_pool.bot_id == "smsc_code_bot"
    assert via_pool.channel == common_pb2.CHANNEL_TELEGRAM
    assert "Code 1111" in await world.chat(user, "smsc_code_bot")
    # Connected to two shared bots: the named one wins; without a name any connected one.
    await world.telegram.StartBot(telegramsim_pb2.StartBotRequest(user_id=user, bot_id="smsccode_bot"))
    named = await world.send(phone, "Code 2222", bot="smsccode_bot")
    assert named.bot_id == "smsccode_bot" and "Code 2222" in await world.chat(user, "smsccode_bot")
    anyone = await world.send(phone, "Code 3333")
    assert anyone.status == common_pb2.MESSAGE_STATUS_SENT and anyone.bot_id in {"smsccode_bot", "smsc_code_bot"}
    usage = await world.delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="shop"))
    assert [(r.channel, r.messages, r.billed_sms) for r in usage.records] == [(common_pb2.CHANNEL_TELEGRAM, 3, 0)]


async def test_own_bot_only_for_its_owner_and_only_through_that_bot(world: World) -> None:
    own = (
        await world.bots.RegisterBot(
            botgateway_pb2.RegisterBotRequest(token="6001002003:AAE-own-bot", owner_client_id="shop")
        )
    ).bot
    user, phone = await world.person("smscodes_bot")
    # Connected to a shared bot only: the own bot cannot carry it.
    not_connected = await world.send(phone, "Own 1", bot=own.id)
    assert not_connected.status == common_pb2.MESSAGE_STATUS_FAILED
    assert not_connected.failure_reason == common_pb2.FAILURE_REASON_NOT_CONNECTED
    # The person starts the own bot: known already, linked at once, no new contact.
    await world.telegram.StartBot(telegramsim_pb2.StartBotRequest(user_id=user, bot_id=own.id))
    sent = await world.send(phone, "Own 2", bot=own.id)
    assert sent.status == common_pb2.MESSAGE_STATUS_SENT and sent.bot_id == own.id
    assert "Own 2" in await world.chat(user, own.id)
    assert "Own 2" not in await world.chat(user, "smscodes_bot")
    # Another client cannot name it; it looks like an unknown bot.
    failure = await refused(world.send(phone, "x", bot=own.id, client_id="bank"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "BOT_NOT_FOUND")
    failure = await refused(world.send(phone, "x", bot="no_such_bot"))
    assert failure.reason == "BOT_NOT_FOUND"
    # Shared traffic never goes through a client's own bot.
    shared = await world.send(phone, "Shared")
    assert shared.bot_id == "smscodes_bot"
    # Confirmation SMS are billed to the client only for its own bot.
    for bot in (own.id, "smscodes_bot"):
        await world.send(
            phone,
            "Code 5555",
            channel=common_pb2.CHANNEL_SMS,
            purpose=delivery_pb2.MESSAGE_PURPOSE_CONFIRMATION,
            bot=bot,
        )
    usage = await world.delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="shop"))
    sms = [r for r in usage.records if r.channel == common_pb2.CHANNEL_SMS]
    assert [(r.messages, r.billed_sms) for r in sms] == [(2, 1)]


async def test_not_connected_falls_back_to_sms_only_when_allowed(world: World) -> None:
    phone = new_phone()
    failed = await world.send(phone, "No bot")
    assert failed.status == common_pb2.MESSAGE_STATUS_FAILED
    assert failed.failure_reason == common_pb2.FAILURE_REASON_NOT_CONNECTED
    fallback = await world.send(phone, "By SMS", sms_fallback=True)
    assert fallback.status == common_pb2.MESSAGE_STATUS_DELIVERED and fallback.channel == common_pb2.CHANNEL_SMS
    inbox = await world.sms.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone=phone))
    assert [m.text for m in inbox.messages] == ["By SMS"]
    # The policy default applies too; TELEGRAM-only requests never fall back.
    await world.policy("shop", sms_fallback=True)
    assert (await world.send(phone, "Policy")).channel == common_pb2.CHANNEL_SMS
    telegram_only = await world.send(phone, "TG", channel=common_pb2.CHANNEL_TELEGRAM)
    assert telegram_only.status == common_pb2.MESSAGE_STATUS_FAILED
    # An SMS leg decided by routing is refused up front when the fraud guard says no.
    await world.policy("shop", sms_countries=["DE"], sms_countries_any=False)
    failure = await refused(world.send(new_phone(), "Nope"))
    assert failure.reason == "SMS_NOT_ALLOWED"


async def test_a_person_who_blocked_the_bot_fails_with_blocked_by_user(world: World) -> None:
    user, phone = await world.person("smscodes_bot")
    await world.telegram.SetBotBlocked(
        telegramsim_pb2.SetBotBlockedRequest(user_id=user, bot_id="smscodes_bot", blocked=True)
    )
    blocked = await world.send(phone, "Hello")
    assert blocked.status == common_pb2.MESSAGE_STATUS_FAILED
    assert blocked.failure_reason == common_pb2.FAILURE_REASON_BLOCKED_BY_USER
    # Known blocked now: the next one fails without trying, or goes by SMS when allowed.
    by_sms = await world.send(phone, "Hello again", sms_fallback=True)
    assert by_sms.channel == common_pb2.CHANNEL_SMS and by_sms.status == common_pb2.MESSAGE_STATUS_DELIVERED


async def test_check_reachability(world: World) -> None:
    _, phone = await world.person("smscodes_bot")
    reach = await world.delivery.CheckReachability(delivery_pb2.CheckReachabilityRequest(client_id="shop", phone=phone))
    assert reach.reachable and reach.bot_id == "smscodes_bot" and not reach.confirmed
    assert not reach.confirmation_required
    await world.policy("shop", default_confirm_days=30)
    reach = await world.delivery.CheckReachability(delivery_pb2.CheckReachabilityRequest(client_id="shop", phone=phone))
    assert reach.confirmation_required
    nobody = await world.delivery.CheckReachability(
        delivery_pb2.CheckReachabilityRequest(client_id="shop", phone=new_phone())
    )
    assert not nobody.reachable and not nobody.bot_id


async def test_reachability_checks_are_rate_limited_per_client(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(
        mongo_client,
        keyring,
        ["directory", "botgateway", "delivery"],
        overrides=overrides(OTPGATE_DELIVERY_LIMIT_REACHABILITY="3/60"),
        clock=clock,
    ) as stack:
        world = world_of(stack)
        for _ in range(3):
            await world.delivery.CheckReachability(
                delivery_pb2.CheckReachabilityRequest(client_id="shop", phone=new_phone())
            )
        failure = await refused(
            world.delivery.CheckReachability(delivery_pb2.CheckReachabilityRequest(client_id="shop", phone=new_phone()))
        )
        assert failure.reason == "RATE_LIMITED" and failure.retry_after
        await world.delivery.CheckReachability(
            delivery_pb2.CheckReachabilityRequest(client_id="bank", phone=new_phone())
        )


async def test_held_message_expires_when_nobody_confirms(world: World, clock: ManualClock) -> None:
    user, phone = await world.person("smscodes_bot")
    await world.policy("shop", default_confirm_days=30)
    held = await world.send(phone, "Wait for me", ttl=ttl(300))
    assert held.status == common_pb2.MESSAGE_STATUS_HELD and held.bot_id == "smscodes_bot"
    assert "Wait for me" not in await world.chat(user, "smscodes_bot")
    # confirm_days=0 explicitly: no hold.
    direct = await world.send(phone, "Now", confirm_days=0)
    assert direct.status == common_pb2.MESSAGE_STATUS_SENT
    # A held message can be canceled; a sent one cannot.
    other = await world.send(phone, "Cancel me")
    assert other.status == common_pb2.MESSAGE_STATUS_HELD
    canceled = await world.delivery.CancelMessage(delivery_pb2.CancelMessageRequest(client_id="shop", id=other.id))
    assert canceled.message.status == common_pb2.MESSAGE_STATUS_CANCELED
    too_late = await refused(
        world.delivery.CancelMessage(delivery_pb2.CancelMessageRequest(client_id="shop", id=direct.id))
    )
    assert too_late.reason == "MESSAGE_NOT_CANCELABLE"
    clock.advance(301)
    got = await world.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=held.id))
    assert got.message.status == common_pb2.MESSAGE_STATUS_EXPIRED
    assert got.message.failure_reason == common_pb2.FAILURE_REASON_CONFIRMATION_TIMEOUT
    await world.engine.expire_due_once()
    released = await world.delivery.ReleaseHeldMessages(
        delivery_pb2.ReleaseHeldMessagesRequest(telegram_user_id=user, phone=phone)
    )
    assert released.released_count == 0
    assert "Wait for me" not in await world.chat(user, "smscodes_bot")


async def test_a_message_held_before_an_index_key_rotation_is_still_released(world: World, keyring: Keyring) -> None:
    user, phone = await world.person("smscodes_bot")
    await world.policy("shop", default_confirm_days=30)
    held = await world.send(phone, "Held across a rotation")
    assert held.status == common_pb2.MESSAGE_STATUS_HELD
    # As if held while k1 was the index key, before `otpgate keys rotate` recomputed it.
    older = keyring.blind_index("phone", phone, "k1")
    assert older != keyring.blind_index("phone", phone)
    await world.engine.store.messages.update_one({"_id": held.id}, {"$set": {"phone_index": older}})
    released = await world.delivery.ReleaseHeldMessages(
        delivery_pb2.ReleaseHeldMessagesRequest(telegram_user_id=user, phone=phone)
    )
    assert released.released_count == 1
    assert "Held across a rotation" in await world.chat(user, "smscodes_bot")


async def test_a_held_message_busy_at_release_is_released_when_called_again(world: World) -> None:
    user, phone = await world.person("smscodes_bot")
    await world.policy("shop", default_confirm_days=30)
    busy = await world.send(phone, "Busy at release")
    free = await world.send(phone, "Free at release")
    record = await world.engine.store.get(busy.id)
    assert record is not None
    # Another caller (the hold loop starting the confirmation again) holds one message's claim.
    claim = await world.engine.dispatcher.claim(record)
    assert claim is not None
    request = delivery_pb2.ReleaseHeldMessagesRequest(telegram_user_id=user, phone=phone)
    failure = await refused(world.delivery.ReleaseHeldMessages(request))
    assert failure.code == grpc.StatusCode.ABORTED and failure.reason == "HELD_MESSAGES_BUSY" and failure.retry_after
    chat = await world.chat(user, "smscodes_bot")
    assert "Free at release" in chat and "Busy at release" not in chat  # the rest went out at once
    await world.engine.dispatcher.claims.release(claim)
    again = await world.delivery.ReleaseHeldMessages(request)
    assert again.released_count == 1
    assert "Busy at release" in await world.chat(user, "smscodes_bot")
    got = await world.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=free.id))
    assert got.message.status == common_pb2.MESSAGE_STATUS_SENT


async def test_telegram_rate_limits_reschedule_and_the_dispatcher_sends_later(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    # The gateway's buckets run on real time: one message per chat per 0.5 s; delivery gives one
    # bot send 0.6 s (rate-limit wait included), then reschedules after the RetryInfo.
    extra = {
        "OTPGATE_DELIVERY_LIMIT_PHONE_SHORT": "100/600",
        "OTPGATE_BOTGATEWAY_CHAT_BURST": "1",
        "OTPGATE_BOTGATEWAY_CHAT_RATE": "2",
        "OTPGATE_DELIVERY_BOT_SEND_TIMEOUT": "0.6",
    }
    async with running_stack(
        mongo_client, keyring, ["directory", "botgateway", "delivery"], overrides=overrides(**extra), clock=clock
    ) as stack:
        world = world_of(stack)
        user, phone = await world.person("smscodes_bot")
        sent = await asyncio.gather(*[world.send(phone, f"m{i}") for i in range(4)])
        queued = [m for m in sent if m.status == common_pb2.MESSAGE_STATUS_QUEUED]
        assert queued and all(
            m.status in (common_pb2.MESSAGE_STATUS_SENT, common_pb2.MESSAGE_STATUS_QUEUED) for m in sent
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len([t for t in await world.chat(user, "smscodes_bot") if t.startswith("m")]) < 4:
            assert loop.time() < deadline
            clock.advance(2)
            await world.engine.dispatch_due_once()
            await asyncio.sleep(0.1)
        assert sorted(t for t in await world.chat(user, "smscodes_bot") if t.startswith("m")) == [
            "m0",
            "m1",
            "m2",
            "m3",
        ]
        again = await world.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=queued[0].id))
        assert again.message.status == common_pb2.MESSAGE_STATUS_SENT and again.message.attempts >= 2


async def test_hold_then_confirm_by_sms_code_then_release(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: Any
) -> None:
    async with running_stack(
        mongo_client,
        keyring,
        ["directory", "botgateway", "verification", "delivery"],
        overrides=overrides(),
        clock=clock,
    ) as stack:
        world = world_of(stack)
        user, phone = await world.person("smscodes_bot")
        await world.policy("shop", default_confirm_days=30)
        held = await world.send(phone, "The secret notice")
        assert held.status == common_pb2.MESSAGE_STATUS_HELD
        # Verification sent the code by SMS (through delivery) and a prompt through the bot.
        inbox = await world.sms.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone=phone))
        assert len(inbox.messages) == 1
        code = "".join(ch for ch in inbox.messages[0].text if ch.isdigit())
        chat = await world.chat(user, "smscodes_bot")
        assert "The secret notice" not in chat and len(chat) >= 3
        # Confirmation SMS for a shared bot are free for the client.
        usage = await world.delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="shop"))
        assert all(r.billed_sms == 0 for r in usage.records)
        # The person types the code to the bot: confirmed, the held message goes out.
        await world.telegram.SendText(telegramsim_pb2.SendTextRequest(user_id=user, bot_id="smscodes_bot", text=code))
        await stack.app("verification").confirmer.drain()  # the release follows the bot's answer
        got = await world.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=held.id))
        assert got.message.status == common_pb2.MESSAGE_STATUS_SENT and got.message.bot_id == "smscodes_bot"
        assert "The secret notice" in await world.chat(user, "smscodes_bot")
        # Confirmed now: the next message is not held.
        assert (await world.send(phone, "Next")).status == common_pb2.MESSAGE_STATUS_SENT
        logs = captured_logs.text()
        assert phone not in logs and phone.lstrip("+") not in logs and f'"{code}"' not in logs


async def test_confirmation_messages_are_never_held_and_metrics_count_them(world: World) -> None:
    from prometheus_client import REGISTRY

    labels = {"status": "SENT", "channel": "TELEGRAM", "bot": "smscodes_bot"}
    before = REGISTRY.get_sample_value("otpgate_messages_total", labels) or 0.0
    user, phone = await world.person("smscodes_bot")
    await world.policy("shop", default_confirm_days=30)
    prompt = await world.send(
        phone,
        "Type the code you got by SMS",
        purpose=delivery_pb2.MESSAGE_PURPOSE_CONFIRMATION,
        channel=common_pb2.CHANNEL_TELEGRAM,
        bot="smscodes_bot",
    )
    assert prompt.status == common_pb2.MESSAGE_STATUS_SENT and prompt.confirm_days == 0
    assert "Type the code you got by SMS" in await world.chat(user, "smscodes_bot")
    assert (REGISTRY.get_sample_value("otpgate_messages_total", labels) or 0.0) == before + 1


async def test_a_held_message_fails_when_its_confirmation_sms_is_refused(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    # SMS are offered only to Germany: the confirmation SMS to a Russian number is refused.
    async with running_stack(
        mongo_client,
        keyring,
        ["directory", "botgateway", "verification", "delivery"],
        overrides=overrides(OTPGATE_DELIVERY_SMS_COUNTRIES="DE"),
        clock=clock,
    ) as stack:
        world = world_of(stack)
        user, phone = await world.person("smscodes_bot")
        await world.policy("shop", default_confirm_days=30)
        held = await world.send(phone, "Never shown")
        assert held.status == common_pb2.MESSAGE_STATUS_FAILED
        assert held.failure_reason == common_pb2.FAILURE_REASON_SMS_NOT_ALLOWED
        assert "Never shown" not in await world.chat(user, "smscodes_bot")


async def test_a_rate_limited_bot_hands_the_message_to_another_shared_bot_of_the_person(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    # Two messages per chat, then one per 100 s (real time): the bot's replies while the person
    # connects use up the first chat; the second bot has one left.
    extra = {
        "OTPGATE_BOTGATEWAY_CHAT_BURST": "2",
        "OTPGATE_BOTGATEWAY_CHAT_RATE": "0.01",
        "OTPGATE_DELIVERY_BOT_SEND_TIMEOUT": "0.3",
    }
    async with running_stack(
        mongo_client, keyring, ["directory", "botgateway", "delivery"], overrides=overrides(**extra), clock=clock
    ) as stack:
        world = world_of(stack)
        user, phone = await world.person("smscodes_bot", "smsccode_bot")
        moved = await world.send(phone, "Moved", bot="smscodes_bot")
        assert moved.status == common_pb2.MESSAGE_STATUS_SENT and moved.bot_id == "smsccode_bot"
        assert moved.attempts == 2
        assert "Moved" in await world.chat(user, "smsccode_bot")
        # Both exhausted: rescheduled, not failed.
        waiting = await world.send(phone, "Later", bot="smscodes_bot")
        assert waiting.status == common_pb2.MESSAGE_STATUS_QUEUED


async def test_a_bot_send_of_unknown_outcome_is_repeated_through_the_same_bot_only(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    """Telegram is slow to make a message: delivery's call times out with the outcome unknown, so the
    message is pinned to that bot and person. The person blocks that bot meanwhile (routing would now
    pick their other bot), yet every retry goes to the same bot, and once Telegram has made the
    message it is SENT through that bot: one copy, none through the other bot, none by SMS."""
    extra = {"OTPGATE_DELIVERY_BOT_SEND_TIMEOUT": "0.5"}
    async with running_stack(
        mongo_client, keyring, ["directory", "botgateway", "delivery"], overrides=overrides(**extra), clock=clock
    ) as stack:
        world = world_of(stack)
        telegram = stack.app("telegramsim").telegram
        user, phone = await world.person("smscodes_bot", "smsccode_bot")
        made = asyncio.Event()
        add_message = telegram.store.add_message

        async def slowly(message: Any, seq: int) -> None:
            if message.text == "Code 1":
                await made.wait()
            await add_message(message, seq=seq)

        telegram.store.add_message = slowly
        sent = await world.send(phone, "Code 1", bot="smscodes_bot", sms_fallback=True)
        assert sent.status == common_pb2.MESSAGE_STATUS_QUEUED
        record = await world.engine.store.get(sent.id)
        assert record is not None and record.bot_pinned and record.bot_id == "smscodes_bot"

        await world.telegram.SetBotBlocked(
            telegramsim_pb2.SetBotBlockedRequest(user_id=user, bot_id="smscodes_bot", blocked=True)
        )
        directory = directory_pb2_grpc.DirectoryServiceStub(stack.channel("directory"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (
            "smscodes_bot"
            not in (await directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=phone))).blocked_bot_ids
        ):
            assert loop.time() < deadline, "the block never reached the directory"
            await asyncio.sleep(0.05)

        clock.advance(5)
        assert await world.engine.dispatch_due_once() == 1  # the repeat waits for the send in flight
        record = await world.engine.store.get(sent.id)
        assert record is not None and record.status == common_pb2.MESSAGE_STATUS_QUEUED and record.bot_pinned

        made.set()
        deadline = loop.time() + 20
        while True:  # a loaded machine may need more than one try of 0.5 s
            clock.advance(5)
            await world.engine.dispatch_due_once()
            final = await world.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=sent.id))
            if final.message.status != common_pb2.MESSAGE_STATUS_QUEUED:
                break
            assert loop.time() < deadline, "the pinned message was never sent"
        assert final.message.status == common_pb2.MESSAGE_STATUS_SENT
        assert (final.message.bot_id, final.message.channel) == ("smscodes_bot", common_pb2.CHANNEL_TELEGRAM)
        assert (await world.chat(user, "smscodes_bot")).count("Code 1") == 1
        assert "Code 1" not in await world.chat(user, "smsccode_bot")
        assert not (await world.sms.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone=phone))).messages

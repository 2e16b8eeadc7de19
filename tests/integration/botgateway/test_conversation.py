"""Conversations end to end: sandbox Telegram user -> gateway -> real directory, over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from otpgate.botgateway.v1 import botgateway_pb2
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2
from otpgate.telegramsim.v1 import telegramsim_pb2

from services.core.clock import ManualClock
from services.core.errors import parse_rpc_error
from services.core.phone import mask_phone
from tests.conftest import LogCapture
from tests.integration.botgateway.conftest import Gw, new_phone

B = botgateway_pb2
S = telegramsim_pb2


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    failure = parse_rpc_error(err.value)
    return failure.code, failure.reason


async def send(gw: Gw, user_id: int, bot: str = "smscodes_bot", **kw: object) -> B.SendBotMessageResponse:
    return await gw.bots.SendBotMessage(
        B.SendBotMessageRequest(bot_id=bot, telegram_user_id=user_id, text=str(kw.pop("text", "Code 1234")), **kw)  # type: ignore[arg-type]
    )


async def renew(gw: Gw) -> None:
    """What the lease loop does every few seconds; time here moves only by the manual clock."""
    assert gw.app.sessions is not None
    await gw.app.sessions.tick()


async def links(gw: Gw, user_id: int) -> dict[str, int]:
    reply = await gw.directory.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=user_id))
    return {link.bot_id: link.status for link in reply.subscriber.bot_links}


async def test_new_person_connects_by_sharing_own_contact(gw: Gw, captured_logs: LogCapture) -> None:
    user = await gw.user("en")
    started = await gw.sandbox.StartBot(
        S.StartBotRequest(user_id=user.user_id, bot_id="smscodes_bot", payload="shop42")
    )
    assert len(started.replies) == 1
    assert started.replies[0].request_contact and "share your phone number" in started.replies[0].text

    shared = await gw.sandbox.ShareContact(S.ShareContactRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    assert shared.replies[0].text == f"Thanks! Codes for {mask_phone(user.phone)} will come to this chat."
    resolved = await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=user.phone))
    assert resolved.found and resolved.telegram_user_id == user.user_id
    assert list(resolved.connected_bot_ids) == ["smscodes_bot"]

    sent = await send(gw, user.user_id, text="Your code: 481516", protect_content=True, silent=True)
    chat = await gw.sandbox.ListChatMessages(
        S.ListChatMessagesRequest(user_id=user.user_id, bot_id="smscodes_bot", after_message_id=0)
    )
    last = chat.messages[-1]
    assert (last.bot_message_id, last.text, last.from_bot) == (sent.telegram_message_id, "Your code: 481516", True)
    assert last.protect_content and last.silent
    logs = captured_logs.text()
    assert user.phone not in logs and user.phone.lstrip("+") not in logs and "481516" not in logs


async def test_foreign_and_forwarded_contacts_are_refused(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    other_phone = new_phone()
    foreign = await gw.sandbox.ShareContact(
        S.ShareContactRequest(user_id=user.user_id, bot_id="smscodes_bot", phone=other_phone)
    )
    assert "not your own contact" in foreign.replies[0].text and foreign.replies[0].request_contact
    forwarded = await gw.sandbox.ShareContact(
        S.ShareContactRequest(user_id=user.user_id, bot_id="smscodes_bot", forwarded=True)
    )
    assert "not your own contact" in forwarded.replies[0].text
    for phone in (other_phone, user.phone):
        resolved = await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=phone))
        assert not resolved.found


async def test_known_person_is_linked_at_once_on_a_second_bot(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.connect(user, "smscodes_bot")
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id="smsc_code_bot"))
    assert [r.text for r in started.replies] == [
        f"You're connected. Codes for {mask_phone(user.phone)} will come to this chat."
    ]
    assert not started.replies[0].request_contact
    assert await links(gw, user.user_id) == {
        "smscodes_bot": common_pb2.BOT_LINK_STATUS_CONNECTED,
        "smsc_code_bot": common_pb2.BOT_LINK_STATUS_CONNECTED,
    }
    await send(gw, user.user_id, bot="smsc_code_bot")


async def test_number_change_unlinks_the_old_number(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    old = user.phone
    new = new_phone()
    await gw.sandbox.CreateSandboxUser(
        S.CreateSandboxUserRequest(
            user=S.SandboxUser(user_id=user.user_id, first_name="Test", language_code="en", phone=new)
        )
    )
    shared = await gw.sandbox.ShareContact(S.ShareContactRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    assert shared.replies[0].text == f"Your number is now {mask_phone(new)}. The previous number was unlinked."
    assert not (await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=old))).found
    assert (
        await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=new))
    ).telegram_user_id == user.user_id


async def test_stop_then_start_again(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    stopped = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/stop"))
    assert "will not send you messages" in stopped.replies[0].text
    assert (await links(gw, user.user_id))["smscodes_bot"] == common_pb2.BOT_LINK_STATUS_STOPPED
    assert await refused(send(gw, user.user_id)) == (grpc.StatusCode.FAILED_PRECONDITION, "LINK_STOPPED")
    await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    assert (await links(gw, user.user_id))["smscodes_bot"] == common_pb2.BOT_LINK_STATUS_CONNECTED
    await send(gw, user.user_id)


async def test_blocking_the_bot(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    await gw.sandbox.SetBotBlocked(S.SetBotBlockedRequest(user_id=user.user_id, bot_id="smscodes_bot", blocked=True))
    assert (await links(gw, user.user_id))["smscodes_bot"] == common_pb2.BOT_LINK_STATUS_BLOCKED
    assert await refused(send(gw, user.user_id)) == (grpc.StatusCode.FAILED_PRECONDITION, "BLOCKED_BY_USER")
    # Unblocking and pressing Start reconnects.
    await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    assert (await links(gw, user.user_id))["smscodes_bot"] == common_pb2.BOT_LINK_STATUS_CONNECTED
    await send(gw, user.user_id)


async def test_blocked_discovered_when_sending_updates_the_directory(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    bot = gw.telegram.bot("smscodes_bot")
    gw.telegram.chats[(bot.telegram_id, user.user_id)].blocked = True  # blocked without the update reaching us
    assert await refused(send(gw, user.user_id)) == (grpc.StatusCode.FAILED_PRECONDITION, "BLOCKED_BY_USER")
    for _ in range(100):  # the directory is told in the background
        if (await links(gw, user.user_id))["smscodes_bot"] == common_pb2.BOT_LINK_STATUS_BLOCKED:
            break
        await asyncio.sleep(0.02)
    assert (await links(gw, user.user_id))["smscodes_bot"] == common_pb2.BOT_LINK_STATUS_BLOCKED


async def test_forget_needs_confirmation(gw: Gw) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    ask = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/forget"))
    assert "Send /confirm within 5 minutes" in ask.replies[0].text
    canceled = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="no"))
    assert canceled.replies[0].text == "Canceled: nothing was erased."
    assert (await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=user.phone))).found

    await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/forget"))
    done = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/confirm"))
    assert done.replies[0].text.startswith("Your data was erased.")
    assert not (await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=user.phone))).found
    assert await refused(send(gw, user.user_id)) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_CONNECTED")


async def test_forget_confirmation_expires(gw: Gw, clock: ManualClock) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/forget"))
    clock.advance(301)
    await renew(gw)
    late = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/confirm"))
    assert late.replies[0].text == "Canceled: nothing was erased."
    assert (await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=user.phone))).found


async def test_russian_speaker_gets_russian_texts_and_help(gw: Gw) -> None:
    user = await gw.user("ru-RU")
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    assert "Нажмите кнопку ниже" in started.replies[0].text
    shared = await gw.sandbox.ShareContact(S.ShareContactRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    assert shared.replies[0].text.startswith("Спасибо!")
    helped = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="/help"))
    assert "/forget" in helped.replies[0].text and "Этот бот" in helped.replies[0].text
    other = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="привет"))
    assert other.replies[0].text.startswith("Я только доставляю коды")


async def test_send_refusals(gw: Gw) -> None:
    user = await gw.user("en")
    assert await refused(send(gw, user.user_id)) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_CONNECTED")
    assert await refused(send(gw, user.user_id, bot="nobody_bot")) == (grpc.StatusCode.NOT_FOUND, "BOT_NOT_FOUND")
    code, _ = await refused(send(gw, 0, text=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await gw.connect(user)
    await gw.sandbox.CreateSandboxUser(
        S.CreateSandboxUserRequest(
            user=S.SandboxUser(user_id=user.user_id, language_code="en", phone=user.phone, deactivated=True)
        )
    )
    assert await refused(send(gw, user.user_id)) == (grpc.StatusCode.FAILED_PRECONDITION, "USER_DEACTIVATED")


async def test_delete_after_is_persisted_and_executed(gw: Gw, clock: ManualClock) -> None:
    user = await gw.user("en")
    await gw.connect(user)
    sent = await send(gw, user.user_id, text="Code 777111", delete_after=Duration(seconds=60))
    assert gw.app.gateway is not None
    assert await gw.app.gateway.delete_due() == 0  # not due yet
    clock.advance(61)
    await renew(gw)
    assert await gw.app.gateway.delete_due() == 1
    message = await gw.telegram.bot_message(gw.telegram.bot("smscodes_bot"), sent.telegram_message_id)
    assert message is not None and message.deleted and message.text == ""
    assert await gw.app.gateway.store.pending_deletions("smscodes_bot") == 0


async def test_sandbox_user_actions_are_checked(gw: Gw) -> None:
    user = await gw.user("en")
    code, reason = await refused(
        gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="hi"))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHAT_NOT_STARTED")
    code, reason = await refused(gw.sandbox.StartBot(S.StartBotRequest(user_id=1, bot_id="smscodes_bot")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")

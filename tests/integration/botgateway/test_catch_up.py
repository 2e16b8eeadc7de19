"""Nothing a person sends is lost: the gateway keeps each bot's handled update state, catches up after
being away, hands bots over between replicas without loss or repeats, and never answers twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from otpgate.botgateway.v1 import botgateway_pb2
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2
from otpgate.telegramsim.v1 import telegramsim_pb2
from prometheus_client import REGISTRY

from services.botgateway.gateway import Gateway
from services.core.phone import mask_phone
from tests.integration.botgateway.conftest import Gw

S = telegramsim_pb2
BOT = "smscodes_bot"


async def chat(gw: Gw, user_id: int, bot: str = BOT) -> list[telegramsim_pb2.ChatMessage]:
    reply = await gw.sandbox.ListChatMessages(S.ListChatMessagesRequest(user_id=user_id, bot_id=bot))
    return list(reply.messages)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """What a bot does after catching up happens in its own time: wait for it, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def replayed(bot: str = BOT) -> float:
    return REGISTRY.get_sample_value("otpgate_bot_updates_replayed_total", {"bot": bot}) or 0.0


async def stop_bot(gw: Gw, bot: str = BOT) -> None:
    """The bot's session ends on this gateway (a restart, a redeploy): Telegram sees it offline."""
    assert gw.app.sessions is not None
    await gw.app.sessions.stop_bot(bot)
    assert gw.telegram.connected_sessions(bot) == []


async def start_again(gw: Gw) -> None:
    assert gw.app.sessions is not None
    await gw.app.sessions.tick()
    assert gw.app.sessions.live(BOT)


async def test_a_person_who_starts_and_shares_while_the_bot_is_down_gets_answers_when_it_is_back(gw: Gw) -> None:
    user = await gw.user("en")
    await stop_bot(gw)
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id=BOT))
    shared = await gw.sandbox.ShareContact(S.ShareContactRequest(user_id=user.user_id, bot_id=BOT))
    assert list(started.replies) == [] and list(shared.replies) == []  # nobody answers yet

    await start_again(gw)

    async def answered() -> bool:
        return len([m for m in await chat(gw, user.user_id) if m.from_bot]) == 2

    await until(answered)
    ask, thanks = [m for m in await chat(gw, user.user_id) if m.from_bot]
    assert ask.request_contact and "share your phone number" in ask.text
    assert thanks.text == f"Thanks! Codes for {mask_phone(user.phone)} will come to this chat."
    resolved = await gw.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=user.phone))
    assert resolved.found and list(resolved.connected_bot_ids) == [BOT]


async def test_a_crash_between_handling_and_keeping_the_state_sends_no_second_reply(gw: Gw) -> None:
    assert gw.app.gateway is not None
    user = await gw.user("en")
    await gw.connect(user)
    store = gw.app.gateway.store
    kept = await store.get_bot(BOT)
    assert kept is not None and kept.update_state is not None

    async def crashed(*_: Any) -> None:  # the process dies before the state reaches the database
        return None

    original = store.save_update_state
    store.save_update_state = crashed  # type: ignore[method-assign]
    helped = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id=BOT, text="/help"))
    assert len(helped.replies) == 1
    await stop_bot(gw)
    store.save_update_state = original  # type: ignore[method-assign]
    before = replayed()

    await start_again(gw)  # catches up from the old state: /help (and what came before) again

    async def caught_up() -> bool:
        ledger = gw.transport.client(BOT).ledger
        return ledger is not None and ledger.handled.pts == gw.telegram.state(gw.telegram.bot(BOT)).pts

    await until(caught_up)
    assert replayed() >= before + 1  # seen again, and recognised as handled
    bot_messages = [m.text for m in await chat(gw, user.user_id) if m.from_bot]
    assert len(bot_messages) == 3 and sum("/forget" in text for text in bot_messages) == 1  # start, contact, help


async def test_a_reply_that_failed_is_sent_again_without_deciding_again(gw: Gw) -> None:
    assert gw.app.gateway is not None
    gateway: Gateway = gw.app.gateway
    user = await gw.user("en")
    await gw.connect(user)
    decided: list[object] = []
    handle = gateway.conversation.handle

    async def counting(event: Any, language: str) -> Any:
        decided.append(event)
        return await handle(event, language)

    gateway.conversation.handle = counting  # type: ignore[method-assign]
    send = gateway._send
    failures = [RuntimeError("connection lost mid-reply")]

    async def flaky(*args: Any, **kwargs: Any) -> int:
        if failures:
            raise failures.pop()
        return await send(*args, **kwargs)

    gateway._send = flaky  # type: ignore[method-assign]
    reply = await gw.sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id=BOT, text="/help"))
    assert [m.text for m in reply.replies if "/forget" in m.text]  # answered (after the retry)
    assert len(decided) == 1  # the conversation ran once; the retry sent what it had decided
    assert sum("/forget" in m.text for m in await chat(gw, user.user_id) if m.from_bot) == 1


async def test_a_new_bot_answers_its_very_first_start(gw: Gw) -> None:
    registered = await gw.bots.RegisterBot(
        botgateway_pb2.RegisterBotRequest(token="6100200300:AAE-brand-new-bot", owner_client_id="shop")
    )
    bot = registered.bot.id
    assert gw.app.gateway is not None
    stored = await gw.app.gateway.store.get_bot(bot)
    assert stored is not None and stored.update_state is not None and stored.update_state.pts == 0
    user = await gw.user("en")
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id=bot))
    assert len(started.replies) == 1 and started.replies[0].request_contact


async def test_the_session_of_another_bot_is_refused_and_replaced(gw: Gw) -> None:
    assert gw.app.gateway is not None and gw.app.sessions is not None
    store = gw.app.gateway.store
    # A mix-up in the database: this bot gets the session of another bot (one that does not run
    # here: two connections on one key would end both with AUTH_KEY_DUPLICATED, as on Telegram).
    _, other_session, _ = await gw.transport.check_token("6100200311:AAE-some-other-bot")
    await stop_bot(gw)
    await store.save_session(BOT, other_session, gw.app.gateway.clock.now())
    refused = REGISTRY.get_sample_value("otpgate_bot_session_replacements_total", {"bot": BOT, "reason": "another_bot"})
    await start_again(gw)
    replaced = await store.get_bot(BOT)
    assert replaced is not None and replaced.session and replaced.session != other_session
    after = REGISTRY.get_sample_value("otpgate_bot_session_replacements_total", {"bot": BOT, "reason": "another_bot"})
    assert (after or 0) == (refused or 0) + 1
    user = await gw.user("en")
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id=BOT))
    assert started.replies and started.replies[0].request_contact  # answered by the right bot


async def test_changing_a_configured_bots_token_drops_its_old_session(gw: Gw) -> None:
    assert gw.app.gateway is not None and gw.app.registry is not None
    store = gw.app.gateway.store
    before = await store.get_bot(BOT)
    assert before is not None and before.session
    await gw.app.registry.ensure_config_bots([BOT], {BOT: "5999000111:a-reissued-token"}, sandbox=True)
    after = await store.get_bot(BOT)
    assert after is not None and after.token == "5999000111:a-reissued-token" and after.session == ""
    assert after.telegram_id == 5999000111


@pytest.mark.parametrize("bot", [BOT])
async def test_blocking_while_the_bot_is_down_reaches_the_directory_when_it_is_back(gw: Gw, bot: str) -> None:
    user = await gw.user("en")
    await gw.connect(user, bot)
    await stop_bot(gw, bot)
    await gw.sandbox.SetBotBlocked(S.SetBotBlockedRequest(user_id=user.user_id, bot_id=bot, blocked=True))
    await start_again(gw)

    async def blocked() -> bool:
        reply = await gw.directory.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=user.user_id))
        return any(
            link.bot_id == bot and link.status == common_pb2.BOT_LINK_STATUS_BLOCKED
            for link in reply.subscriber.bot_links
        )

    await until(blocked)


async def test_a_session_started_for_a_request_outlives_the_requests_deadline(gw: Gw, clock: Any) -> None:
    """SendBotMessage may start a bot's session on the spot (its lease lapsed). The session runs on
    after that request is answered: what it does later (handling a person's message, answering,
    writing its state) must not inherit the request's deadline, gRPC's or the database's."""
    user = await gw.user()
    await gw.connect(user)
    sessions = gw.app.sessions
    assert sessions is not None
    clock.advance(3600)  # this replica missed every renewal round
    await sessions.enforce_expiry()
    assert not sessions.live(BOT)
    request = botgateway_pb2.SendBotMessageRequest(bot_id=BOT, telegram_user_id=user.user_id, text="code 1")
    await gw.bots.SendBotMessage(request, timeout=1.0)
    assert sessions.live(BOT)
    await asyncio.sleep(1.2)  # that request's deadline is past
    request_text = S.SendTextRequest(user_id=user.user_id, bot_id=BOT, text="/help")
    reply = await gw.sandbox.SendText(request_text, timeout=15)
    assert len(reply.replies) == 1, "the person was not answered"

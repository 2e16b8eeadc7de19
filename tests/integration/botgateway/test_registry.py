"""The bot registry over gRPC: shared bots from config, clients' own bots by token."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from otpgate.botgateway.v1 import botgateway_pb2
from otpgate.telegramsim.v1 import telegramsim_pb2
from pymongo import AsyncMongoClient

from services.core.errors import parse_rpc_error
from services.core.mongo import Document
from tests.conftest import LogCapture
from tests.integration.botgateway.conftest import SHARED, Gw

B = botgateway_pb2
S = telegramsim_pb2
TOKEN = "6001002003:AAE-own-bot-secret_x"


async def failure(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    parsed = parse_rpc_error(err.value)
    return parsed.code, parsed.reason


async def test_shared_bots_from_config_are_listed(gw: Gw) -> None:
    listed = await gw.bots.ListBots(B.ListBotsRequest())
    assert [b.id for b in listed.bots] == sorted(SHARED)
    assert all(b.shared and not b.owner_client_id and b.username == b.id for b in listed.bots)
    got = await gw.bots.GetBot(B.GetBotRequest(bot_id="SMSCODES_BOT"))
    assert got.bot.id == "smscodes_bot" and got.bot.shared
    assert await failure(gw.bots.GetBot(B.GetBotRequest(bot_id="nope_bot"))) == (
        grpc.StatusCode.NOT_FOUND,
        "BOT_NOT_FOUND",
    )


async def test_register_own_bot_list_get_remove(
    gw: Gw, mongo_client: AsyncMongoClient[Document], captured_logs: LogCapture
) -> None:
    registered = await gw.bots.RegisterBot(B.RegisterBotRequest(token=TOKEN, owner_client_id="client-a"))
    bot = registered.bot
    assert (bot.id, bot.username, bot.shared, bot.owner_client_id) == (
        "sandbox6001002003_bot",
        "sandbox6001002003_bot",
        False,
        "client-a",
    )
    # Registering the same bot again is idempotent for its owner, refused for anyone else.
    again = await gw.bots.RegisterBot(B.RegisterBotRequest(token=TOKEN, owner_client_id="client-a"))
    assert again.bot.id == bot.id
    assert await failure(gw.bots.RegisterBot(B.RegisterBotRequest(token=TOKEN, owner_client_id="client-b"))) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "BOT_ALREADY_REGISTERED",
    )
    # The token is stored sealed, never in plaintext; and never logged.
    raw = await mongo_client[gw.stack.commons["botgateway"].database]["bots"].find_one({"_id": bot.id})
    assert raw is not None and TOKEN.encode() not in bytes(raw["token_sealed"]) and "token" not in raw
    assert TOKEN not in captured_logs.text() and TOKEN.split(":")[1] not in captured_logs.text()

    own = await gw.bots.ListBots(B.ListBotsRequest(owner_client_id="client-a"))
    assert bot.id in [b.id for b in own.bots]
    other = await gw.bots.ListBots(B.ListBotsRequest(owner_client_id="client-b"))
    assert bot.id not in [b.id for b in other.bots]

    # The bot runs at once: a person can start it and receive a message through it.
    user = await gw.user("en")
    await gw.connect(user, "smscodes_bot")
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id=bot.id))
    assert "You're connected" in started.replies[0].text
    await gw.bots.SendBotMessage(B.SendBotMessageRequest(bot_id=bot.id, telegram_user_id=user.user_id, text="hi"))

    # Only the owner removes it; to anyone else it looks unknown.
    assert await failure(gw.bots.RemoveBot(B.RemoveBotRequest(bot_id=bot.id, owner_client_id="client-b"))) == (
        grpc.StatusCode.NOT_FOUND,
        "BOT_NOT_FOUND",
    )
    await gw.bots.RemoveBot(B.RemoveBotRequest(bot_id=bot.id, owner_client_id="client-a"))
    assert await failure(gw.bots.GetBot(B.GetBotRequest(bot_id=bot.id))) == (
        grpc.StatusCode.NOT_FOUND,
        "BOT_NOT_FOUND",
    )
    assert await failure(
        gw.bots.SendBotMessage(B.SendBotMessageRequest(bot_id=bot.id, telegram_user_id=user.user_id, text="hi"))
    ) == (grpc.StatusCode.NOT_FOUND, "BOT_NOT_FOUND")


async def test_register_shared_bot_joins_the_pool(gw: Gw) -> None:
    registered = await gw.bots.RegisterBot(B.RegisterBotRequest(token="6009998887:pool-secret", shared=True))
    listed = await gw.bots.ListBots(B.ListBotsRequest(owner_client_id="anyone"))
    assert registered.bot.id in [b.id for b in listed.bots]
    assert await failure(gw.bots.RemoveBot(B.RemoveBotRequest(bot_id="smscodes_bot"))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "BOT_FROM_CONFIG",
    )
    await gw.bots.RemoveBot(B.RemoveBotRequest(bot_id=registered.bot.id))


async def test_register_refusals(gw: Gw) -> None:
    code, _ = await failure(gw.bots.RegisterBot(B.RegisterBotRequest(token="not a token", owner_client_id="c")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await failure(gw.bots.RegisterBot(B.RegisterBotRequest(token=TOKEN)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # neither an owner nor shared
    code, _ = await failure(gw.bots.RegisterBot(B.RegisterBotRequest(token=TOKEN, owner_client_id="c", shared=True)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await gw.bots.RegisterBot(B.RegisterBotRequest(token=TOKEN, owner_client_id="c"))
    # The same bot id with another secret does not log in.
    assert await failure(
        gw.bots.RegisterBot(B.RegisterBotRequest(token="6001002003:revoked", owner_client_id="c"))
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "BOT_TOKEN_INVALID")


async def test_list_pages(gw: Gw) -> None:
    for i in range(3):
        await gw.bots.RegisterBot(B.RegisterBotRequest(token=f"60100000{i}0:s{i}", owner_client_id="pager"))
    seen: list[str] = []
    token = ""
    while True:
        page = await gw.bots.ListBots(B.ListBotsRequest(owner_client_id="pager", page_size=2, page_token=token))
        assert len(page.bots) <= 2
        seen += [b.id for b in page.bots]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 6 and seen == sorted(seen)
    code, _ = await failure(gw.bots.ListBots(B.ListBotsRequest(page_token="@@@")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_reissued_token_replaces_the_stored_one(gw: Gw) -> None:
    first = await gw.bots.RegisterBot(B.RegisterBotRequest(token="6007007007:first", owner_client_id="client-r"))
    new_token = await gw.telegram.revoke_token(first.bot.id)
    assert await failure(
        gw.bots.RegisterBot(B.RegisterBotRequest(token="6007007007:first", owner_client_id="client-r"))
    ) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "BOT_TOKEN_INVALID",
    )
    again = await gw.bots.RegisterBot(B.RegisterBotRequest(token=new_token, owner_client_id="client-r"))
    assert again.bot.id == first.bot.id
    assert gw.app.gateway is not None and gw.app.sessions is not None
    stored = await gw.app.gateway.store.get_bot(first.bot.id)
    assert stored is not None and stored.token == new_token
    assert gw.app.sessions.live(first.bot.id)


async def test_a_bot_registered_answers_people_after_the_registering_call_is_over(gw: Gw) -> None:
    """RegisterBot starts the bot's session at once; the session is not the call's: it answers
    people once the call's deadline is long past."""
    registered = await gw.bots.RegisterBot(
        B.RegisterBotRequest(token="6001002004:AAE-later-secret", owner_client_id="client-a"), timeout=2.0
    )
    user = await gw.user()
    await asyncio.sleep(2.1)  # the registering call's deadline is past
    started = await gw.sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id=registered.bot.id), timeout=15)
    assert len(started.replies) == 1 and started.replies[0].request_contact

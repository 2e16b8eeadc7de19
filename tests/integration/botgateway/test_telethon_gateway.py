"""The gateway on the Telethon transport (network cut at Telethon's MTProto sender): a configured
bot logs in once and keeps its session, incoming Telethon updates store the access hash, and
SendBotMessage goes out as SendMessageRequest with Telegram's errors mapped to the contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from google.rpc import error_details_pb2
from pymongo import AsyncMongoClient
from telethon import errors
from telethon.tl import functions, types

from services.botgateway.app import BotGatewayApp, build_app, load_config
from services.botgateway.telethon_transport import TelethonTransport
from services.core.clock import ManualClock
from services.core.config import Env, load_common
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from tests.support.stack import _spec_of, _uri_of, stack_env
from tests.unit.botgateway.telethon_wire import FakeTelegramServer, client_factory

TOKEN = "5123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
BOT = "acme_codes_bot"
USER = 4343
HASH = -55667788


@pytest.fixture
async def telegram() -> FakeTelegramServer:
    return FakeTelegramServer(5123456789, "Acme_Codes_Bot", TOKEN)


@pytest.fixture
async def app(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, telegram: FakeTelegramServer
) -> AsyncIterator[BotGatewayApp]:
    env = stack_env(
        _uri_of(mongo_client),
        ",".join(_spec_of(keyring)),
        {
            "OTPGATE_SANDBOX": "false",
            "OTPGATE_SHARED_BOTS": BOT,
            "OTPGATE_BOT_TOKENS": f"{BOT}:{TOKEN}",
            "OTPGATE_TELEGRAM_API_ID": "12345",
            "OTPGATE_TELEGRAM_API_HASH": "0123456789abcdef0123456789abcdef",
        },
    )
    reader = Env(env, service="botgateway")
    common = load_common("botgateway", reader)
    config = load_config(reader)
    reader.check()
    transport = TelethonTransport(config.api_id, config.api_hash, factory=client_factory(telegram))
    built = await build_app(common, config, mongo_client, clock, transport=transport)
    try:
        yield built
    finally:
        for hook in built.on_stop:
            await hook()
        await mongo_client.drop_database(common.database)


def sends(telegram: FakeTelegramServer) -> list[functions.messages.SendMessageRequest]:
    return [r for r in telegram.requests if isinstance(r, functions.messages.SendMessageRequest)]


async def test_telethon_gateway_end_to_end(app: BotGatewayApp, telegram: FakeTelegramServer) -> None:
    assert app.sessions is not None and app.gateway is not None
    assert app.sessions.live(BOT) and telegram.login_count == 1
    stored = await app.gateway.store.get_bot(BOT)
    assert stored is not None and stored.session  # the StringSession, kept sealed

    # A restart reuses the stored session: no second bot login.
    await app.sessions.stop_bot(BOT)
    app.sessions.bots = {}
    await app.sessions.tick()
    assert app.sessions.live(BOT) and telegram.login_count == 1

    # The person writes /start: Telethon's update carries their access hash, which the gateway keeps.
    assert isinstance(app.gateway.transport, TelethonTransport)
    client = app.gateway.transport.client(BOT)
    before = len(sends(telegram))
    client._updates_queue.put_nowait(
        types.Updates(
            updates=[
                types.UpdateNewMessage(
                    message=types.Message(id=1, peer_id=types.PeerUser(USER), date=datetime.now(UTC), message="/help"),
                    pts=2,
                    pts_count=1,
                )
            ],
            users=[types.User(id=USER, access_hash=HASH, first_name="Ann", lang_code="ru")],
            chats=[],
            date=datetime.now(UTC),
            seq=0,
        )
    )
    for _ in range(200):
        if len(sends(telegram)) > before:
            break
        await asyncio.sleep(0.01)
    reply = sends(telegram)[-1]
    assert "Этот бот" in reply.message and reply.peer == types.InputPeerUser(user_id=USER, access_hash=HASH)
    peer = await app.gateway.store.get_peer(BOT, USER, fresh=True)
    assert peer is not None and peer.access_hash == HASH and peer.language_code == "ru"

    # SendBotMessage: protected and silent, addressed with the stored access hash.
    message_id = await app.gateway.send_bot_message(BOT, USER, "Code 246810", protect_content=True, silent=True)
    sent = sends(telegram)[-1]
    assert message_id == telegram.next_message_id and sent.noforwards and sent.silent
    assert sent.peer == types.InputPeerUser(user_id=USER, access_hash=HASH)

    async def refusal(error: Exception) -> ServiceError:
        def raise_it(request: object) -> object:
            raise error

        telegram.on_send = raise_it
        try:
            with pytest.raises(ServiceError) as raised:
                await app.gateway.send_bot_message(BOT, USER, "x", budget=5)  # type: ignore[union-attr]
        finally:
            telegram.on_send = None
        return raised.value

    assert (await refusal(errors.UserIsBlockedError(request=None))).reason == "BLOCKED_BY_USER"
    assert (await refusal(errors.PeerIdInvalidError(request=None))).reason == "NOT_CONNECTED"
    assert (await refusal(errors.InputUserDeactivatedError(request=None))).reason == "USER_DEACTIVATED"
    flood = await refusal(errors.FloodWaitError(request=None, capture=30))
    assert flood.reason == "FLOOD_WAIT" and flood.code.name == "RESOURCE_EXHAUSTED"
    retry = [d for d in flood.details if isinstance(d, error_details_pb2.RetryInfo)]
    assert retry and retry[0].retry_delay.seconds == 30
    # The bot is paused for 30 s: callers with less time are refused without a request to Telegram.
    count = len(sends(telegram))
    with pytest.raises(ServiceError) as paused:
        await app.gateway.send_bot_message(BOT, USER, "x", budget=5)
    assert paused.value.reason == "FLOOD_WAIT" and len(sends(telegram)) == count

"""The gateway in production mode (the Telethon transport, network cut at Telethon's MTProto sender,
facing the simulated Telegram's MTProto API in this process): a configured bot logs in once and keeps
its session, incoming updates store the access hash, and SendBotMessage goes out as SendMessageRequest
with Telegram's errors mapped to the contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from google.rpc import error_details_pb2
from pymongo import AsyncMongoClient
from telethon.tl import functions

from services.botgateway.app import BotGatewayApp, build_app, load_config
from services.botgateway.sandbox_link import sandbox_client_factory
from services.botgateway.telethon_transport import TelethonTransport
from services.core.clock import ManualClock
from services.core.config import Env, load_common
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from services.telegramsim.model import SandboxLimits
from services.telegramsim.mtproto import MtprotoEndpoint
from services.telegramsim.store import TelegramStore
from services.telegramsim.telegram import SimulatedTelegram
from tests.support.stack import _spec_of, _uri_of, stack_env
from tests.unit.botgateway.telethon_wire import LocalWire

TOKEN = "5123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
BOT = "acme_codes_bot"
USER = 4343


@dataclass
class Production:
    app: BotGatewayApp
    telegram: SimulatedTelegram
    wire: LocalWire


@pytest.fixture
async def production(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> AsyncIterator[Production]:
    env = stack_env(
        _uri_of(mongo_client),
        ",".join(_spec_of(keyring)),
        {
            "OTPGATE_SANDBOX": "false",
            "OTPGATE_SHARED_BOTS": BOT,
            "OTPGATE_BOT_TOKENS": f"{BOT}:{TOKEN}",
            "OTPGATE_TELEGRAM_API_ID": "12345",
            "OTPGATE_TELEGRAM_API_HASH": "0123456789abcdef0123456789abcdef",
            "OTPGATE_BOTGATEWAY_CHAT_BURST": "100",  # many sends to one person here: the limiter is tested elsewhere
        },
    )
    reader = Env(env, service="botgateway")
    common = load_common("botgateway", reader)
    config = load_config(reader)
    reader.check()
    limits = SandboxLimits(chat_burst=100)
    telegram = SimulatedTelegram(TelegramStore(mongo_client[f"{common.database}_telegram"], keyring), limits, clock)
    await telegram.load()
    await telegram.add_bot(BOT, TOKEN)
    wire = LocalWire(MtprotoEndpoint(telegram))
    transport = TelethonTransport(config.api_id, config.api_hash, factory=sandbox_client_factory(wire))
    built = await build_app(common, config, mongo_client, clock, transport=transport)
    try:
        yield Production(built, telegram, wire)
    finally:
        for hook in built.on_stop:
            await hook()
        await mongo_client.drop_database(common.database)
        await mongo_client.drop_database(f"{common.database}_telegram")


def sends(wire: LocalWire) -> list[functions.messages.SendMessageRequest]:
    return wire.sent(functions.messages.SendMessageRequest)


async def test_telethon_gateway_end_to_end(production: Production) -> None:
    app, telegram, wire = production.app, production.telegram, production.wire
    assert app.sessions is not None and app.gateway is not None
    logins = wire.sent(functions.auth.ImportBotAuthorizationRequest)
    assert app.sessions.live(BOT) and len(logins) == 1 and logins[0].api_id == 12345
    stored = await app.gateway.store.get_bot(BOT)
    assert stored is not None and stored.session and stored.update_state is not None  # kept sealed, with its state

    # A restart reuses the stored session: no second bot login.
    await app.sessions.stop_bot(BOT)
    app.sessions.bots = {}
    await app.sessions.tick()
    assert app.sessions.live(BOT) and len(wire.sent(functions.auth.ImportBotAuthorizationRequest)) == 1

    # The person writes /help: Telegram's update carries their access hash, which the gateway keeps.
    await telegram.create_user(USER, "Ann", "ru", "+79991234567")
    await telegram.start_bot(USER, BOT)
    await telegram.send_text(USER, BOT, "/help")
    reply = sends(wire)[-1]
    access_hash = telegram.access_hash(telegram.bot(BOT), USER)
    assert "Этот бот" in reply.message and (reply.peer.user_id, reply.peer.access_hash) == (USER, access_hash)
    peer = await app.gateway.store.get_peer(BOT, USER, fresh=True)
    assert peer is not None and peer.access_hash == access_hash and peer.language_code == "ru"

    # SendBotMessage: protected and silent, addressed with the stored access hash.
    message_id = (
        await app.gateway.send_bot_message(BOT, USER, "Code 246810", protect_content=True, silent=True)
    ).message_id
    sent = sends(wire)[-1]
    assert sent.noforwards and sent.silent and (sent.peer.user_id, sent.peer.access_hash) == (USER, access_hash)
    message = await telegram.bot_message(telegram.bot(BOT), message_id)
    assert message is not None and message.text == "Code 246810"

    async def refusal(error: tuple[int, str]) -> ServiceError:
        wire.script(functions.messages.SendMessageRequest, lambda request: error)
        try:
            with pytest.raises(ServiceError) as raised:
                await app.gateway.send_bot_message(BOT, USER, "x", budget=5)  # type: ignore[union-attr]
        finally:
            wire.script(functions.messages.SendMessageRequest, None)
        return raised.value

    outcomes = {
        (400, "USER_IS_BLOCKED"): ("FAILED_PRECONDITION", "BLOCKED_BY_USER"),
        (400, "PEER_ID_INVALID"): ("FAILED_PRECONDITION", "NOT_CONNECTED"),
        (400, "INPUT_USER_DEACTIVATED"): ("FAILED_PRECONDITION", "USER_DEACTIVATED"),
        (400, "USER_IS_BOT"): ("FAILED_PRECONDITION", "RECIPIENT_IS_BOT"),
        (400, "MESSAGE_TOO_LONG"): ("FAILED_PRECONDITION", "MESSAGE_TOO_LONG"),
        (403, "CHAT_WRITE_FORBIDDEN"): ("FAILED_PRECONDITION", "CHAT_WRITE_FORBIDDEN"),
        (400, "SOMETHING_ELSE"): ("UNAVAILABLE", "BOT_UNAVAILABLE"),
        # Telegram failed after taking it (and again on Telethon's own repeat): it may be sent.
        (500, "INTERNAL"): ("UNAVAILABLE", "SEND_OUTCOME_UNKNOWN"),
    }
    for error, (code, reason) in outcomes.items():
        failure = await refusal(error)
        assert (failure.code.name, failure.reason) == (code, reason), error
        # A refusal Telegram gave says it made no message; one of the gateway's own says nothing of it.
        assert failure.metadata.get("refused_by") == ("telegram" if code == "FAILED_PRECONDITION" else None), error

    flood = await refusal((420, "FLOOD_WAIT_30"))
    assert flood.reason == "FLOOD_WAIT" and flood.code.name == "RESOURCE_EXHAUSTED"
    retry = [d for d in flood.details if isinstance(d, error_details_pb2.RetryInfo)]
    assert retry and retry[0].retry_delay.seconds == 30
    # The bot is paused for 30 s: callers with less time are refused without a request to Telegram.
    count = len(sends(wire))
    with pytest.raises(ServiceError) as paused:
        await app.gateway.send_bot_message(BOT, USER, "x", budget=5)
    assert paused.value.reason == "FLOOD_WAIT" and len(sends(wire)) == count


async def test_peer_flood_pauses_the_bot_and_a_banned_bot_stops(production: Production) -> None:
    app, telegram, wire = production.app, production.telegram, production.wire
    assert app.gateway is not None and app.sessions is not None
    await telegram.create_user(USER, "Ann", "en", "+79991234567")
    await telegram.start_bot(USER, BOT)
    wire.script(functions.messages.SendMessageRequest, lambda request: (400, "PEER_FLOOD"))
    with pytest.raises(ServiceError) as flooded:
        await app.gateway.send_bot_message(BOT, USER, "x", budget=1)
    assert (flooded.value.code.name, flooded.value.reason) == ("RESOURCE_EXHAUSTED", "PEER_FLOOD")
    assert flooded.value.details and app.gateway.limiter.paused_for(BOT) > 30
    app.gateway.limiter._paused_until.pop(BOT, None)  # let it send again (the pause is tested above)
    wire.script(functions.messages.SendMessageRequest, lambda request: (401, "USER_DEACTIVATED_BAN"))
    with pytest.raises(ServiceError) as banned:
        await app.gateway.send_bot_message(BOT, USER, "x", budget=1)
    assert (banned.value.code.name, banned.value.reason) == ("FAILED_PRECONDITION", "BOT_BANNED")
    for _ in range(100):
        if not app.gateway.transport.running(BOT):
            break
        await asyncio.sleep(0.01)
    assert not app.gateway.transport.running(BOT)  # the session ended; the next round logs in again


async def test_a_send_repeated_with_its_request_id_reaches_the_person_once(production: Production) -> None:
    """The answer to a send is lost after Telegram made the message: the caller hears that the outcome
    is unknown, repeats it with the same request_id, and gets the message Telegram made (one in the
    chat); a further repeat is answered from the gateway's record without asking Telegram."""
    app, telegram, wire = production.app, production.telegram, production.wire
    assert app.gateway is not None
    await telegram.create_user(USER, "Ann", "en", "+79991234567")
    await telegram.start_bot(USER, BOT)
    wire.lose_answers(functions.messages.SendMessageRequest)
    with pytest.raises(ServiceError) as unknown:
        await app.gateway.send_bot_message(BOT, USER, "Code 1", budget=5, request_id="01MSG")
    assert (unknown.value.code.name, unknown.value.reason) == ("UNAVAILABLE", "SEND_OUTCOME_UNKNOWN")
    made = [m for m in await telegram.history(USER, BOT) if m.text.startswith("Code")]
    assert [m.text for m in made] == ["Code 1"]

    repeat = await app.gateway.send_bot_message(BOT, USER, "Code 1", budget=5, request_id="01MSG")
    assert repeat.message_id == made[0].bot_message_id
    again = await app.gateway.send_bot_message(BOT, USER, "Code 1", budget=5, request_id="01MSG")
    assert again == type(again)(made[0].bot_message_id, already=True)
    # Two sends went to Telegram (the third was answered here), with one random_id; another
    # request_id is another message.
    code_1 = [request for request in sends(wire) if request.message == "Code 1"]
    assert len(code_1) == 2 and len({request.random_id for request in code_1}) == 1
    other = await app.gateway.send_bot_message(BOT, USER, "Code 2", budget=5, request_id="01OTHER")
    assert not other.already and other.message_id != made[0].bot_message_id
    assert [m.text for m in await telegram.history(USER, BOT) if m.text.startswith("Code")] == ["Code 1", "Code 2"]

    # Telegram is still making a send of this random_id elsewhere (another replica, before a restart):
    # RANDOM_ID_DUPLICATE, through Telethon's own repeat, is "already sent", id unknown here.
    wire.script(functions.messages.SendMessageRequest, lambda request: (500, "RANDOM_ID_DUPLICATE"))
    try:
        elsewhere = await app.gateway.send_bot_message(BOT, USER, "Code 3", budget=5, request_id="01ELSEWHERE")
    finally:
        wire.script(functions.messages.SendMessageRequest, None)
    assert elsewhere == type(elsewhere)(0, already=True)

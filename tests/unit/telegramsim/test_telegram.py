"""The simulated Telegram's rules, seen as a bot sees them (through the Telethon transport and TL) and
as the sandbox's people act: access hashes, start and block, contacts, limits, deletion, tokens and
keys, and its state kept in its own database across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.botgateway.sandbox_link import sandbox_client_factory
from services.botgateway.telethon_transport import TelethonTransport
from services.botgateway.transport import (
    BotCredentials,
    FloodWait,
    IncomingEvent,
    Keyboard,
    OutgoingMessage,
    Peer,
    PeerInvalid,
    TokenInvalid,
    UserBlocked,
    UserDeactivated,
)
from services.core.clock import ManualClock
from services.core.config import ConfigError, Env
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.core.sandbox import sandbox_token
from services.telegramsim.app import load_config
from services.telegramsim.model import ChatNotStarted, RpcError, SandboxLimits, SimMessage, UnknownUser
from services.telegramsim.mtproto import MtprotoEndpoint
from services.telegramsim.sessions import auth_key_id
from services.telegramsim.store import TelegramStore
from services.telegramsim.telegram import SimulatedTelegram
from tests.unit.botgateway.telethon_wire import KeptStates, LocalWire

BOT = "codes_bot"


class Monotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    telegram: SimulatedTelegram
    transport: TelethonTransport
    events: list[IncomingEvent]
    mono: Monotonic

    def peer(self, user_id: int, bot: str = BOT) -> Peer:
        return Peer(user_id, self.telegram.access_hash(self.telegram.bot(bot), user_id))


async def open_telegram(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, mono: Monotonic, **limits: float
) -> SimulatedTelegram:
    defaults: dict[str, float] = {"bot_rate": 10, "bot_burst": 3, "chat_rate": 1, "chat_burst": 2, "reply_wait": 5}
    settings = SandboxLimits(**{**defaults, **limits})  # type: ignore[arg-type]
    telegram = SimulatedTelegram(TelegramStore(database, keyring), settings, clock, monotonic=mono)
    await telegram.store.create_indexes()
    await telegram.load([BOT])
    return telegram


@pytest.fixture
async def world(database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[World]:
    mono = Monotonic()
    telegram = await open_telegram(database, keyring, clock, mono)
    transport = TelethonTransport(1, "0" * 32, factory=sandbox_client_factory(LocalWire(MtprotoEndpoint(telegram))))
    events: list[IncomingEvent] = []

    async def handler(event: IncomingEvent) -> list[int]:
        events.append(event)
        return []

    transport.set_handler(handler)
    transport.set_state_keeper(KeptStates())
    await transport.start_bot(BotCredentials(BOT, sandbox_token(BOT)))
    yield World(telegram, transport, events, mono)
    await transport.close()


async def test_sending_rules(world: World) -> None:
    telegram, transport = world.telegram, world.transport
    user = await telegram.create_user(phone="+79991234567")
    good = world.peer(user.user_id)
    with pytest.raises(PeerInvalid):  # never started
        await transport.send(BOT, good, OutgoingMessage("x"))
    await telegram.start_bot(user.user_id, BOT)
    with pytest.raises(PeerInvalid):  # another bot's (or a made-up) access hash
        await transport.send(BOT, Peer(user.user_id, 12345), OutgoingMessage("x"))
    message_id = await transport.send(
        BOT, good, OutgoingMessage("code", protect_content=True, keyboard=Keyboard("Share"))
    )
    sent = await telegram.bot_message(telegram.bot(BOT), message_id)
    assert sent is not None and sent.protect_content and sent.request_contact and sent.from_bot
    await transport.delete(BOT, good, [message_id])
    assert sent.deleted and sent.text == ""
    await telegram.set_blocked(user.user_id, BOT, True)
    with pytest.raises(UserBlocked):
        await transport.send(BOT, good, OutgoingMessage("x"))
    with pytest.raises(ChatNotStarted):
        await telegram.send_text(user.user_id, BOT, "hi")
    world.mono.t += 10
    await telegram.start_bot(user.user_id, BOT)  # Restart unblocks
    await transport.send(BOT, good, OutgoingMessage("back"))
    await telegram.create_user(user.user_id, phone=user.phone, deactivated=True)
    with pytest.raises(UserDeactivated):
        await transport.send(BOT, good, OutgoingMessage("x"))
    with pytest.raises(UnknownUser):
        await telegram.start_bot(999, BOT)


async def test_a_random_id_sends_once_per_bot_and_person(world: World) -> None:
    """Telegram's deduplication: a repeat of a finished send answers with the message it made (in the
    answer's own form), a repeat while the first is being made is RANDOM_ID_DUPLICATE, another person
    is another scope, and a send refused for the chat's state made nothing under its random_id."""
    telegram, transport = world.telegram, world.transport
    bot = telegram.bot(BOT)
    user = await telegram.create_user(phone="+79991234567")
    other = await telegram.create_user(phone="+79991234568")
    for person in (user, other):
        await telegram.start_bot(person.user_id, BOT)
    short = OutgoingMessage("code 1", random_id=41)
    first = await transport.send(BOT, world.peer(user.user_id), short)
    world.mono.t += 10  # past the chat's limit: a repeat is answered, not counted as a send
    assert await transport.send(BOT, world.peer(user.user_id), short) == first
    keyboard = OutgoingMessage("share", keyboard=Keyboard("Share"), random_id=42)
    world.mono.t += 10
    with_keyboard = await transport.send(BOT, world.peer(user.user_id), keyboard)
    world.mono.t += 10
    assert await transport.send(BOT, world.peer(user.user_id), keyboard) == with_keyboard
    assert [m.text for m in await telegram.history(user.user_id, BOT)] == ["/start", "code 1", "share"]
    # The same random_id towards another person is another message.
    to_other = await transport.send(BOT, world.peer(other.user_id), short)
    assert to_other not in (first, with_keyboard)
    assert [m.text for m in await telegram.history(other.user_id, BOT)] == ["/start", "code 1"]
    # While the first send is still being made, a repeat is refused.
    world.mono.t += 10
    hash_ = telegram.access_hash(bot, user.user_id)
    made, repeat = await asyncio.gather(
        telegram.send_message(bot, 1, user.user_id, hash_, "code 2", 43),
        telegram.send_message(bot, 1, user.user_id, hash_, "code 2", 43),
        return_exceptions=True,
    )
    assert isinstance(made, SimMessage) and isinstance(repeat, RpcError)
    assert (repeat.code, repeat.message) == (500, "RANDOM_ID_DUPLICATE")
    # Refused while blocked: nothing was made, so the same random_id sends once unblocked.
    await telegram.set_blocked(user.user_id, BOT, True)
    with pytest.raises(UserBlocked):
        await transport.send(BOT, world.peer(user.user_id), OutgoingMessage("code 3", random_id=44))
    await telegram.set_blocked(user.user_id, BOT, False)
    world.mono.t += 10
    await transport.send(BOT, world.peer(user.user_id), OutgoingMessage("code 3", random_id=44))
    assert [m.text for m in await telegram.history(user.user_id, BOT)][-2:] == ["code 2", "code 3"]


async def test_limits_are_enforced_with_flood_waits(world: World) -> None:
    telegram, transport = world.telegram, world.transport
    peers = []
    for _ in range(5):
        user = await telegram.create_user()
        telegram.chat(BOT, user.user_id).started = True
        peers.append(world.peer(user.user_id))
    for peer in peers[:3]:  # the bot's burst
        await transport.send(BOT, peer, OutgoingMessage("x"))
    with pytest.raises(FloodWait) as flood:
        await transport.send(BOT, peers[3], OutgoingMessage("x"))
    assert flood.value.seconds >= 1 and telegram.flood_errors == 1
    world.mono.t += 0.11  # one slot at 10/s
    await transport.send(BOT, peers[3], OutgoingMessage("x"))
    # Per chat: 2 at once, then 1/s.
    world.mono.t += 10
    await transport.send(BOT, peers[4], OutgoingMessage("x"))
    await transport.send(BOT, peers[4], OutgoingMessage("x"))
    with pytest.raises(FloodWait):
        await transport.send(BOT, peers[4], OutgoingMessage("x"))
    world.mono.t += 1
    await transport.send(BOT, peers[4], OutgoingMessage("x"))


async def test_tokens_keys_and_logins(world: World) -> None:
    identity, session, _ = await world.transport.check_token("6000000001:abc")
    assert identity.username == "sandbox6000000001_bot" and session
    with pytest.raises(TokenInvalid):
        await world.transport.check_token("6000000001:other")
    with pytest.raises(TokenInvalid):
        await world.transport.check_token("nonsense")
    # Logins are limited per bot like Telegram's (a burst, then FLOOD_WAIT).
    for _ in range(4):
        await world.transport.check_token("6000000001:abc")
    with pytest.raises(FloodWait):
        await world.transport.check_token("6000000001:abc")
    # A revoked token stops logging in, and the sessions logged in with it end.
    new_token = await world.telegram.revoke_token(BOT)
    with pytest.raises(TokenInvalid):
        await world.transport.check_token(sandbox_token(BOT))
    assert (await world.transport.check_token(new_token))[0].username == BOT


async def test_an_offline_bot_gets_its_updates_later(world: World) -> None:
    telegram = world.telegram
    user = await telegram.create_user(phone="+79991234567")
    await world.transport.stop_bot(BOT)
    assert await telegram.start_bot(user.user_id, BOT) == []  # nobody online: answered at once
    assert world.events == []
    state = telegram.state(telegram.bot(BOT))
    assert state.pts == 1
    difference = await telegram.difference(telegram.bot(BOT), 0, 0, None)
    assert [m.text for m in difference.messages] == ["/start"] and difference.final


async def test_state_survives_a_restart_of_the_simulated_telegram(
    world: World, database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    telegram = world.telegram
    user = await telegram.create_user(phone="+79991234567", language_code="ru")
    other = await telegram.create_user(phone="+79991234568")
    await telegram.start_bot(user.user_id, BOT)
    await telegram.start_bot(other.user_id, BOT)
    sent = await world.transport.send(BOT, world.peer(user.user_id), OutgoingMessage("code 1"))
    await telegram.set_blocked(other.user_id, BOT, True)
    bot = telegram.bot(BOT)
    before = telegram.state(bot)
    message = await telegram.bot_message(bot, sent)
    assert message is not None and before.qts == 1
    await world.transport.stop_bot(BOT)

    again = await open_telegram(database, keyring, clock, Monotonic())
    bot = again.bot(BOT)
    assert again.state(bot) == before  # pts, qts, seq and date come back from the log
    assert again.users[user.user_id].phone == "+79991234567" and again.users[user.user_id].language_code == "ru"
    assert again.chats[(bot.telegram_id, other.user_id)].blocked
    assert [m.text for m in await again.history(user.user_id, BOT)] == ["/start", "code 1"]
    assert again.access_hash(bot, user.user_id) == telegram.access_hash(telegram.bot(BOT), user.user_id)
    # The random_ids used stay used (a repeat answers with the message it made), and the bot's key is
    # still logged in.
    repeat = await again.send_message(
        bot, 1, user.user_id, again.access_hash(bot, user.user_id), "x", message.random_id
    )
    assert repeat.bot_message_id == sent and repeat.text == "code 1"
    assert {key.bot for key in again.sessions.keys.values()} == {bot.telegram_id}
    # Ids go on from where they were, on both sides.
    next_message = await again.send_message(bot, 1, user.user_id, again.access_hash(bot, user.user_id), "y", 99)
    assert next_message.bot_message_id == sent + 1 and next_message.user_message_id == message.user_message_id + 1
    assert next_message.pts == before.pts + 1


async def test_a_reset_erases_people_and_chats_but_counters_only_grow(world: World) -> None:
    telegram = world.telegram
    user = await telegram.create_user(phone="+79991234567")
    await telegram.start_bot(user.user_id, BOT)
    await telegram.send_text(user.user_id, BOT, "hello")
    bot = telegram.bot(BOT)
    before = telegram.state(bot)
    assert await telegram.reset() == (1, 2)
    assert telegram.users == {} and telegram.chats == {}
    assert telegram.state(bot).pts == before.pts  # never back
    # A bot asking from before the reset is told its difference is too long.
    assert (await telegram.difference(bot, before.pts - 2, 0, None)).too_long
    fresh = await telegram.create_user(phone="+79991234568")
    await telegram.start_bot(fresh.user_id, BOT)
    assert telegram.state(bot).pts == before.pts + 1


async def test_a_second_session_on_one_key_kills_the_key(world: World) -> None:
    telegram = world.telegram
    key_id = auth_key_id(await telegram.sessions.create_key())
    await telegram.import_bot_authorization(key_id, 1, sandbox_token(BOT))
    await telegram.sessions.connect(key_id, 1)
    with pytest.raises(RpcError) as killed:
        await telegram.sessions.connect(key_id, 2)
    assert (killed.value.code, killed.value.message) == (406, "AUTH_KEY_DUPLICATED")
    with pytest.raises(RpcError):
        telegram.authorized(key_id)
    assert telegram.sessions.duplicate_sessions == 1


async def test_updates_follow_the_session_even_when_its_stream_connects_after_its_requests(world: World) -> None:
    """A session asks for updates by making a request (not wrapped in invokeWithoutUpdates); its
    update stream may connect after that request, and may drop and connect again: it is pushed to
    all the same, until the session is closed."""
    telegram = world.telegram
    await world.transport.stop_bot(BOT)
    endpoint = MtprotoEndpoint(telegram)
    key_id = auth_key_id(await telegram.sessions.create_key())
    await telegram.import_bot_authorization(key_id, 1, sandbox_token(BOT))
    bot = telegram.bot(BOT)
    telegram.sessions.subscribe(key_id, 7)  # updates.getState, before any stream
    assert telegram.sessions.online(bot.telegram_id) == []
    connection = await telegram.sessions.connect(key_id, 7)
    assert telegram.sessions.online(bot.telegram_id) == [connection]
    telegram.sessions.disconnect(key_id, 7)  # the stream drops; the session lives on
    assert (await telegram.sessions.connect(key_id, 7)).subscribed
    endpoint.close(key_id, 7)  # CloseSession
    assert not (await telegram.sessions.connect(key_id, 7)).subscribed


def test_the_simulated_telegram_refuses_production() -> None:
    env = Env({"OTPGATE_ENV": "production"}, service="telegramsim")
    load_config(env)
    with pytest.raises(ConfigError, match="dev and sandbox mode only"):
        env.check()
    off = Env({"OTPGATE_SANDBOX": "false"}, service="telegramsim")
    load_config(off)
    with pytest.raises(ConfigError):
        off.check()


async def test_key_rotation_reseals_what_the_simulated_telegram_keeps(
    world: World, database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    """Phones, tokens and message texts are sealed; `otpgate keys rotate` moves them to a new key."""
    from services.core.rotation_runner import CollectionRotation, load_declarations, plan_collections

    telegram = world.telegram
    user = await telegram.create_user(phone="+79991234567")
    await telegram.start_bot(user.user_id, BOT)
    await world.transport.send(BOT, world.peer(user.user_id), OutgoingMessage("Your code is 424242"))
    await world.transport.stop_bot(BOT)
    raw = [doc async for doc in database["updates"].find({})]
    assert all(b"424242" not in bytes(doc.get("text_sealed", b"")) for doc in raw)
    assert b"79991234567" not in bytes((await database["users"].find_one({}) or {}).get("phone_sealed", b""))

    old = telegram.store.keyring
    newer = Keyring.parse(",".join([*_specs(old), Keyring.generate_spec("k9")]))
    (declarations,) = load_declarations(["telegramsim"])
    for collection, (fields, indexes) in plan_collections(declarations).items():
        rotation = CollectionRotation(
            database, collection, newer, sealed_fields=fields, blind_indexes=indexes, service="telegramsim"
        )
        assert (await rotation.run()).finished
    reopened = SimulatedTelegram(
        TelegramStore(database, Keyring.parse(",".join(_specs(newer)[-1:]))), SandboxLimits(), clock
    )
    await reopened.load()
    assert reopened.users[user.user_id].phone == "+79991234567"
    assert "Your code is 424242" in [m.text for m in await reopened.history(user.user_id, BOT)]


def _specs(keyring: Keyring) -> list[str]:
    import base64

    roots = keyring._roots
    ordered = [k for k in roots if k != keyring.primary_id] + [keyring.primary_id]
    return [f"{k}:{base64.b64encode(roots[k]).decode()}" for k in ordered]

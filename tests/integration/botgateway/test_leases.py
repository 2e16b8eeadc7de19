"""Two gateway replicas, one database, one (simulated) Telegram: exactly one runs each bot; takeover
after a lapse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pymongo import AsyncMongoClient
from telethon.tl import functions, types

from services.botgateway.app import BotGatewayApp, build_app, load_config
from services.botgateway.telethon_client import KeptSession
from services.botgateway.telethon_transport import TelethonTransport
from services.core.clock import ManualClock
from services.core.config import Env, load_common
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from services.telegramsim.app import TelegramSimApp
from services.telegramsim.model import RpcError
from services.telegramsim.mtproto import MtprotoEndpoint
from services.telegramsim.telegram import SimulatedTelegram
from tests.integration.botgateway.conftest import SHARED, new_user_id
from tests.support.stack import running_stack


@dataclass
class Pair:
    a: BotGatewayApp
    b: BotGatewayApp
    telegram: SimulatedTelegram


def transport(app: BotGatewayApp) -> TelethonTransport:
    assert app.gateway is not None and isinstance(app.gateway.transport, TelethonTransport)
    return app.gateway.transport


@pytest.fixture
def extra_env() -> dict[str, str]:
    return {}


@pytest.fixture
async def pair(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, extra_env: dict[str, str]
) -> AsyncIterator[Pair]:
    overrides = {"OTPGATE_SHARED_BOTS": ",".join(SHARED), **extra_env}
    async with running_stack(mongo_client, keyring, ["telegramsim"], clock=clock, overrides=overrides) as stack:
        reader = Env(stack.env, service="botgateway")
        common = load_common("botgateway", reader)
        config = load_config(reader)
        reader.check()
        simulator = stack.app("telegramsim")
        assert isinstance(simulator, TelegramSimApp) and simulator.telegram is not None
        a = await build_app(common, config, mongo_client, clock)
        b = await build_app(common, config, mongo_client, clock)
        try:
            yield Pair(a, b, simulator.telegram)
        finally:
            for app in (a, b):
                for hook in app.on_stop:
                    await hook()
            await mongo_client.drop_database(common.database)


async def person(pair: Pair, bot_id: str) -> int:
    telegram = pair.telegram
    user = await telegram.create_user(new_user_id())
    telegram.chat(bot_id, user.user_id).started = True
    access_hash = telegram.access_hash(telegram.bot(bot_id), user.user_id)
    for app in (pair.a, pair.b):
        assert app.gateway is not None
        await app.gateway.store.remember_peer(bot_id, user.user_id, access_hash, "en", app.gateway.clock.now())
    return user.user_id


async def send(app: BotGatewayApp, bot_id: str, user_id: int) -> int | str:
    assert app.gateway is not None
    try:
        return (await app.gateway.send_bot_message(bot_id, user_id, "hello", budget=1.0)).message_id
    except ServiceError as err:
        return err.reason


async def test_one_replica_runs_each_bot_and_the_other_takes_over_after_a_lapse(pair: Pair, clock: ManualClock) -> None:
    a, b, telegram = pair.a, pair.b, pair.telegram
    assert a.sessions is not None and b.sessions is not None
    # A started first and holds every bot; B stands by.
    assert sorted(a.sessions.live_bots()) == sorted(SHARED) and b.sessions.live_bots() == []
    assert all(telegram.connected_sessions(bot) == [transport(a).session_id(bot)] for bot in SHARED)
    a_session = transport(a).session_id("smscodes_bot")
    user = await person(pair, "smscodes_bot")
    assert isinstance(await send(a, "smscodes_bot", user), int)
    assert await send(b, "smscodes_bot", user) == "BOT_UNAVAILABLE"

    # Renewals keep A's leases; B still cannot take them.
    clock.advance(20)
    await a.sessions.tick()
    await b.sessions.tick()
    assert b.sessions.live_bots() == [] and isinstance(await send(a, "smscodes_bot", user), int)

    # A stalls (no renewals, no calls). Its watchdog closes the sessions before the lease lapses for others...
    clock.advance(26)
    assert not a.sessions.live("smscodes_bot")
    assert sorted(await a.sessions.enforce_expiry()) == sorted(SHARED)
    assert all(telegram.connected_sessions(bot) == [] for bot in SHARED)
    await b.sessions.tick()
    assert b.sessions.live_bots() == []  # ...and B waits until the lease has really expired
    clock.advance(5)
    await b.sessions.tick()
    assert sorted(b.sessions.live_bots()) == sorted(SHARED)
    b_session = transport(b).session_id("smscodes_bot")
    assert await send(b, "smscodes_bot", user) != "BOT_UNAVAILABLE"

    # A comes back: it finds the leases taken and stays down.
    await a.sessions.tick()
    assert a.sessions.live_bots() == [] and await send(a, "smscodes_bot", user) == "BOT_UNAVAILABLE"
    # Never two live sessions for one bot, and every message came from the holder of the moment.
    assert telegram.sessions.duplicate_sessions == 0
    senders = [m.session_id for m in await telegram.history(user, "smscodes_bot") if m.from_bot]
    first_b = senders.index(b_session)
    assert set(senders[:first_b]) == {a_session} and set(senders[first_b:]) == {b_session}


async def test_concurrent_sends_through_both_replicas_go_out_once(pair: Pair) -> None:
    user = await person(pair, "smsc_code_bot")
    results = [await send(pair.a, "smsc_code_bot", user), await send(pair.b, "smsc_code_bot", user)]
    assert sorted(map(str, results))[0].isdigit() and "BOT_UNAVAILABLE" in results
    assert len([m for m in await pair.telegram.history(user, "smsc_code_bot") if m.from_bot]) == 1


async def test_the_simulated_telegram_refuses_two_live_sessions(pair: Pair) -> None:
    assert pair.a.sessions is not None and pair.b.sessions is not None
    user = await person(pair, "smsccode_bot")
    holder = transport(pair.a)
    key_id = holder.client("smsccode_bot")._sender.auth_key.key_id
    session_id = holder.session_id("smsccode_bot")
    with pytest.raises(RpcError):  # an intruder connects with A's key: Telegram kills the key
        await pair.telegram.sessions.connect(key_id, session_id=424242)
    with pytest.raises(ServiceError) as err:
        assert pair.a.gateway is not None
        await pair.a.gateway.send_bot_message("smsccode_bot", user, "x")
    assert err.value.reason == "BOT_UNAVAILABLE" and pair.telegram.sessions.duplicate_sessions == 1
    bot = pair.telegram.bot("smsccode_bot")
    send = functions.messages.SendMessageRequest(
        peer=types.InputPeerUser(user, pair.telegram.access_hash(bot, user)), message="x", random_id=7
    )
    with pytest.raises(RpcError) as refused:
        await MtprotoEndpoint(pair.telegram).invoke(key_id, session_id, bytes(send))
    assert (refused.value.code, refused.value.message) == (406, "AUTH_KEY_DUPLICATED")


async def test_session_is_sealed_and_reused_after_restart(pair: Pair, mongo_client: AsyncMongoClient[Document]) -> None:
    assert pair.a.gateway is not None and pair.a.sessions is not None
    raw = await pair.a.gateway.store.bots.find_one({"_id": "smscodes_bot"})
    bot = await pair.a.gateway.store.get_bot("smscodes_bot")
    assert raw is not None and bot is not None and bot.session
    assert bot.session.encode() not in bytes(raw["session_sealed"])  # sealed, not stored as is
    key = KeptSession(bot.session).auth_key
    assert key.key_id == transport(pair.a).client("smscodes_bot")._sender.auth_key.key_id
    # A restart logs in with the kept session: no new key, no new login.
    await pair.a.sessions.stop_bot("smscodes_bot")
    await pair.a.sessions.tick()
    assert pair.a.sessions.live("smscodes_bot")
    assert transport(pair.a).client("smscodes_bot")._sender.auth_key.key_id == key.key_id
    again = await pair.a.gateway.store.get_bot("smscodes_bot")
    assert again is not None and again.session == bot.session


@pytest.mark.parametrize("extra_env", [{"OTPGATE_BOTGATEWAY_MAX_BOTS": "2"}])
async def test_a_cap_spreads_bots_over_replicas(pair: Pair, extra_env: dict[str, str]) -> None:
    assert pair.a.sessions is not None and pair.b.sessions is not None
    await pair.b.sessions.tick()
    a_bots, b_bots = set(pair.a.sessions.live_bots()), set(pair.b.sessions.live_bots())
    assert len(a_bots) == 2 and len(b_bots) == 1 and a_bots | b_bots == set(SHARED)
    assert not a_bots & b_bots


async def test_a_lapsed_lease_of_ours_is_renewed_on_demand(pair: Pair, clock: ManualClock) -> None:
    """A replica that is alive but missed its renewal round (or whose clock jumped) renews on the next
    send instead of refusing until the next round, as long as nobody else took the bot."""
    assert pair.a.sessions is not None
    user = await person(pair, "smscodes_bot")
    clock.advance(3600)
    await pair.a.sessions.enforce_expiry()
    assert not pair.a.sessions.live("smscodes_bot")
    assert isinstance(await send(pair.a, "smscodes_bot", user), int)
    assert pair.telegram.sessions.duplicate_sessions == 0


async def test_a_handover_loses_no_update_and_handles_none_twice(pair: Pair, clock: ManualClock) -> None:
    """A handles a person's messages but its kept update state never reaches the database (it crashes
    later); the person writes more while no replica runs the bot; B takes over from the old state:
    it handles what came meanwhile, and what A handled is recognised and not answered again."""
    a, b, telegram = pair.a, pair.b, pair.telegram
    assert a.sessions is not None and b.sessions is not None and a.gateway is not None
    bot = "smscodes_bot"
    user = await telegram.create_user(new_user_id(), phone="+79991230000")

    async def lost(*_: object) -> None:
        return None

    a.gateway.store.save_update_state = lost  # type: ignore[method-assign]
    for action in ("/start", "/help", "/help"):
        if action == "/start":
            replies = await telegram.start_bot(user.user_id, bot)
        else:
            replies = await telegram.send_text(user.user_id, bot, action)
        assert len(replies) == 1  # A answers at once
    a_session = transport(a).session_id(bot)

    clock.advance(26)  # A stalls; its watchdog ends its sessions before the lease lapses
    await a.sessions.enforce_expiry()
    for _ in range(2):
        assert await telegram.send_text(user.user_id, bot, "/help") == []  # nobody runs the bot
    clock.advance(5)
    await b.sessions.tick()
    assert b.sessions.live(bot)
    b_session = transport(b).session_id(bot)

    async def caught_up() -> bool:
        ledger = transport(b).client(bot).ledger
        return ledger is not None and ledger.handled.pts == telegram.state(telegram.bot(bot)).pts

    for _ in range(500):
        if await caught_up():
            break
        await asyncio.sleep(0.01)
    assert await caught_up()
    history = await telegram.history(user.user_id, bot)
    replies = [m for m in history if m.from_bot]
    assert len([m for m in history if not m.from_bot]) == 5 and len(replies) == 5  # one answer each
    assert [m.session_id for m in replies] == [a_session] * 3 + [b_session] * 2

"""Two gateway replicas, one database, one Telegram: exactly one runs each bot; takeover after a lapse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pymongo import AsyncMongoClient

from services.botgateway.app import BotGatewayApp, build_app, load_config
from services.botgateway.sandbox import AuthKeyDuplicated, SimulatedTelegram
from services.core.clock import ManualClock
from services.core.config import Env, load_common
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from tests.integration.botgateway.conftest import SHARED, new_user_id
from tests.support.stack import _spec_of, _uri_of, stack_env


@dataclass
class Pair:
    a: BotGatewayApp
    b: BotGatewayApp
    telegram: SimulatedTelegram


@pytest.fixture
def extra_env() -> dict[str, str]:
    return {}


@pytest.fixture
async def pair(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, extra_env: dict[str, str]
) -> AsyncIterator[Pair]:
    env = stack_env(
        _uri_of(mongo_client), ",".join(_spec_of(keyring)), {"OTPGATE_SHARED_BOTS": ",".join(SHARED), **extra_env}
    )
    reader = Env(env, service="botgateway")
    common = load_common("botgateway", reader)
    config = load_config(reader)
    reader.check()
    telegram = SimulatedTelegram(config.sandbox_limits, clock=clock)
    a = await build_app(common, config, mongo_client, clock, telegram=telegram)
    b = await build_app(common, config, mongo_client, clock, telegram=telegram)
    try:
        yield Pair(a, b, telegram)
    finally:
        for app in (a, b):
            for hook in app.on_stop:
                await hook()
        await mongo_client.drop_database(common.database)


async def person(pair: Pair, bot_id: str) -> int:
    user = pair.telegram.create_user(new_user_id())
    pair.telegram.chat(bot_id, user.user_id).started = True
    for app in (pair.a, pair.b):
        assert app.gateway is not None
        await app.gateway.store.remember_peer(
            bot_id, user.user_id, pair.telegram.access_hash(bot_id, user.user_id), "en", app.gateway.clock.now()
        )
    return user.user_id


async def send(app: BotGatewayApp, bot_id: str, user_id: int) -> int | str:
    assert app.gateway is not None
    try:
        return await app.gateway.send_bot_message(bot_id, user_id, "hello", budget=1.0)
    except ServiceError as err:
        return err.reason


async def test_one_replica_runs_each_bot_and_the_other_takes_over_after_a_lapse(pair: Pair, clock: ManualClock) -> None:
    a, b, telegram = pair.a, pair.b, pair.telegram
    assert a.sessions is not None and b.sessions is not None
    # A started first and holds every bot; B stands by.
    assert sorted(a.sessions.live_bots()) == sorted(SHARED) and b.sessions.live_bots() == []
    assert all(telegram.sessions(bot) == [a.sessions.holder] for bot in SHARED)
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
    assert all(telegram.sessions(bot) == [] for bot in SHARED)
    await b.sessions.tick()
    assert b.sessions.live_bots() == []  # ...and B waits until the lease has really expired
    clock.advance(5)
    await b.sessions.tick()
    assert sorted(b.sessions.live_bots()) == sorted(SHARED)
    assert await send(b, "smscodes_bot", user) != "BOT_UNAVAILABLE"

    # A comes back: it finds the leases taken and stays down.
    await a.sessions.tick()
    assert a.sessions.live_bots() == [] and await send(a, "smscodes_bot", user) == "BOT_UNAVAILABLE"
    # Never two live sessions for one bot, and every message came from the holder of the moment.
    assert telegram.duplicate_sessions == 0
    senders = [m.sender_session for m in telegram.history(user, "smscodes_bot") if m.from_bot]
    first_b = senders.index(b.sessions.holder)
    assert set(senders[:first_b]) == {a.sessions.holder} and set(senders[first_b:]) == {b.sessions.holder}


async def test_concurrent_sends_through_both_replicas_go_out_once(pair: Pair) -> None:
    user = await person(pair, "smsc_code_bot")
    results = [await send(pair.a, "smsc_code_bot", user), await send(pair.b, "smsc_code_bot", user)]
    assert sorted(map(str, results))[0].isdigit() and "BOT_UNAVAILABLE" in results
    assert len([m for m in pair.telegram.history(user, "smsc_code_bot") if m.from_bot]) == 1


async def test_the_simulated_telegram_refuses_two_live_sessions(pair: Pair) -> None:
    assert pair.a.sessions is not None and pair.b.sessions is not None
    user = await person(pair, "smsccode_bot")

    async def nothing(event: object) -> list[int]:
        return []

    pair.telegram.connect("smsccode_bot", "intruder", nothing)  # type: ignore[arg-type]
    with pytest.raises(ServiceError) as err:
        assert pair.a.gateway is not None
        await pair.a.gateway.send_bot_message("smsccode_bot", user, "x")
    assert err.value.reason == "BOT_UNAVAILABLE" and pair.telegram.duplicate_sessions == 1
    with pytest.raises(AuthKeyDuplicated):
        from services.botgateway.transport import OutgoingMessage, Peer

        pair.telegram.bot_send(
            "smsccode_bot",
            pair.a.sessions.holder,
            Peer(user, pair.telegram.access_hash("smsccode_bot", user)),
            OutgoingMessage("x"),
        )


async def test_session_is_sealed_and_reused_after_restart(pair: Pair, mongo_client: AsyncMongoClient[Document]) -> None:
    assert pair.a.gateway is not None
    raw = await pair.a.gateway.store.bots.find_one({"_id": "smscodes_bot"})
    assert raw is not None and "session_sealed" in raw and b"sandbox:" not in bytes(raw["session_sealed"])
    bot = await pair.a.gateway.store.get_bot("smscodes_bot")
    assert bot is not None and bot.session.startswith("sandbox:")


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
    assert pair.telegram.duplicate_sessions == 0

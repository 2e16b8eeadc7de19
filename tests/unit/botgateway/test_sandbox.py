"""The simulated Telegram's rules: access hashes, start/block, contacts, limits, deletion."""

from __future__ import annotations

import pytest

from services.botgateway.sandbox import (
    ChatNotStarted,
    SandboxLimits,
    SandboxTransport,
    SimulatedTelegram,
    UnknownUser,
    sandbox_token,
)
from services.botgateway.transport import (
    BotCredentials,
    BotNotRunning,
    BotStopped,
    ContactReceived,
    FloodWait,
    IncomingEvent,
    Keyboard,
    OutgoingMessage,
    Peer,
    PeerInvalid,
    TextReceived,
    TokenInvalid,
    UserBlocked,
    UserDeactivated,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def mono() -> Clock:
    return Clock()


@pytest.fixture
async def world(mono: Clock) -> tuple[SimulatedTelegram, SandboxTransport, list[IncomingEvent]]:
    telegram = SimulatedTelegram(SandboxLimits(bot_rate=10, bot_burst=3, chat_rate=1, chat_burst=2), monotonic=mono)
    telegram.add_bot("codes_bot", sandbox_token("codes_bot"))
    transport = SandboxTransport(telegram, "replica-1")
    events: list[IncomingEvent] = []

    async def handler(event: IncomingEvent) -> list[int]:
        events.append(event)
        return []

    transport.set_handler(handler)
    await transport.start_bot(BotCredentials("codes_bot", sandbox_token("codes_bot")))
    return telegram, transport, events


World = tuple[SimulatedTelegram, SandboxTransport, list[IncomingEvent]]


async def test_user_actions_reach_the_bot_as_events(world: World) -> None:
    telegram, _, events = world
    user = telegram.create_user(phone="+79991234567", language_code="ru")
    await telegram.start(user.user_id, "codes_bot", "ref")
    await telegram.share_contact(user.user_id, "codes_bot")
    await telegram.share_contact(user.user_id, "codes_bot", phone="+79990000000")
    await telegram.share_contact(user.user_id, "codes_bot", forwarded=True)
    await telegram.send_text(user.user_id, "codes_bot", "123456")
    await telegram.set_blocked(user.user_id, "codes_bot", True)
    start, own, foreign, forwarded, text, blocked = events
    assert isinstance(start, TextReceived) and start.text == "/start ref" and start.sender.language_code == "ru"
    assert start.sender.access_hash == telegram.access_hash("codes_bot", user.user_id)
    assert isinstance(own, ContactReceived) and (own.contact_user_id, own.phone) == (user.user_id, "79991234567")
    assert isinstance(foreign, ContactReceived) and foreign.contact_user_id == 0  # like Telegram
    assert isinstance(forwarded, ContactReceived) and forwarded.forwarded
    assert isinstance(text, TextReceived) and text.text == "123456"
    assert blocked == BotStopped("codes_bot", user.user_id, True)


async def test_sending_rules(world: World) -> None:
    telegram, transport, _ = world
    user = telegram.create_user(phone="+79991234567")
    good = Peer(user.user_id, telegram.access_hash("codes_bot", user.user_id))
    with pytest.raises(PeerInvalid):  # never started
        await transport.send("codes_bot", good, OutgoingMessage("x"))
    await telegram.start(user.user_id, "codes_bot")
    with pytest.raises(PeerInvalid):  # another bot's (or a made-up) access hash
        await transport.send("codes_bot", Peer(user.user_id, 12345), OutgoingMessage("x"))
    message_id = await transport.send(
        "codes_bot", good, OutgoingMessage("code", protect_content=True, keyboard=Keyboard("Share"))
    )
    sent = telegram.message(user.user_id, "codes_bot", message_id)
    assert sent is not None and sent.protect_content and sent.request_contact and sent.from_bot
    await transport.delete("codes_bot", good, [message_id])
    assert sent.deleted and sent.text == ""
    await telegram.set_blocked(user.user_id, "codes_bot", True)
    with pytest.raises(UserBlocked):
        await transport.send("codes_bot", good, OutgoingMessage("x"))
    with pytest.raises(ChatNotStarted):
        await telegram.send_text(user.user_id, "codes_bot", "hi")
    await telegram.start(user.user_id, "codes_bot")  # Restart unblocks
    user.deactivated = True
    with pytest.raises(UserDeactivated):
        await transport.send("codes_bot", good, OutgoingMessage("x"))
    with pytest.raises(UnknownUser):
        await telegram.start(999, "codes_bot")


async def test_limits_are_enforced_with_flood_waits(world: World, mono: Clock) -> None:
    telegram, transport, _ = world
    peers = []
    for _ in range(5):
        user = telegram.create_user()
        telegram.chat("codes_bot", user.user_id).started = True
        peers.append(Peer(user.user_id, telegram.access_hash("codes_bot", user.user_id)))
    for peer in peers[:3]:  # the bot's burst
        await transport.send("codes_bot", peer, OutgoingMessage("x"))
    with pytest.raises(FloodWait) as flood:
        await transport.send("codes_bot", peers[3], OutgoingMessage("x"))
    assert flood.value.seconds >= 1 and telegram.flood_errors == 1
    mono.t += 0.11  # one slot at 10/s
    await transport.send("codes_bot", peers[3], OutgoingMessage("x"))
    # Per chat: 2 at once, then 1/s.
    mono.t += 10
    await transport.send("codes_bot", peers[4], OutgoingMessage("x"))
    await transport.send("codes_bot", peers[4], OutgoingMessage("x"))
    with pytest.raises(FloodWait):
        await transport.send("codes_bot", peers[4], OutgoingMessage("x"))
    mono.t += 1
    await transport.send("codes_bot", peers[4], OutgoingMessage("x"))


async def test_tokens_and_sessions(world: World) -> None:
    telegram, transport, _ = world
    identity, session = await transport.check_token("6000000001:abc")
    assert identity.username == "sandbox6000000001_bot" and session
    with pytest.raises(TokenInvalid):
        await transport.check_token("6000000001:other")
    with pytest.raises(TokenInvalid):
        await transport.check_token("nonsense")
    await transport.stop_bot("codes_bot")
    with pytest.raises(BotNotRunning):
        await transport.send("codes_bot", Peer(1, 1), OutgoingMessage("x"))
    with pytest.raises(BotNotRunning):
        await telegram.start(telegram.create_user().user_id, "codes_bot")
    assert sandbox_token("codes_bot") == sandbox_token("codes_bot") != sandbox_token("other_bot")

"""The Telethon transport against Telethon's own objects: TL requests and results (both forms of
messages.sendMessage), Telethon's error classes, its session, its update pipeline with pts sequencing,
getDifference after being away (slices, "too long"), session identity, and the handled state."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY
from pymongo.asynchronous.database import AsyncDatabase
from telethon.tl import functions, types

from services.botgateway.sandbox_link import sandbox_client_factory
from services.botgateway.telethon_client import KeptSession
from services.botgateway.telethon_transport import TelethonTransport, event_from_update, map_error, reply_markup
from services.botgateway.transport import (
    AlreadySent,
    BotCredentials,
    BotDeactivated,
    BotNotRunning,
    BotStopped,
    ChatWriteForbidden,
    ContactReceived,
    FloodWait,
    IncomingEvent,
    Keyboard,
    MessageTooLong,
    OutgoingMessage,
    Peer,
    PeerFlood,
    PeerInvalid,
    RecipientIsBot,
    TextReceived,
    TokenInvalid,
    TransportError,
    UserBlocked,
    UserDeactivated,
)
from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.telegramsim.model import SandboxLimits, SimUser
from services.telegramsim.mtproto import MtprotoEndpoint
from services.telegramsim.store import TelegramStore
from services.telegramsim.telegram import SimulatedTelegram
from tests.unit.botgateway.telethon_wire import KeptStates, LocalWire

TOKEN = "5123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
OTHER_TOKEN = "5987654321:AAOtherBotSecret_x"
BOT = "acme_codes_bot"
USER = 4242
API = (12345, "0123456789abcdef0123456789abcdef")


@dataclass
class World:
    telegram: SimulatedTelegram
    wire: LocalWire
    transport: TelethonTransport
    states: KeptStates
    received: list[IncomingEvent]

    def hash_of(self, user_id: int = USER, bot: str = BOT) -> int:
        return self.telegram.access_hash(self.telegram.bot(bot), user_id)

    async def person(self, user_id: int = USER, *, started: bool = True, language: str = "ru") -> SimUser:
        user = await self.telegram.create_user(user_id, "Ann", language, f"+7999{user_id:07d}")
        if started:
            self.telegram.chat(BOT, user_id).started = True
        return user

    async def start(self, token: str = TOKEN, session: str = "", bot_id: str = BOT) -> str:
        """Start the bot from its kept state; returns the session to keep."""
        started = await self.transport.start_bot(BotCredentials(bot_id, token, session, self.states.last(bot_id)))
        return started.session

    async def until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        """Updates arrive asynchronously (Telethon's update loop); wait for them, bounded."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.01)


@pytest.fixture
def limits() -> SandboxLimits:
    return SandboxLimits(bot_rate=1000, bot_burst=1000, chat_rate=1000, chat_burst=1000, reply_wait=5.0)


@pytest.fixture
async def world(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, limits: SandboxLimits
) -> AsyncIterator[World]:
    telegram = SimulatedTelegram(TelegramStore(database, keyring), limits, clock)
    await telegram.load()
    await telegram.add_bot(BOT, TOKEN)
    wire = LocalWire(MtprotoEndpoint(telegram))
    transport = TelethonTransport(*API, factory=sandbox_client_factory(wire))
    states = KeptStates()
    received: list[IncomingEvent] = []

    async def handler(event: IncomingEvent) -> list[int]:
        received.append(event)
        return []

    transport.set_handler(handler)
    transport.set_state_keeper(states)
    yield World(telegram, wire, transport, states, received)
    await transport.close()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# Login, sessions, identity --------------------------------------------------------------------


async def test_token_login_returns_identity_state_and_a_session_that_is_reused(world: World) -> None:
    identity, session, state = await world.transport.check_token(TOKEN)
    assert (identity.telegram_id, identity.username) == (5123456789, BOT)
    logins = world.wire.sent(functions.auth.ImportBotAuthorizationRequest)
    assert session and len(logins) == 1 and (logins[0].api_id, logins[0].api_hash) == API
    assert state.pts == world.telegram.state(world.telegram.bot(BOT)).pts
    # Starting from the saved session does not import the authorisation again.
    kept = await world.transport.start_bot(BotCredentials(BOT, TOKEN, session, state))
    assert kept.identity == identity and kept.session == session and kept.update_state == state
    assert len(world.wire.sent(functions.auth.ImportBotAuthorizationRequest)) == 1
    assert world.transport.running(BOT)


async def test_bad_token_is_refused(world: World) -> None:
    with pytest.raises(TokenInvalid):
        await world.transport.check_token("5123456789:wrong-secret")


async def test_the_session_of_another_bot_is_refused_and_replaced(world: World) -> None:
    await world.telegram.add_bot("other_codes_bot", OTHER_TOKEN)
    _, other_session, _ = await world.transport.check_token(OTHER_TOKEN)
    before = counter("otpgate_bot_session_replacements_total", bot=BOT, reason="another_bot")
    session = await world.start(session=other_session)  # bot A configured with bot B's session
    assert (
        session != other_session and KeptSession(session).auth_key.key_id != KeptSession(other_session).auth_key.key_id
    )
    assert counter("otpgate_bot_session_replacements_total", bot=BOT, reason="another_bot") == before + 1
    me = await world.transport.client(BOT).get_me()
    assert me.id == 5123456789  # it now runs as the bot its token names


@pytest.mark.parametrize("refusal", ["AUTH_KEY_UNREGISTERED", "SESSION_REVOKED", "AUTH_KEY_DUPLICATED"])
async def test_a_refused_session_is_replaced_by_a_login_with_the_token(world: World, refusal: str) -> None:
    _, session, _ = await world.transport.check_token(TOKEN)
    key_id = KeptSession(session).auth_key.key_id
    if refusal == "AUTH_KEY_UNREGISTERED":
        await world.telegram.sessions.log_out(key_id)
    elif refusal == "SESSION_REVOKED":
        await world.telegram.sessions.revoke(key_id)
    else:  # two connections on one key
        await world.telegram.sessions.connect(key_id, 1)
        with pytest.raises(Exception, match="AUTH_KEY_DUPLICATED"):
            await world.telegram.sessions.connect(key_id, 2)
    logins = len(world.wire.sent(functions.auth.ImportBotAuthorizationRequest))
    before = counter("otpgate_bot_session_replacements_total", bot=BOT, reason="refused")
    new_session = await world.start(session=session)
    assert new_session and KeptSession(new_session).auth_key.key_id != key_id
    assert len(world.wire.sent(functions.auth.ImportBotAuthorizationRequest)) == logins + 1
    assert counter("otpgate_bot_session_replacements_total", bot=BOT, reason="refused") == before + 1
    assert world.transport.running(BOT)


@pytest.mark.parametrize("saved", ["sandbox:5123456789", "1not-base64", "2" + "A" * 10])
async def test_an_unreadable_saved_session_is_replaced_by_a_login_with_the_token(world: World, saved: str) -> None:
    """A session string from an older format (or damaged) must not keep the bot from starting."""
    session = await world.start(session=saved)
    assert session and session != saved and world.transport.running(BOT)
    assert len(world.wire.sent(functions.auth.ImportBotAuthorizationRequest)) == 1


async def test_a_flood_wait_on_login_is_the_callers_to_respect(world: World) -> None:
    world.wire.script(functions.auth.ImportBotAuthorizationRequest, lambda request: (420, "FLOOD_WAIT_30"))
    with pytest.raises(FloodWait) as flood:
        await world.start()
    assert flood.value.seconds == 30 and not world.transport.running(BOT)


# Sending -------------------------------------------------------------------------------------------


async def test_protected_silent_message_goes_out_as_send_message_request(world: World) -> None:
    await world.person()
    await world.start()
    message_id = await world.transport.send(
        BOT, Peer(USER, world.hash_of()), OutgoingMessage("Your code: 123456", protect_content=True, silent=True)
    )
    sent = world.wire.sent(functions.messages.SendMessageRequest)[-1]
    assert sent.noforwards is True and sent.silent is True and sent.no_webpage is True
    assert sent.peer == types.InputPeerUser(user_id=USER, access_hash=world.hash_of())
    assert sent.message == "Your code: 123456"
    stored = await world.telegram.bot_message(world.telegram.bot(BOT), message_id)
    assert stored is not None and stored.text == "Your code: 123456" and stored.protect_content and stored.silent
    await world.transport.send(BOT, Peer(USER, world.hash_of()), OutgoingMessage("hello"))
    plain = world.wire.sent(functions.messages.SendMessageRequest)[-1]
    assert not plain.noforwards and not plain.silent


def test_the_request_contact_keyboard_is_pinned_to_its_tl_constructors() -> None:
    """A Telethon upgrade that changes the keyboard's TL shape must fail here."""
    data = bytes(reply_markup(Keyboard("Share my number")))

    def word(offset: int) -> int:
        return int(struct.unpack_from("<I", data, offset)[0])

    assert word(0) == 0x85DD99D1  # replyKeyboardMarkup
    assert word(4) & 0b11 == 0b11  # flags: resize, single_use
    assert (word(8), word(12)) == (0x1CB5C415, 1)  # Vector<KeyboardButtonRow> of one
    assert word(16) == 0x77608B83  # keyboardButtonRow
    assert (word(20), word(24)) == (0x1CB5C415, 1)  # Vector<KeyboardButton> of one
    assert word(28) == 0x2F67A72F  # keyboardButton (no style flag set)
    assert data[36 : 36 + data[36] + 1] == bytes([15]) + b"Share my number"  # the label, a TL string
    assert word(len(data) - 4) == 0xDF3D36F9  # buttonTypeRequestPhone
    assert bytes(reply_markup(Keyboard(remove=True))) == struct.pack("<II", 0xA03E5B85, 0)  # replyKeyboardHide


async def test_both_send_reply_forms_give_the_id_that_delete_uses(world: World) -> None:
    await world.person()
    await world.start()
    peer = Peer(USER, world.hash_of())
    plain = await world.transport.send(BOT, peer, OutgoingMessage("code 1"))  # updateShortSentMessage
    keyed = await world.transport.send(BOT, peer, OutgoingMessage("share", keyboard=Keyboard("Share")))  # updates
    assert keyed == plain + 1
    await world.transport.delete(BOT, peer, [keyed])
    bot = world.telegram.bot(BOT)
    first, second = await world.telegram.bot_message(bot, plain), await world.telegram.bot_message(bot, keyed)
    assert first is not None and not first.deleted and first.text == "code 1"
    assert second is not None and second.deleted and second.request_contact
    await world.transport.delete(BOT, peer, [plain])
    assert first.deleted
    deleted = world.wire.sent(functions.messages.DeleteMessagesRequest)
    assert [d.id for d in deleted] == [[keyed], [plain]] and all(d.revoke for d in deleted)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ((400, "USER_IS_BLOCKED"), UserBlocked),
        ((400, "PEER_ID_INVALID"), PeerInvalid),
        ((400, "INPUT_USER_DEACTIVATED"), UserDeactivated),
        ((420, "FLOOD_WAIT_37"), FloodWait),
        ((400, "USER_IS_BOT"), RecipientIsBot),
        ((400, "MESSAGE_TOO_LONG"), MessageTooLong),
        ((403, "CHAT_WRITE_FORBIDDEN"), ChatWriteForbidden),
        ((400, "PEER_FLOOD"), PeerFlood),
        ((401, "USER_DEACTIVATED_BAN"), BotDeactivated),
        ((500, "RANDOM_ID_DUPLICATE"), AlreadySent),
    ],
)
async def test_send_errors_are_mapped(world: World, error: tuple[int, str], expected: type[Exception]) -> None:
    await world.person()
    await world.start()
    world.wire.script(functions.messages.SendMessageRequest, lambda request: error)
    with pytest.raises(expected) as raised:
        await world.transport.send(BOT, Peer(USER, world.hash_of()), OutgoingMessage("x"))
    if isinstance(raised.value, FloodWait):
        assert raised.value.seconds == 37
    if expected is BotDeactivated:
        assert not world.transport.running(BOT)  # the session is over; the next round logs in again


async def test_an_unmapped_error_is_a_counted_transport_error_with_its_telegram_name(world: World) -> None:
    await world.person()
    await world.start()
    world.wire.script(functions.messages.SendMessageRequest, lambda request: (400, "SOMETHING_NEW_FROM_TELEGRAM"))
    before = counter("otpgate_bot_telegram_errors_total", bot=BOT, error="SOMETHING_NEW_FROM_TELEGRAM")
    with pytest.raises(TransportError) as raised:
        await world.transport.send(BOT, Peer(USER, world.hash_of()), OutgoingMessage("x"))
    assert type(raised.value) is TransportError and str(raised.value) == "SOMETHING_NEW_FROM_TELEGRAM"
    assert counter("otpgate_bot_telegram_errors_total", bot=BOT, error="SOMETHING_NEW_FROM_TELEGRAM") == before + 1


async def test_access_hashes_are_per_bot_and_only_for_people_who_started_it(world: World) -> None:
    await world.telegram.add_bot("other_codes_bot", OTHER_TOKEN)
    await world.person(started=False)
    await world.start()
    good = Peer(USER, world.hash_of())
    with pytest.raises(PeerInvalid):  # never started the bot
        await world.transport.send(BOT, good, OutgoingMessage("x"))
    world.telegram.chat(BOT, USER).started = True
    for wrong in (0, world.hash_of(bot="other_codes_bot"), good.access_hash + 1):
        with pytest.raises(PeerInvalid):
            await world.transport.send(BOT, Peer(USER, wrong), OutgoingMessage("x"))
    assert await world.transport.send(BOT, good, OutgoingMessage("x")) > 0


async def test_send_through_a_stopped_bot_is_refused(world: World) -> None:
    await world.start()
    await world.transport.stop_bot(BOT)
    with pytest.raises(BotNotRunning):
        await world.transport.send(BOT, Peer(USER, 1), OutgoingMessage("x"))


def test_map_error_names_its_outcomes() -> None:
    from telethon import errors

    assert isinstance(map_error(errors.AccessTokenInvalidError(request=None)), TokenInvalid)
    assert map_error(ValueError("x")) is None


# Receiving -------------------------------------------------------------------------------------


async def test_a_persons_actions_reach_the_handler_through_telethons_update_pipeline(world: World) -> None:
    await world.person(started=False)
    await world.start()
    await world.telegram.start_bot(USER, BOT, "ref_1")
    await world.telegram.share_contact(USER, BOT)
    await world.telegram.share_contact(USER, BOT, phone="+79990000000")
    await world.telegram.share_contact(USER, BOT, forwarded=True)
    await world.telegram.send_text(USER, BOT, "123456")
    await world.telegram.set_blocked(USER, BOT, True)
    start, own, foreign, forwarded, text, blocked = world.received
    assert isinstance(start, TextReceived) and start.text == "/start ref_1" and start.sender.language_code == "ru"
    assert start.sender.access_hash == world.hash_of() and start.message_id > 0
    assert isinstance(own, ContactReceived) and (own.contact_user_id, own.phone) == (USER, "79990004242")
    assert isinstance(foreign, ContactReceived) and foreign.contact_user_id == 0  # like Telegram
    assert isinstance(forwarded, ContactReceived) and forwarded.forwarded
    assert isinstance(text, TextReceived) and text.text == "123456"
    assert isinstance(blocked, BotStopped) and blocked.stopped and blocked.qts == 1
    # The kept state followed the handled updates, and the box agrees with Telegram.
    assert world.states.last(BOT) == world.transport.client(BOT).box_state()
    assert world.states.last(BOT).pts == world.telegram.state(world.telegram.bot(BOT)).pts  # type: ignore[union-attr]


async def test_what_a_person_sends_while_the_bot_is_stopped_is_handled_after_it_starts(
    world: World, clock: ManualClock
) -> None:
    await world.person(started=False)
    await world.start()
    await world.transport.stop_bot(BOT)
    assert await world.telegram.start_bot(USER, BOT) == []  # offline: no answer, the update waits
    clock.advance(1)
    await world.telegram.share_contact(USER, BOT)
    clock.advance(1)
    await world.telegram.set_blocked(USER, BOT, True)
    clock.advance(1)
    await world.telegram.start_bot(USER, BOT)  # "Restart": unblocks, then /start, in the same second
    clock.advance(1)
    await world.telegram.send_text(USER, BOT, "/help")
    assert world.received == []
    await world.start()
    await world.until(lambda: len(world.received) == 6)
    kinds = [(type(e).__name__, getattr(e, "text", getattr(e, "stopped", None))) for e in world.received]
    assert kinds == [
        ("TextReceived", "/start"),
        ("ContactReceived", None),
        ("BotStopped", True),
        ("BotStopped", False),  # the restart's unblock comes before the /start it allows
        ("TextReceived", "/start"),
        ("TextReceived", "/help"),
    ]
    assert counter("otpgate_bot_differences_total", bot=BOT, kind="difference") >= 1


@pytest.mark.parametrize("limits", [SandboxLimits(difference_slice=2, reply_wait=5.0)])
async def test_a_long_absence_comes_back_in_slices(world: World, limits: SandboxLimits) -> None:
    await world.person()
    await world.start()
    await world.transport.stop_bot(BOT)
    for i in range(7):
        await world.telegram.send_text(USER, BOT, f"message {i}")
    slices = counter("otpgate_bot_differences_total", bot=BOT, kind="slice")
    await world.start()
    await world.until(lambda: len(world.received) == 7)
    assert [e.text for e in world.received if isinstance(e, TextReceived)] == [f"message {i}" for i in range(7)]
    assert counter("otpgate_bot_differences_total", bot=BOT, kind="slice") >= slices + 3


@pytest.mark.parametrize("limits", [SandboxLimits(difference_limit=3, reply_wait=5.0)])
async def test_a_difference_too_long_is_counted_logged_and_updates_flow_again(
    world: World, limits: SandboxLimits, captured_logs: object
) -> None:
    await world.person()
    await world.start()
    await world.transport.stop_bot(BOT)
    for i in range(5):
        await world.telegram.send_text(USER, BOT, f"lost {i}")
    too_long = counter("otpgate_bot_differences_total", bot=BOT, kind="too_long")
    await world.start()
    await world.until(lambda: counter("otpgate_bot_differences_total", bot=BOT, kind="too_long") == too_long + 1)
    assert "bot_difference_too_long" in captured_logs.text()  # type: ignore[attr-defined]
    await world.until(lambda: world.states.last(BOT).pts == world.telegram.state(world.telegram.bot(BOT)).pts)  # type: ignore[union-attr]
    await world.telegram.send_text(USER, BOT, "after the gap")
    await world.until(lambda: any(getattr(e, "text", "") == "after the gap" for e in world.received))
    assert not any(getattr(e, "text", "").startswith("lost") for e in world.received)


async def test_a_new_bot_keeps_its_state_before_listening_and_answers_the_first_start(world: World) -> None:
    await world.person(started=False)
    assert world.telegram.state(world.telegram.bot(BOT)).pts == 0  # a brand-new bot
    await world.start()
    first = world.states.kept[BOT][0]
    assert first.pts == 0  # kept before anything was received
    subscribed = [
        i
        for i, r in enumerate(world.wire.requests)
        if isinstance(r, functions.updates.GetStateRequest | functions.updates.GetDifferenceRequest)
    ]
    assert subscribed, "the state came from Telegram"
    await world.telegram.start_bot(USER, BOT)
    assert [type(e).__name__ for e in world.received] == ["TextReceived"]
    assert world.states.last(BOT).pts == 1  # type: ignore[union-attr]


async def test_a_new_bot_starts_even_where_telegram_refuses_a_difference_from_pts_0(world: World) -> None:
    """Some servers answer getDifference(pts=0) with PERSISTENT_TIMESTAMP_EMPTY: getState's state is kept,
    and the first update (pts 1) still applies on a known pts of 0."""

    def empty_pts(request: functions.updates.GetDifferenceRequest) -> tuple[int, str] | None:
        return (400, "PERSISTENT_TIMESTAMP_EMPTY") if request.pts == 0 else None

    world.wire.script(functions.updates.GetDifferenceRequest, empty_pts)
    await world.person(started=False)
    await world.start()
    assert world.states.kept[BOT][0].pts == 0
    await world.telegram.start_bot(USER, BOT)
    assert [type(e).__name__ for e in world.received] == ["TextReceived"]


async def test_the_kept_state_never_runs_ahead_of_the_handlers(world: World) -> None:
    """While one person's update is in the handler, later ones (of others) finish; the kept state
    stays behind the unfinished one until it finishes too."""
    release = asyncio.Event()
    seen: list[str] = []

    async def slow(event: IncomingEvent) -> list[int]:
        if isinstance(event, TextReceived) and event.text == "slow":
            await release.wait()
        seen.append(getattr(event, "text", ""))
        return []

    world.transport.set_handler(slow)
    await world.person(4242)
    await world.person(4343)
    await world.start()
    base = world.states.last(BOT)
    assert base is not None
    world.telegram.limits = SandboxLimits(reply_wait=0.05)  # do not wait for answers in this test
    await world.telegram.send_text(4242, BOT, "slow")
    await world.telegram.send_text(4343, BOT, "quick")
    await world.until(lambda: seen == ["quick"])
    assert all(state.pts <= base.pts for state in world.states.kept[BOT])
    release.set()
    await world.until(lambda: seen == ["quick", "slow"])
    await world.until(lambda: world.states.last(BOT).pts == base.pts + 2)  # type: ignore[union-attr]


async def test_a_lost_connection_reconnects_and_catches_up(world: World) -> None:
    await world.person()
    await world.start()  # a brand-new bot: nothing to catch up at start, no difference in flight
    client = world.transport.client(BOT)
    await world.until(lambda: client._sender._transport_connected())
    world.wire.cut()
    await world.until(lambda: not client._sender._transport_connected())
    world.telegram.limits = SandboxLimits(reply_wait=0.05)
    await world.telegram.send_text(USER, BOT, "while cut")  # the bot looks offline to Telegram
    world.wire.restore()
    # The sender reconnects (1 s later) and asks Telethon to catch up, which fetches the difference.
    await world.until(lambda: any(getattr(e, "text", "") == "while cut" for e in world.received), timeout=4)
    assert world.transport.running(BOT)


async def test_each_drop_gets_its_retries_afresh_and_a_link_that_stays_down_ends_the_session(world: World) -> None:
    # The update stream of a long-running bot drops now and then; a drop long after the last one
    # must not be cut short by the retries the earlier ones used.
    world.transport = TelethonTransport(*API, factory=sandbox_client_factory(world.wire, retries=2, delay=0.05))
    world.transport.set_state_keeper(world.states)
    await world.person()
    await world.start()
    client = world.transport.client(BOT)
    for drop in range(1, 4):
        await world.until(lambda: client._sender._transport_connected())
        world.wire.cut()
        # Down for as many reconnection attempts as the sender may make, then back.
        await world.until(lambda: world.wire.refused_ready == 2 * drop)  # noqa: B023
        world.wire.restore()
    await world.until(lambda: client._sender._transport_connected())
    assert world.transport.running(BOT)
    world.wire.cut()  # and now it stays down: two retries, then the session ends
    await world.until(lambda: not world.transport.running(BOT))
    await world.transport.close()


def test_event_mapping_of_text_forwarded_foreign_contact_and_bot_stopped() -> None:
    user = types.User(id=USER, access_hash=-998877665544, first_name="Ann", lang_code="en")
    text = types.UpdateNewMessage(
        message=types.Message(id=3, peer_id=types.PeerUser(USER), date=datetime.now(UTC), message="/start ref_1"),
        pts=2,
        pts_count=1,
    )
    text._entities = {USER: user}
    event = event_from_update("b", text)
    assert (
        isinstance(event, TextReceived) and event.text == "/start ref_1" and event.sender.access_hash == -998877665544
    )
    assert event.key == "m3"
    stopped = event_from_update("b", types.UpdateBotStopped(user_id=USER, date=datetime.now(UTC), stopped=True, qts=1))
    assert stopped == BotStopped("b", USER, True, 1) and stopped.key == "q1"
    outgoing = types.UpdateNewMessage(
        message=types.Message(id=5, peer_id=types.PeerUser(USER), date=datetime.now(UTC), message="x", out=True),
        pts=4,
        pts_count=1,
    )
    assert event_from_update("b", outgoing) is None


async def test_short_updates_without_users_take_the_access_hash_from_telethons_cache(world: World) -> None:
    await world.start()
    client = world.transport.client(BOT)
    person = types.User(id=USER, access_hash=-998877665544, first_name="Ann")
    client.session.process_entities(types.contacts.ResolvedPeer(peer=types.PeerUser(USER), users=[person], chats=[]))
    client._updates_queue.put_nowait(
        types.UpdateShortMessage(
            id=77, user_id=USER, message="/help", pts=client.box_state().pts + 1, pts_count=1, date=datetime.now(UTC)
        )
    )
    await world.until(lambda: len(world.received) == 1)
    event = world.received[0]
    assert isinstance(event, TextReceived) and event.sender.access_hash == -998877665544 and event.text == "/help"

"""The Telethon adapter against Telethon's own objects: requests, updates, errors, sessions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from telethon import errors
from telethon.tl import functions, types

from services.botgateway.telethon_transport import TelethonTransport, event_from_update, map_error
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
from tests.unit.botgateway.telethon_wire import FakeTelegramServer, client_factory

TOKEN = "5123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
USER = 4242


def new_message_update(message: types.Message, user: types.User) -> types.Updates:
    return types.Updates(
        updates=[types.UpdateNewMessage(message=message, pts=2, pts_count=1)],
        users=[user],
        chats=[],
        date=datetime.now(UTC),
        seq=0,
    )


def person(lang: str = "ru") -> types.User:
    return types.User(id=USER, access_hash=-998877665544, first_name="Ann", lang_code=lang)


@pytest.fixture
def telegram() -> FakeTelegramServer:
    return FakeTelegramServer(5123456789, "Acme_Codes_Bot", TOKEN)


@pytest.fixture
async def transport(telegram: FakeTelegramServer) -> TelethonTransport:
    t = TelethonTransport(12345, "0123456789abcdef0123456789abcdef", factory=client_factory(telegram))
    yield t  # type: ignore[misc]
    await t.close()


async def test_token_login_returns_identity_and_a_session_that_is_reused(
    telegram: FakeTelegramServer, transport: TelethonTransport
) -> None:
    identity, session = await transport.check_token(TOKEN)
    assert (identity.telegram_id, identity.username) == (5123456789, "Acme_Codes_Bot")
    assert session and telegram.login_count == 1
    login = next(r for r in telegram.requests if isinstance(r, functions.auth.ImportBotAuthorizationRequest))
    assert (login.api_id, login.api_hash) == (12345, "0123456789abcdef0123456789abcdef")
    # Starting from the saved session does not import the authorisation again.
    identity2, session2 = await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN, session))
    assert identity2 == identity and telegram.login_count == 1
    assert transport.running("acme_codes_bot") and session2


async def test_bad_token_is_refused(transport: TelethonTransport) -> None:
    with pytest.raises(TokenInvalid):
        await transport.check_token("5123456789:wrong-secret")


async def test_protected_silent_message_goes_out_as_send_message_request(
    telegram: FakeTelegramServer, transport: TelethonTransport
) -> None:
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    message_id = await transport.send(
        "acme_codes_bot",
        Peer(USER, -998877665544),
        OutgoingMessage("Your code: 123456", protect_content=True, silent=True),
    )
    assert message_id == telegram.next_message_id
    sent = [r for r in telegram.requests if isinstance(r, functions.messages.SendMessageRequest)][-1]
    assert sent.noforwards is True and sent.silent is True and sent.no_webpage is True
    assert sent.peer == types.InputPeerUser(user_id=USER, access_hash=-998877665544)
    assert sent.message == "Your code: 123456"
    # An unprotected message leaves the flags off.
    await transport.send("acme_codes_bot", Peer(USER, 1), OutgoingMessage("hello"))
    plain = [r for r in telegram.requests if isinstance(r, functions.messages.SendMessageRequest)][-1]
    assert not plain.noforwards and not plain.silent


async def test_contact_button_and_keyboard_removal(telegram: FakeTelegramServer, transport: TelethonTransport) -> None:
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    await transport.send("acme_codes_bot", Peer(USER, 1), OutgoingMessage("share", keyboard=Keyboard("Share")))
    await transport.send("acme_codes_bot", Peer(USER, 1), OutgoingMessage("ok", keyboard=Keyboard(remove=True)))
    ask, done = [r for r in telegram.requests if isinstance(r, functions.messages.SendMessageRequest)][-2:]
    button = ask.reply_markup.rows[0].buttons[0]
    assert isinstance(button.type, types.ButtonTypeRequestPhone) and button.text == "Share"
    assert isinstance(done.reply_markup, types.ReplyKeyboardHide)


async def test_message_id_from_full_updates(telegram: FakeTelegramServer, transport: TelethonTransport) -> None:
    def answer(request: functions.messages.SendMessageRequest) -> types.Updates:
        return types.Updates(
            updates=[types.UpdateMessageID(id=555, random_id=request.random_id)],
            users=[],
            chats=[],
            date=datetime.now(UTC),
            seq=0,
        )

    telegram.on_send = answer
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    assert await transport.send("acme_codes_bot", Peer(USER, 1), OutgoingMessage("x")) == 555


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.UserIsBlockedError(request=None), UserBlocked),
        (errors.PeerIdInvalidError(request=None), PeerInvalid),
        (errors.InputUserDeactivatedError(request=None), UserDeactivated),
        (errors.FloodWaitError(request=None, capture=37), FloodWait),
    ],
)
async def test_send_errors_are_mapped(
    telegram: FakeTelegramServer, transport: TelethonTransport, error: Exception, expected: type[Exception]
) -> None:
    def refuse(request: object) -> object:
        raise error

    telegram.on_send = refuse
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    with pytest.raises(expected) as raised:
        await transport.send("acme_codes_bot", Peer(USER, 1), OutgoingMessage("x"))
    if isinstance(raised.value, FloodWait):
        assert raised.value.seconds == 37


def test_map_error_covers_login_errors() -> None:
    assert isinstance(map_error(errors.AccessTokenInvalidError(request=None)), TokenInvalid)
    assert isinstance(map_error(errors.AuthKeyDuplicatedError(request=None)), BotNotRunning)
    assert map_error(ValueError("x")) is None


async def test_delete_uses_revoke(telegram: FakeTelegramServer, transport: TelethonTransport) -> None:
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    await transport.delete("acme_codes_bot", Peer(USER, 5), [101, 102])
    deleted = [r for r in telegram.requests if isinstance(r, functions.messages.DeleteMessagesRequest)][-1]
    assert deleted.id == [101, 102] and deleted.revoke is True


async def test_send_through_a_stopped_bot_is_refused(transport: TelethonTransport) -> None:
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    await transport.stop_bot("acme_codes_bot")
    with pytest.raises(BotNotRunning):
        await transport.send("acme_codes_bot", Peer(USER, 1), OutgoingMessage("x"))


async def test_incoming_updates_flow_through_telethon_to_the_handler(
    telegram: FakeTelegramServer, transport: TelethonTransport
) -> None:
    received: list[IncomingEvent] = []
    arrived = asyncio.Event()

    async def handler(event: IncomingEvent) -> list[int]:
        received.append(event)
        arrived.set()
        return []

    transport.set_handler(handler)
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    client = transport.client("acme_codes_bot")
    contact = types.Message(
        id=9,
        peer_id=types.PeerUser(USER),
        date=datetime.now(UTC),
        message="",
        media=types.MessageMediaContact(
            phone_number="79991234567", first_name="Ann", last_name="", vcard="", user_id=USER
        ),
    )
    # Into Telethon's own update queue, as the network reader would put it.
    client._updates_queue.put_nowait(new_message_update(contact, person()))
    await asyncio.wait_for(arrived.wait(), 5)
    event = received[0]
    assert isinstance(event, ContactReceived)
    assert event.sender.user_id == USER and event.sender.access_hash == -998877665544
    assert event.sender.language_code == "ru"
    assert (event.contact_user_id, event.phone, event.forwarded) == (USER, "79991234567", False)


def test_event_mapping_of_text_forwarded_foreign_contact_and_bot_stopped() -> None:
    user = person("en")
    text = types.UpdateNewMessage(
        message=types.Message(id=3, peer_id=types.PeerUser(USER), date=datetime.now(UTC), message="/start ref_1"),
        pts=2,
        pts_count=1,
    )
    text._entities = {USER: user}
    event = event_from_update("b", text)
    assert (
        isinstance(event, TextReceived)
        and event.text == "/start ref_1"
        and event.sender.access_hash == user.access_hash
    )

    foreign = types.UpdateNewMessage(
        message=types.Message(
            id=4,
            peer_id=types.PeerUser(USER),
            date=datetime.now(UTC),
            message="",
            fwd_from=types.MessageFwdHeader(date=datetime.now(UTC)),
            media=types.MessageMediaContact(
                phone_number="79990000000", first_name="Bob", last_name="", vcard="", user_id=0
            ),
        ),
        pts=3,
        pts_count=1,
    )
    contact = event_from_update("b", foreign)
    assert isinstance(contact, ContactReceived)
    assert contact.contact_user_id == 0 and contact.forwarded is True and contact.sender.access_hash == 0

    stopped = event_from_update("b", types.UpdateBotStopped(user_id=USER, date=datetime.now(UTC), stopped=True, qts=1))
    assert stopped == BotStopped("b", USER, True)
    resumed = event_from_update("b", types.UpdateBotStopped(user_id=USER, date=datetime.now(UTC), stopped=False, qts=2))
    assert resumed == BotStopped("b", USER, False)

    outgoing = types.UpdateNewMessage(
        message=types.Message(id=5, peer_id=types.PeerUser(USER), date=datetime.now(UTC), message="x", out=True),
        pts=4,
        pts_count=1,
    )
    assert event_from_update("b", outgoing) is None


async def test_short_update_without_users_takes_the_access_hash_from_telethons_cache(
    transport: TelethonTransport,
) -> None:
    received: list[IncomingEvent] = []

    async def handler(event: IncomingEvent) -> list[int]:
        received.append(event)
        return []

    transport.set_handler(handler)
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    client = transport.client("acme_codes_bot")
    client.session.process_entities(types.contacts.ResolvedPeer(peer=types.PeerUser(USER), users=[person()], chats=[]))
    update = types.UpdateNewMessage(
        message=types.Message(id=7, peer_id=types.PeerUser(USER), date=datetime.now(UTC), message="/help"),
        pts=2,
        pts_count=1,
    )
    await transport.handle_update("acme_codes_bot", update)
    assert isinstance(received[0], TextReceived) and received[0].sender.access_hash == -998877665544


async def test_a_client_that_lost_its_connection_is_not_running(transport: TelethonTransport) -> None:
    await transport.start_bot(BotCredentials("acme_codes_bot", TOKEN))
    assert transport.running("acme_codes_bot")
    await transport.client("acme_codes_bot")._sender.disconnect()
    assert not transport.running("acme_codes_bot")

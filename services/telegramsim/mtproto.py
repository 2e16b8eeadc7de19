"""The simulated Telegram's MTProto API: TL-serialized requests in, TL results and Updates out.

Requests are read with Telethon's TL schema (Telegram's own, at Telethon's layer) and answered
with the TL objects Telegram answers with: messages.sendMessage gives updateShortSentMessage for
a plain text and a full `updates` (updateMessageID matched by random_id, updateNewMessage) for a
message with a keyboard, as Telegram does; errors are rpc_error (code, NAME). A request not
wrapped in invokeWithoutUpdates subscribes its session to pushed updates, as on Telegram.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from telethon.extensions import BinaryReader
from telethon.tl import functions, types
from telethon.tl.tlobject import TLObject

from services.core.logging import get_logger
from services.telegramsim.model import Difference, Push, RpcError, SimBot, SimMessage, SimUser, State, bad_request
from services.telegramsim.telegram import SimulatedTelegram

log = get_logger(__name__)

_VECTOR = 0x1CB5C415


class MalformedRequest(Exception):
    """The bytes are not one TL function of the schema."""


def serialize(result: Any) -> bytes:
    """A TL result as bytes (a Vector for lists, as MTProto encodes them)."""
    if isinstance(result, list):
        return struct.pack("<Ii", _VECTOR, len(result)) + b"".join(bytes(item) for item in result)
    assert isinstance(result, TLObject)
    return bytes(result)


def parse(query: bytes) -> Any:
    try:
        with BinaryReader(query) as reader:
            request = reader.tgread_object()
    except Exception as exc:
        raise MalformedRequest(type(exc).__name__) from None
    if not getattr(request, "SUBCLASS_OF_ID", None) or not hasattr(request, "read_result"):
        raise MalformedRequest("not a TL function")
    return request


class MtprotoEndpoint:
    def __init__(self, telegram: SimulatedTelegram) -> None:
        self.telegram = telegram

    async def create_auth_key(self) -> bytes:
        return await self.telegram.sessions.create_key()

    async def invoke(self, key_id: int, session_id: int, query: bytes) -> bytes:
        """Answer one request (raises RpcError, or MalformedRequest for bytes that are no request)."""
        request = parse(query)
        subscribe = True
        while True:
            if isinstance(request, functions.InvokeWithLayerRequest | functions.InitConnectionRequest):
                request = request.query
            elif isinstance(request, functions.InvokeWithoutUpdatesRequest):
                subscribe = False
                request = request.query
            else:
                break
        result = await self._answer(key_id, session_id, request)
        if subscribe:
            self.telegram.sessions.subscribe(key_id, session_id)
        return serialize(result)

    async def updates(self, key_id: int, session_id: int) -> AsyncIterator[bytes]:
        """The session's pushed Updates while it stays connected (ends with the RpcError that closed it)."""
        connection = await self.telegram.sessions.connect(key_id, session_id)
        try:
            while True:
                item = await connection.queue.get()
                if isinstance(item, RpcError):
                    raise item
                yield bytes(self._push(item))
        finally:
            self.telegram.sessions.disconnect(key_id, session_id)

    def close(self, key_id: int, session_id: int) -> None:
        self.telegram.sessions.close_session(key_id, session_id)

    def acknowledge(self, key_id: int, pts: int, qts: int) -> None:
        self.telegram.sessions.acknowledge(key_id, pts, qts)

    # Requests ------------------------------------------------------------------------------------

    async def _answer(self, key_id: int, session_id: int, request: Any) -> Any:
        telegram = self.telegram
        if isinstance(request, functions.help.GetConfigRequest):
            telegram.sessions.known(key_id)
            return _config()
        if isinstance(request, functions.auth.ImportBotAuthorizationRequest):
            bot = await telegram.import_bot_authorization(key_id, request.api_id, request.bot_auth_token)
            return types.auth.Authorization(user=self._bot_user(bot))
        bot = telegram.authorized(key_id)
        if isinstance(request, functions.users.GetUsersRequest):
            return [user for item in request.id if (user := self._user_for(bot, item)) is not None]
        if isinstance(request, functions.updates.GetStateRequest):
            return _state(telegram.state(bot))
        if isinstance(request, functions.updates.GetDifferenceRequest):
            difference = await telegram.difference(bot, request.pts, request.qts, request.pts_total_limit)
            return self._difference(bot, difference)
        if isinstance(request, functions.messages.SendMessageRequest):
            return await self._send(bot, session_id, request)
        if isinstance(request, functions.messages.DeleteMessagesRequest):
            pts, count = await telegram.delete_messages(bot, list(request.id))
            return types.messages.AffectedMessages(pts=pts, pts_count=count)
        if isinstance(request, functions.auth.LogOutRequest):
            await telegram.sessions.log_out(key_id)
            return types.auth.LoggedOut()
        log.info("sandbox_method_unsupported", method=type(request).__name__)
        raise bad_request(f"INPUT_METHOD_INVALID_{request.CONSTRUCTOR_ID}")

    def _user_for(self, bot: SimBot, item: Any) -> Any:
        if isinstance(item, types.InputUserSelf):
            return self._bot_user(bot)
        if isinstance(item, types.InputUser):
            user = self.telegram.users.get(item.user_id)
            if user is not None and item.access_hash == self.telegram.access_hash(bot, user.user_id):
                return self._person(bot, user)
        return None

    async def _send(self, bot: SimBot, session_id: int, request: functions.messages.SendMessageRequest) -> Any:
        peer = request.peer
        if not isinstance(peer, types.InputPeerUser):
            raise bad_request("PEER_ID_INVALID")
        markup = request.reply_markup
        request_contact = isinstance(markup, types.ReplyKeyboardMarkup) and any(
            isinstance(button, types.KeyboardButton) and isinstance(button.type, types.ButtonTypeRequestPhone)
            for row in markup.rows
            for button in row.buttons
        )
        message = await self.telegram.send_message(
            bot,
            session_id,
            peer.user_id,
            peer.access_hash,
            request.message,
            request.random_id,
            protect_content=bool(request.noforwards),
            silent=bool(request.silent),
            request_contact=request_contact,
            remove_keyboard=isinstance(markup, types.ReplyKeyboardHide),
        )
        if markup is None:
            return types.UpdateShortSentMessage(
                id=message.bot_message_id, pts=message.pts, pts_count=1, date=message.date, out=True
            )
        user = self.telegram.users[message.user_id]
        return types.Updates(
            updates=[
                types.UpdateMessageID(id=message.bot_message_id, random_id=message.random_id),
                types.UpdateNewMessage(message=self._message(bot, message), pts=message.pts, pts_count=1),
            ],
            users=[self._person(bot, user)],
            chats=[],
            date=message.date,
            seq=0,
        )

    # TL views ------------------------------------------------------------------------------------

    def _bot_user(self, bot: SimBot) -> Any:
        return types.User(
            id=bot.telegram_id,
            is_self=True,
            bot=True,
            access_hash=self.telegram.access_hash(bot, bot.telegram_id),
            first_name=bot.username,
            username=bot.username,
            bot_info_version=1,
        )

    def _person(self, bot: SimBot, user: SimUser) -> Any:
        if user.deactivated:
            return types.User(id=user.user_id, deleted=True, access_hash=self.telegram.access_hash(bot, user.user_id))
        return types.User(
            id=user.user_id,
            access_hash=self.telegram.access_hash(bot, user.user_id),
            first_name=user.first_name,
            lang_code=user.language_code,
        )

    def _message(self, bot: SimBot, message: SimMessage) -> Any:
        markup: Any = None
        if message.request_contact:
            markup = types.ReplyKeyboardMarkup(
                rows=[
                    types.KeyboardButtonRow(
                        buttons=[types.KeyboardButton(text="", type=types.ButtonTypeRequestPhone())]
                    )
                ],
                resize=True,
                single_use=True,
            )
        elif message.remove_keyboard:
            markup = types.ReplyKeyboardHide()
        media: Any = None
        if message.contact_phone:
            user = self.telegram.users.get(message.user_id)
            own = message.contact_user_id == message.user_id and user is not None
            media = types.MessageMediaContact(
                phone_number=message.contact_phone,
                first_name=user.first_name if own and user is not None else "Contact",
                last_name="",
                vcard="",
                user_id=message.contact_user_id,
            )
        return types.Message(
            id=message.bot_message_id,
            peer_id=types.PeerUser(message.user_id),
            from_id=None if message.from_bot else types.PeerUser(message.user_id),
            date=message.date,
            message="" if media is not None else message.text,
            out=message.from_bot,
            silent=message.silent or None,
            noforwards=message.protect_content or None,
            fwd_from=types.MessageFwdHeader(date=message.date) if message.forwarded else None,
            media=media,
            reply_markup=markup,
        )

    def _people(self, bot: SimBot, user_ids: set[int]) -> list[Any]:
        return [self._person(bot, user) for i in sorted(user_ids) if (user := self.telegram.users.get(i)) is not None]

    def _push(self, push: Push) -> Any:
        if push.message is not None:
            bot = self.telegram.bot_by_telegram_id(push.message.bot)
            assert bot is not None
            update: Any = types.UpdateNewMessage(
                message=self._message(bot, push.message), pts=push.message.pts, pts_count=1
            )
            users = self._people(bot, {push.message.user_id})
        else:
            assert push.stopped is not None
            stop = push.stopped
            update = types.UpdateBotStopped(user_id=stop.user_id, date=stop.date, stopped=stop.stopped, qts=stop.qts)
            users = []
        return types.Updates(updates=[update], users=users, chats=[], date=push.date, seq=push.seq)

    def _difference(self, bot: SimBot, difference: Difference) -> Any:
        state = difference.state
        if difference.too_long:
            return types.updates.DifferenceTooLong(pts=state.pts)
        if difference.empty:
            return types.updates.DifferenceEmpty(date=state.date, seq=state.seq)
        other: list[Any] = [
            types.UpdateDeleteMessages(messages=list(d.bot_message_ids), pts=d.pts, pts_count=d.pts_count)
            for d in difference.deletions
        ]
        other += [
            types.UpdateBotStopped(user_id=s.user_id, date=s.date, stopped=s.stopped, qts=s.qts)
            for s in difference.stops
        ]
        people = {m.user_id for m in difference.messages} | {s.user_id for s in difference.stops}
        fields: dict[str, Any] = {
            "new_messages": [self._message(bot, m) for m in difference.messages],
            "new_encrypted_messages": [],
            "other_updates": other,
            "chats": [],
            "users": self._people(bot, people),
        }
        if difference.final:
            return types.updates.Difference(state=_state(state), **fields)
        return types.updates.DifferenceSlice(intermediate_state=_state(state), **fields)


def _state(state: State) -> Any:
    return types.updates.State(pts=state.pts, qts=state.qts, date=state.date, seq=state.seq, unread_count=0)


def _config() -> Any:
    """help.getConfig: the fields a client reads, with Telegram's values for the limits."""
    now = datetime.now(UTC)
    return types.Config(
        date=now,
        expires=datetime.fromtimestamp(now.timestamp() + 3600, UTC),
        test_mode=False,
        this_dc=2,
        dc_options=[types.DcOption(id=2, ip_address="149.154.167.51", port=443)],
        dc_txt_domain_name="apv3.stel.com",
        chat_size_max=200,
        megagroup_size_max=200000,
        forwarded_count_max=100,
        online_update_period_ms=210000,
        offline_blur_timeout_ms=5000,
        offline_idle_timeout_ms=30000,
        online_cloud_timeout_ms=300000,
        notify_cloud_delay_ms=30000,
        notify_default_delay_ms=1500,
        push_chat_period_ms=60000,
        push_chat_limit=2,
        edit_time_limit=172800,
        revoke_time_limit=2147483647,
        revoke_pm_time_limit=2147483647,
        rating_e_decay=2419200,
        stickers_recent_limit=200,
        channels_read_media_period=604800,
        call_receive_timeout_ms=20000,
        call_ring_timeout_ms=90000,
        call_connect_timeout_ms=30000,
        call_packet_timeout_ms=10000,
        me_url_prefix="https://t.me/",
        caption_length_max=1024,
        message_length_max=4096,
        webfile_dc_id=4,
    )

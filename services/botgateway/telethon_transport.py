"""The real transport: one Telethon TelegramClient per bot, all on this event loop.

Bots log in with their token once; the StringSession is handed back to the caller to be kept
sealed in MongoDB, so a restart reuses the authorisation instead of importing it again.
Telethon's own errors are mapped onto the transport errors here, and raw updates are turned
into the gateway's incoming events.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from telethon import TelegramClient, errors, events
from telethon.sessions import StringSession
from telethon.tl import functions, types

from services.botgateway.transport import (
    BotCredentials,
    BotIdentity,
    BotNotRunning,
    BotStopped,
    ContactReceived,
    EventHandler,
    FloodWait,
    IncomingEvent,
    Keyboard,
    OutgoingMessage,
    Peer,
    PeerInvalid,
    Sender,
    TextReceived,
    TokenInvalid,
    TransportError,
    UserBlocked,
    UserDeactivated,
)
from services.core.logging import get_logger

log = get_logger(__name__)

ClientFactory = Callable[[StringSession, int, str], TelegramClient]


def default_client_factory(session: StringSession, api_id: int, api_hash: str) -> TelegramClient:
    return TelegramClient(
        session,
        api_id,
        api_hash,
        flood_sleep_threshold=0,  # never sleep inside Telethon: the gateway decides
        request_retries=2,
        receive_updates=True,
        catch_up=False,
        device_model="otpgate",
        app_version="otpgate",
    )


def map_error(exc: BaseException) -> TransportError | None:
    """Telethon's errors as transport errors (None: not one we know)."""
    if isinstance(exc, errors.FloodWaitError | errors.FloodPremiumWaitError):
        return FloodWait(float(exc.seconds))
    if isinstance(exc, errors.UserIsBlockedError):
        return UserBlocked("the user blocked the bot")
    if isinstance(exc, errors.InputUserDeactivatedError):
        return UserDeactivated("the account was deleted")
    if isinstance(exc, errors.PeerIdInvalidError | errors.UserIdInvalidError):
        return PeerInvalid("the bot cannot address this user")
    if isinstance(
        exc,
        errors.AccessTokenInvalidError
        | errors.AccessTokenExpiredError
        | errors.AuthKeyUnregisteredError
        | errors.SessionRevokedError,
    ):
        return TokenInvalid("the bot token or session is not valid")
    if isinstance(exc, errors.AuthKeyDuplicatedError):
        return BotNotRunning("the session is used elsewhere")
    return None


def reply_markup(keyboard: Keyboard | None) -> Any:
    if keyboard is None:
        return None
    if keyboard.request_contact_label:
        button = types.KeyboardButton(text=keyboard.request_contact_label, type=types.ButtonTypeRequestPhone())
        return types.ReplyKeyboardMarkup(rows=[types.KeyboardButtonRow(buttons=[button])], resize=True, single_use=True)
    if keyboard.remove:
        return types.ReplyKeyboardHide()
    return None


def sent_message_id(result: Any, random_id: int) -> int:
    """The bot-side id of a sent message, from what messages.sendMessage returned."""
    if isinstance(result, types.UpdateShortSentMessage):
        return int(result.id)
    updates = getattr(result, "updates", None) or []
    for update in updates:
        if isinstance(update, types.UpdateMessageID) and update.random_id == random_id:
            return int(update.id)
    for update in updates:
        if isinstance(update, types.UpdateNewMessage):
            return int(update.message.id)
    raise TransportError("Telegram did not return the message id")


def event_from_update(bot_id: str, update: Any) -> IncomingEvent | None:
    """A raw Telethon update as a gateway event (None: not one the conversation handles)."""
    if isinstance(update, types.UpdateBotStopped):
        return BotStopped(bot_id, int(update.user_id), bool(update.stopped))
    if not isinstance(update, types.UpdateNewMessage):
        return None
    message = update.message
    if not isinstance(message, types.Message) or message.out or not isinstance(message.peer_id, types.PeerUser):
        return None
    user_id = int(message.peer_id.user_id)
    entities = getattr(update, "_entities", None) or {}
    user = entities.get(user_id)
    sender = Sender(
        user_id=user_id,
        access_hash=int(getattr(user, "access_hash", 0) or 0),
        language_code=str(getattr(user, "lang_code", "") or ""),
        first_name=str(getattr(user, "first_name", "") or ""),
    )
    if isinstance(message.media, types.MessageMediaContact):
        contact = message.media
        return ContactReceived(
            bot_id,
            sender,
            contact_user_id=int(contact.user_id or 0),
            phone=str(contact.phone_number or ""),
            forwarded=message.fwd_from is not None,
            message_id=int(message.id),
        )
    if message.message:
        return TextReceived(bot_id, sender, str(message.message), int(message.id))
    return None


class TelethonTransport:
    def __init__(self, api_id: int, api_hash: str, factory: ClientFactory = default_client_factory) -> None:
        self._api_id = api_id
        self._api_hash = api_hash
        self._factory = factory
        self._clients: dict[str, TelegramClient] = {}
        self._handler: EventHandler | None = None

    def set_handler(self, handler: EventHandler) -> None:
        self._handler = handler

    def client(self, bot_id: str) -> TelegramClient:
        client = self._clients.get(bot_id)
        if client is None:
            raise BotNotRunning(f"bot {bot_id} is not running on this replica")
        return client

    def running(self, bot_id: str) -> bool:
        """A client exists and is connected (a client that gave up reconnecting is restarted by the
        session manager's next round)."""
        client = self._clients.get(bot_id)
        return client is not None and bool(client.is_connected())

    async def _login(self, client: TelegramClient, token: str) -> BotIdentity:
        try:
            await client.connect()
            me = await client.get_me()
            if me is None:
                me = await client.sign_in(bot_token=token)
        except errors.RPCError as exc:
            raise map_error(exc) or TransportError(type(exc).__name__) from None
        if me is None or not getattr(me, "bot", False):
            raise TokenInvalid("the token does not belong to a bot")
        return BotIdentity(int(me.id), str(me.username or ""))

    async def check_token(self, token: str) -> tuple[BotIdentity, str]:
        client = self._factory(StringSession(), self._api_id, self._api_hash)
        try:
            identity = await self._login(client, token)
            return identity, str(client.session.save())
        finally:
            await client.disconnect()

    async def start_bot(self, credentials: BotCredentials) -> tuple[BotIdentity, str]:
        await self.stop_bot(credentials.bot_id)
        client = self._factory(StringSession(credentials.session or None), self._api_id, self._api_hash)
        try:
            identity = await self._login(client, credentials.token)
        except BaseException:
            await client.disconnect()
            raise
        bot_id = credentials.bot_id

        async def on_update(update: Any) -> None:
            await self.handle_update(bot_id, update)

        client.add_event_handler(on_update, events.Raw)
        self._clients[bot_id] = client
        return identity, str(client.session.save())

    async def handle_update(self, bot_id: str, update: Any) -> list[int]:
        event = event_from_update(bot_id, update)
        if event is None or self._handler is None:
            return []
        if not isinstance(event, BotStopped) and not event.sender.access_hash:
            # Short updates carry no users: take the access hash from Telethon's entity cache.
            access_hash = await self._cached_access_hash(bot_id, event.sender.user_id)
            event = replace(event, sender=replace(event.sender, access_hash=access_hash))
        try:
            return await self._handler(event)
        except Exception:
            log.exception("bot_update_failed", bot=bot_id, kind=type(event).__name__)
            return []

    async def _cached_access_hash(self, bot_id: str, user_id: int) -> int:
        client = self._clients.get(bot_id)
        if client is None:
            return 0
        try:
            peer = await client.get_input_entity(types.PeerUser(user_id))
        except (ValueError, TypeError, errors.RPCError, OSError):
            return 0
        return int(getattr(peer, "access_hash", 0) or 0)

    async def stop_bot(self, bot_id: str) -> None:
        client = self._clients.pop(bot_id, None)
        if client is not None:
            await client.disconnect()

    async def send(self, bot_id: str, peer: Peer, message: OutgoingMessage) -> int:
        client = self.client(bot_id)
        random_id = random.randrange(-(2**63), 2**63)
        request = functions.messages.SendMessageRequest(
            peer=types.InputPeerUser(user_id=peer.user_id, access_hash=peer.access_hash),
            message=message.text,
            no_webpage=True,
            silent=message.silent or None,
            noforwards=message.protect_content or None,
            random_id=random_id,
            reply_markup=reply_markup(message.keyboard),
        )
        try:
            result = await client(request)
        except errors.RPCError as exc:
            raise map_error(exc) or TransportError(type(exc).__name__) from None
        except (OSError, TimeoutError) as exc:  # connection lost; Telethon reconnects on its own
            raise TransportError(type(exc).__name__) from None
        return sent_message_id(result, random_id)

    async def delete(self, bot_id: str, peer: Peer, message_ids: list[int]) -> None:
        client = self.client(bot_id)
        try:
            await client.delete_messages(
                types.InputPeerUser(user_id=peer.user_id, access_hash=peer.access_hash), message_ids, revoke=True
            )
        except errors.RPCError as exc:
            raise map_error(exc) or TransportError(type(exc).__name__) from None
        except (OSError, TimeoutError) as exc:
            raise TransportError(type(exc).__name__) from None

    async def close(self) -> None:
        for bot_id in list(self._clients):
            await self.stop_bot(bot_id)

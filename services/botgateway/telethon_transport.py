"""The transport: one Telethon TelegramClient per bot, all on this event loop.

Starting a bot:
1. Connect with the saved session (sealed StringSession). If Telegram refuses it
   (AUTH_KEY_UNREGISTERED, SESSION_REVOKED, AUTH_KEY_DUPLICATED) or it logs in as another bot than
   the token names, log in with the token again (a FloodWait on login is the caller's to respect)
   and hand back the new session to keep.
2. The state to continue from: the kept handled state; for a bot without one, Telegram's state
   now (updates.getState, then getDifference, as Telethon's login does), kept before anything is
   received, so no update after it can be skipped; a kept state ahead of Telegram's (another
   account's, or a reset) gives way to Telegram's.
3. Subscribe to updates; when Telegram's state is ahead of that one, catch up: Telethon fetches the
   difference (slices, "too long"), while new updates arrive live. Each is dispatched to the
   handler in order per person, and the ledger (updates.py) advances the handled state, which the
   state keeper keeps.

Telethon's errors become the transport's errors here, each with its own outcome (transport.py);
an error without one is counted and logged by its Telegram name.
"""

from __future__ import annotations

import asyncio
import binascii
import random
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from telethon import errors, events
from telethon.tl import functions, types

from services.botgateway import metrics
from services.botgateway.telethon_client import KeptSession, TrackedClient
from services.botgateway.transport import (
    AlreadySent,
    BotCredentials,
    BotDeactivated,
    BotIdentity,
    BotNotRunning,
    BotStopped,
    ChatWriteForbidden,
    ContactReceived,
    DeleteForbidden,
    EventHandler,
    FloodWait,
    IncomingEvent,
    Keyboard,
    MessageTooLong,
    OutcomeUnknown,
    OutgoingMessage,
    Peer,
    PeerFlood,
    PeerInvalid,
    RecipientIsBot,
    Sender,
    SessionInvalid,
    StartedBot,
    StateKeeper,
    TextReceived,
    TokenInvalid,
    TransportError,
    UserBlocked,
    UserDeactivated,
    token_bot_id,
)
from services.botgateway.updates import HandledLedger, PerPersonOrder, UpdateState
from services.core.logging import get_logger

log = get_logger(__name__)

ClientFactory = Callable[[KeptSession, int, str, str], TrackedClient]
DRAIN_SECONDS = 3.0  # how long a stopping bot lets the updates in hand finish
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)  # a handler that failed (e.g. the database is away) tries again


def default_client_factory(session: KeptSession, api_id: int, api_hash: str, bot_id: str) -> TrackedClient:
    return TrackedClient(session, api_id, api_hash, bot_id=bot_id)


_MAPPED: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[Any], TransportError]], ...] = (
    ((errors.FloodWaitError, errors.FloodPremiumWaitError), lambda e: FloodWait(float(e.seconds))),
    (errors.UserIsBlockedError, lambda e: UserBlocked("the user blocked the bot")),
    (errors.InputUserDeactivatedError, lambda e: UserDeactivated("the account was deleted")),
    ((errors.PeerIdInvalidError, errors.UserIdInvalidError), lambda e: PeerInvalid("the bot cannot address this user")),
    (errors.UserIsBotError, lambda e: RecipientIsBot("bots cannot message bots")),
    (errors.MessageTooLongError, lambda e: MessageTooLong("the text is over Telegram's limit")),
    (errors.ChatWriteForbiddenError, lambda e: ChatWriteForbidden("the bot may not write in this chat")),
    (errors.PeerFloodError, lambda e: PeerFlood("Telegram limits this bot for sending too much")),
    (
        (errors.UserDeactivatedBanError, errors.UserDeactivatedError),
        lambda e: BotDeactivated("Telegram deactivated the bot's account"),
    ),
    (errors.RandomIdDuplicateError, lambda e: AlreadySent("Telegram is making this message already")),
    (errors.MessageDeleteForbiddenError, lambda e: DeleteForbidden("too late to delete the message")),
    (
        (errors.AccessTokenInvalidError, errors.AccessTokenExpiredError),
        lambda e: TokenInvalid("the bot token is not valid"),
    ),
    (
        (errors.AuthKeyUnregisteredError, errors.SessionRevokedError, errors.AuthKeyDuplicatedError),
        lambda e: SessionInvalid(telegram_error_name(e)),
    ),
    # A 500 after Telethon's own repeat: Telegram may have carried the request out before failing.
    ((errors.ServerError, errors.TimedOutError), lambda e: OutcomeUnknown(telegram_error_name(e))),
)


def telegram_error_name(exc: BaseException) -> str:
    """Telegram's name of an RPC error: AUTH_KEY_DUPLICATED for Telethon's AuthKeyDuplicatedError (whose
    `message` is only its category); the message itself for an error Telethon has no class for."""
    kind = type(exc)
    if kind.__module__.endswith("rpcerrorlist"):
        return re.sub(r"(?<!^)(?=[A-Z])", "_", kind.__name__.removesuffix("Error")).upper()
    return str(getattr(exc, "message", "") or kind.__name__)


def map_error(exc: BaseException) -> TransportError | None:
    """Telethon's errors as transport errors (None: not one with its own outcome)."""
    for kinds, build in _MAPPED:
        if isinstance(exc, kinds):
            return build(exc)
    return None


def transport_error(bot_id: str, exc: BaseException) -> TransportError:
    """The transport error for an RPC error; an unmapped one is counted and logged by its name."""
    mapped = map_error(exc)
    if mapped is not None:
        return mapped
    name = telegram_error_name(exc)
    metrics.telegram_errors.labels(bot_id, name).inc()
    log.warning("telegram_error_unmapped", bot=bot_id, error=name, code=getattr(exc, "code", 0))
    return TransportError(name)


async def _me_or_refused(client: TrackedClient) -> Any:
    """Connect with the saved session: who it logs in as; None when Telegram refuses it."""
    try:
        await client.connect()  # Telethon asks who it is already here when it knows no update state
        return await client.get_me()
    except (errors.UnauthorizedError, errors.AuthKeyError) as exc:
        log.info("bot_session_refused", bot=client.bot_id, error=telegram_error_name(exc))
        return None


def _readable(bot_id: str, session: str) -> KeptSession | None:
    """The saved session, if there is one this Telethon can read (else: log in with the token)."""
    if not session:
        return None
    try:
        return KeptSession(session)
    except (ValueError, TypeError, struct.error, binascii.Error):
        log.warning("bot_session_unreadable", bot=bot_id)
        metrics.session_replacements.labels(bot_id, "unreadable").inc()
        return None


async def _signed_in(client: TrackedClient, token: str) -> Any:
    await client.connect()
    return await client.sign_in(bot_token=token)


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
    """The bot-side id of a sent message, from either form messages.sendMessage answers with:
    updateShortSentMessage, or Updates carrying updateMessageID for our random_id."""
    if isinstance(result, types.UpdateShortSentMessage):
        return int(result.id)
    updates = getattr(result, "updates", None) or []
    for update in updates:
        if isinstance(update, types.UpdateMessageID) and update.random_id == random_id:
            return int(update.id)
    for update in updates:  # a server that leaves updateMessageID out: the one outgoing message
        if isinstance(update, types.UpdateNewMessage) and getattr(update.message, "out", False):
            return int(update.message.id)
    raise TransportError("Telegram did not return the message id")


def event_from_update(bot_id: str, update: Any) -> IncomingEvent | None:
    """A raw Telethon update as a gateway event (None: not one the conversation handles)."""
    if isinstance(update, types.UpdateBotStopped):
        return BotStopped(bot_id, int(update.user_id), bool(update.stopped), int(update.qts))
    if isinstance(update, types.UpdateShortMessage):
        # Telegram's short form of a private text: no users attached (the access hash comes from the cache).
        if update.out or not update.message:
            return None
        return TextReceived(bot_id, Sender(int(update.user_id)), str(update.message), int(update.id))
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
        self._clients: dict[str, TrackedClient] = {}
        self._orders: dict[str, PerPersonOrder] = {}
        self._handler: EventHandler | None = None
        self._keeper: StateKeeper | None = None

    def set_handler(self, handler: EventHandler) -> None:
        self._handler = handler

    def set_state_keeper(self, keeper: StateKeeper) -> None:
        self._keeper = keeper

    def client(self, bot_id: str) -> TrackedClient:
        client = self._clients.get(bot_id)
        if client is None:
            raise BotNotRunning(f"bot {bot_id} is not running on this replica")
        return client

    def running(self, bot_id: str) -> bool:
        """A client exists and is connected (a client that gave up reconnecting is restarted by the
        session manager's next round)."""
        client = self._clients.get(bot_id)
        return client is not None and bool(client.is_connected())

    # Logging in -----------------------------------------------------------------------------------

    async def _logged_in(self, bot_id: str, token: str, session: str) -> tuple[TrackedClient, BotIdentity]:
        """A connected client logged in as the bot the token names (the saved session if it still
        works and is that bot's, else a new one from the token)."""
        expected = token_bot_id(token)
        kept = _readable(bot_id, session)
        if kept is not None:
            client = self._factory(kept, self._api_id, self._api_hash, bot_id)
            me = await self._connected(bot_id, client, _me_or_refused)
            if me is not None and int(me.id) == expected and getattr(me, "bot", False):
                return client, BotIdentity(int(me.id), str(me.username or ""))
            if me is not None:
                log.warning("bot_session_of_another_bot", bot=bot_id)
            metrics.session_replacements.labels(bot_id, "refused" if me is None else "another_bot").inc()
            await client.disconnect()
        client = self._factory(KeptSession(), self._api_id, self._api_hash, bot_id)
        me = await self._connected(bot_id, client, lambda c: _signed_in(c, token))
        if me is None or not getattr(me, "bot", False) or int(me.id) != expected:
            await client.disconnect()
            raise TokenInvalid("the token does not log in as the bot it names")
        return client, BotIdentity(int(me.id), str(me.username or ""))

    async def _connected(
        self, bot_id: str, client: TrackedClient, step: Callable[[TrackedClient], Awaitable[Any]]
    ) -> Any:
        """Take one login step; a failure disconnects the client again."""
        try:
            return await step(client)
        except errors.RPCError as exc:
            await client.disconnect()
            raise transport_error(bot_id, exc) from None
        except BaseException:
            await client.disconnect()
            raise

    async def _base_state(self, client: TrackedClient, kept: UpdateState | None) -> UpdateState:
        """The state to continue from (see the module docstring)."""
        server = await client(functions.updates.GetStateRequest())
        now = UpdateState(int(server.pts), int(server.qts), server.date, int(server.seq))
        if kept is None:
            # As Telethon's login: Telegram may report an old qts in getState; the difference has it
            # right. A server that refuses a difference from pts 0 (a brand-new bot) leaves getState's.
            try:
                diff = await client(functions.updates.GetDifferenceRequest(pts=now.pts, date=now.date, qts=now.qts))
            except errors.RPCError as exc:
                log.info("bot_initial_difference_refused", bot=client.bot_id, error=telegram_error_name(exc))
                return now
            if isinstance(diff, types.updates.Difference | types.updates.DifferenceSlice):
                state = diff.state if isinstance(diff, types.updates.Difference) else diff.intermediate_state
                return UpdateState(int(state.pts), int(state.qts), state.date, int(state.seq))
            if isinstance(diff, types.updates.DifferenceTooLong):
                return replace(now, pts=int(diff.pts))
            return now
        if kept.pts > now.pts or kept.qts > now.qts:
            log.warning("bot_update_state_ahead_of_telegram", bot=client.bot_id, kept=kept.pts, telegram=now.pts)
            metrics.differences.labels(client.bot_id, "state_reset").inc()
            return now
        return kept

    async def check_token(self, token: str) -> tuple[BotIdentity, str, UpdateState]:
        bot_id = "registration"  # not a bot id yet: what metrics and logs call a token being checked
        try:
            client, identity = await self._logged_in(bot_id, token, "")
        except ValueError:
            raise TokenInvalid("the token is malformed") from None
        try:
            state = await self._base_state(client, None)
            return identity, str(client.session.save()), state
        except errors.RPCError as exc:
            raise transport_error(bot_id, exc) from None
        finally:
            await client.disconnect()

    # Running --------------------------------------------------------------------------------------

    async def start_bot(self, credentials: BotCredentials) -> StartedBot:
        bot_id = credentials.bot_id
        await self.stop_bot(bot_id)
        client, identity = await self._logged_in(bot_id, credentials.token, credentials.session)
        try:
            base = await self._base_state(client, credentials.update_state)
            order = PerPersonOrder()

            def advanced(state: UpdateState) -> None:
                if self._keeper is not None:
                    self._keeper.advance(bot_id, identity.telegram_id, state)
                client.handled(state)

            ledger = HandledLedger(base, advanced)
            client.continue_from(base, ledger)
            if base != credentials.update_state and self._keeper is not None:
                await self._keeper.keep(bot_id, identity.telegram_id, base)  # kept before anything is received

            async def on_update(update: Any) -> None:
                self._dispatch(client, order, update)

            client.add_event_handler(on_update, events.Raw)
            self._clients[bot_id] = client
            self._orders[bot_id] = order
            telegram = await client.subscribe()
            if base.behind(telegram):
                await client.catch_up()  # something happened since the state we continue from
        except errors.RPCError as exc:
            await self._forget(bot_id, client)
            raise transport_error(bot_id, exc) from None
        except BaseException:
            await self._forget(bot_id, client)
            raise
        return StartedBot(identity, str(client.session.save()), base)

    def _dispatch(self, client: TrackedClient, order: PerPersonOrder, update: Any) -> None:
        """Called by Telethon for every update, one at a time in box order."""
        ledger = client.ledger
        if ledger is not None:
            ledger.dispatched(update)
        event = event_from_update(client.bot_id, update)
        if event is None:
            if ledger is not None:
                ledger.finished(update)
            return

        async def handle() -> None:
            try:
                await self._handle(client, event)
            except Exception:
                # Not acknowledged: restart the session, which catches up from the kept state.
                metrics.updates_failed.labels(client.bot_id).inc()
                await client.disconnect()
                return
            if ledger is not None:
                ledger.finished(update)

        order.run(event.user_id, handle)

    async def _handle(self, client: TrackedClient, event: IncomingEvent) -> None:
        if not isinstance(event, BotStopped) and not event.sender.access_hash:
            # Short updates carry no users: take the access hash from Telethon's entity cache.
            access_hash = await self._cached_access_hash(client, event.sender.user_id)
            event = replace(event, sender=replace(event.sender, access_hash=access_hash))
        for attempt, pause in enumerate((*RETRY_SECONDS, None)):
            if self._handler is None:
                return
            try:
                await self._handler(event)
                return
            except Exception:
                if pause is None or not client.is_connected():
                    # Not acknowledged: the update comes again with the next catch-up of this bot.
                    log.exception("bot_update_failed", bot=client.bot_id, kind=type(event).__name__, attempts=attempt)
                    raise
                log.warning("bot_update_retry", bot=client.bot_id, kind=type(event).__name__, attempt=attempt + 1)
                await asyncio.sleep(pause)

    async def _cached_access_hash(self, client: TrackedClient, user_id: int) -> int:
        try:
            peer = await client.get_input_entity(types.PeerUser(user_id))
        except (ValueError, TypeError, errors.RPCError, OSError):
            return 0
        return int(getattr(peer, "access_hash", 0) or 0)

    async def stop_bot(self, bot_id: str) -> None:
        client = self._clients.pop(bot_id, None)
        order = self._orders.pop(bot_id, None)
        if order is not None:
            await order.drain(DRAIN_SECONDS)
        if client is not None:
            await client.disconnect()

    async def _forget(self, bot_id: str, client: TrackedClient) -> None:
        if self._clients.get(bot_id) is client:
            del self._clients[bot_id]
            self._orders.pop(bot_id, None)
        await client.disconnect()

    def session_id(self, bot_id: str) -> int:
        """The MTProto session the bot runs on here (what the simulated Telegram records)."""
        return int(getattr(self.client(bot_id)._sender, "session_id", 0))

    # Sending --------------------------------------------------------------------------------------

    async def _call(self, bot_id: str, request: Any) -> Any:
        client = self.client(bot_id)
        if not client.is_connected():  # nothing goes out: Telethon refuses to send while disconnected
            raise BotNotRunning(f"bot {bot_id} is reconnecting")
        try:
            return await client(request)
        except errors.RPCError as exc:
            failure = transport_error(bot_id, exc)
            if isinstance(failure, SessionInvalid | BotDeactivated):
                # The session is over: drop it; the next session round logs in again.
                log.warning("bot_session_ended", bot=bot_id, error=telegram_error_name(exc))
                await self._forget(bot_id, client)
            raise failure from None
        except (OSError, TimeoutError) as exc:
            # The connection was lost with the request out (Telethon reconnects on its own): it may
            # have been carried out.
            raise OutcomeUnknown(type(exc).__name__) from None

    async def send(self, bot_id: str, peer: Peer, message: OutgoingMessage) -> int:
        random_id = message.random_id or random.randrange(-(2**63), 2**63)
        request = functions.messages.SendMessageRequest(
            peer=types.InputPeerUser(user_id=peer.user_id, access_hash=peer.access_hash),
            message=message.text,
            no_webpage=True,
            silent=message.silent or None,
            noforwards=message.protect_content or None,
            random_id=random_id,
            reply_markup=reply_markup(message.keyboard),
        )
        return sent_message_id(await self._call(bot_id, request), random_id)

    async def delete(self, bot_id: str, peer: Peer, message_ids: list[int]) -> None:
        await self._call(bot_id, functions.messages.DeleteMessagesRequest(id=message_ids, revoke=True))

    async def close(self) -> None:
        for bot_id in list(self._clients):
            await self.stop_bot(bot_id)

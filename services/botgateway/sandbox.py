"""A simulated Telegram in this process, and the transport that talks to it.

Sandbox users have ids, languages and phone numbers; they start, block and write to bots and
share contacts (their own, or someone else's: foreign contacts carry user_id 0, as in Telegram).
Bots send through the same interface as the Telethon transport and meet the same rules: access
hashes per bot, "never started" and "blocked" refusals, deactivated accounts, and Telegram's
rate limits enforced with flood waits.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from services.botgateway.limiter import Bucket, Rate
from services.botgateway.transport import (
    BotCredentials,
    BotIdentity,
    BotNotRunning,
    BotStopped,
    ContactReceived,
    EventHandler,
    FloodWait,
    IncomingEvent,
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
from services.core.clock import Clock, SystemClock

_TOKEN_RE = re.compile(r"^(\d{1,15}):([A-Za-z0-9_-]{1,128})$")
_PHONE_RE = re.compile(r"^\+?\d{7,15}$")


class SandboxError(Exception):
    """A sandbox user action that Telegram itself would not allow."""


class UnknownUser(SandboxError):
    pass


class UnknownBot(SandboxError):
    pass


class ChatNotStarted(SandboxError):
    pass


class AuthKeyDuplicated(TransportError):
    """Two live sessions used the same bot at once."""


@dataclass
class SimUser:
    user_id: int
    first_name: str
    language_code: str
    phone: str
    deactivated: bool = False


@dataclass
class SimBot:
    telegram_id: int
    username: str
    token: str

    @property
    def bot_id(self) -> str:
        return self.username.lower()


@dataclass
class SimMessage:
    message_id: int
    from_bot: bool
    text: str
    send_time: datetime
    protect_content: bool = False
    silent: bool = False
    request_contact: bool = False
    deleted: bool = False
    sender_session: str = ""
    # Monotonic time Telegram accepted it (to measure pacing).
    accepted_at: float = 0.0


@dataclass
class SimChat:
    started: bool = False
    blocked: bool = False
    messages: list[SimMessage] = field(default_factory=list)
    next_id: int = 1
    bucket: Bucket | None = None


@dataclass(frozen=True)
class SandboxLimits:
    bot_rate: float = 30.0
    bot_burst: int = 30
    chat_rate: float = 1.0
    chat_burst: int = 5


def sandbox_token(bot_id: str) -> str:
    """The token of a configured shared bot inside the sandbox (stable across restarts)."""
    digest = hashlib.sha256(f"otpgate-sandbox/{bot_id}".encode()).digest()
    telegram_id = 5_000_000_000 + int.from_bytes(digest[:4], "big")
    return f"{telegram_id}:sandbox{digest[4:16].hex()}"


class SimulatedTelegram:
    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self._clock = clock or SystemClock()
        self._monotonic = monotonic
        self._salt = os.urandom(8)
        self.users: dict[int, SimUser] = {}
        self.bots: dict[str, SimBot] = {}
        self.chats: dict[tuple[str, int], SimChat] = {}
        self._bot_buckets: dict[str, Bucket] = {}
        # bot_id -> {session owner: handler}
        self._sessions: dict[str, dict[str, EventHandler]] = {}
        self._next_user_id = 700_000_001
        # What a test or benchmark may want to assert on.
        self.flood_errors = 0
        self.duplicate_sessions = 0
        self.sent_count = 0

    # Users ------------------------------------------------------------------------------

    def create_user(
        self,
        user_id: int = 0,
        first_name: str = "",
        language_code: str = "en",
        phone: str = "",
        deactivated: bool = False,
    ) -> SimUser:
        if phone and not _PHONE_RE.match(phone):
            raise SandboxError("phone must be E.164 digits, e.g. +79991234567")
        if user_id < 0:
            raise SandboxError("user_id must be positive")
        if not user_id:
            while self._next_user_id in self.users:
                self._next_user_id += 1
            user_id = self._next_user_id
            self._next_user_id += 1
        if phone and not phone.startswith("+"):
            phone = "+" + phone
        user = SimUser(user_id, first_name or f"User {user_id}", language_code or "en", phone, deactivated)
        self.users[user_id] = user
        return user

    def _user(self, user_id: int) -> SimUser:
        user = self.users.get(user_id)
        if user is None:
            raise UnknownUser(f"no sandbox user {user_id}")
        return user

    # Bots -------------------------------------------------------------------------------

    def login(self, token: str) -> SimBot:
        """Bot-token login: "<numeric id>:<secret>" tokens create the bot on first use."""
        match = _TOKEN_RE.match(token)
        if not match:
            raise TokenInvalid("token is not of the form <bot id>:<secret>")
        telegram_id = int(match.group(1))
        for bot in self.bots.values():
            if bot.telegram_id == telegram_id:
                if bot.token != token:
                    raise TokenInvalid("token was revoked")
                return bot
        username = f"sandbox{telegram_id}_bot"
        bot = SimBot(telegram_id, username, token)
        self.bots[bot.bot_id] = bot
        return bot

    def revoke_token(self, bot_id: str) -> str:
        """BotFather's /revoke: the bot gets a new token and the old one stops logging in."""
        bot = self._bot(bot_id)
        bot.token = f"{bot.telegram_id}:revoked{os.urandom(8).hex()}"
        return bot.token

    def add_bot(self, bot_id: str, token: str) -> SimBot:
        """A configured bot with a known username (shared bots in sandbox mode)."""
        match = _TOKEN_RE.match(token)
        if not match:
            raise TokenInvalid("token is not of the form <bot id>:<secret>")
        existing = self.bots.get(bot_id.lower())
        if existing is not None:
            return existing
        bot = SimBot(int(match.group(1)), bot_id, token)
        self.bots[bot.bot_id] = bot
        return bot

    def _bot(self, bot_id: str) -> SimBot:
        bot = self.bots.get(bot_id.lower())
        if bot is None:
            raise UnknownBot(f"no sandbox bot {bot_id}")
        return bot

    def access_hash(self, bot_id: str, user_id: int) -> int:
        """What this bot sees as the person's access hash (differs per bot, as in Telegram)."""
        bot = self._bot(bot_id)
        digest = hashlib.sha256(self._salt + f"{bot.telegram_id}:{user_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True) or 1

    def connect(self, bot_id: str, owner: str, handler: EventHandler) -> None:
        sessions = self._sessions.setdefault(bot_id, {})
        sessions[owner] = handler
        if len(sessions) > 1:
            self.duplicate_sessions += 1

    def disconnect(self, bot_id: str, owner: str) -> None:
        self._sessions.get(bot_id, {}).pop(owner, None)

    def sessions(self, bot_id: str) -> list[str]:
        return list(self._sessions.get(bot_id, {}))

    # Chats --------------------------------------------------------------------------------

    def chat(self, bot_id: str, user_id: int) -> SimChat:
        key = (bot_id.lower(), user_id)
        chat = self.chats.get(key)
        if chat is None:
            chat = self.chats[key] = SimChat()
        return chat

    def history(self, user_id: int, bot_id: str, after_message_id: int = 0) -> list[SimMessage]:
        self._user(user_id)
        self._bot(bot_id)
        return [m for m in self.chat(bot_id, user_id).messages if m.message_id > after_message_id]

    def message(self, user_id: int, bot_id: str, message_id: int) -> SimMessage | None:
        for candidate in self.chat(bot_id, user_id).messages:
            if candidate.message_id == message_id:
                return candidate
        return None

    def _append(self, chat: SimChat, message: SimMessage) -> SimMessage:
        message.message_id = chat.next_id
        chat.next_id += 1
        chat.messages.append(message)
        return message

    # What users do -------------------------------------------------------------------------

    async def _deliver(self, bot_id: str, event: IncomingEvent) -> list[SimMessage]:
        sessions = self._sessions.get(bot_id, {})
        if not sessions:
            raise BotNotRunning(f"bot {bot_id} has no live session")
        handler = list(sessions.values())[-1]
        ids = await handler(event)
        user_id = event.user_id if isinstance(event, BotStopped) else event.sender.user_id
        found = [self.message(user_id, bot_id, i) for i in ids]
        return [m for m in found if m is not None]

    def _sender(self, user: SimUser, bot_id: str) -> Sender:
        return Sender(user.user_id, self.access_hash(bot_id, user.user_id), user.language_code, user.first_name)

    async def start(self, user_id: int, bot_id: str, payload: str = "") -> list[SimMessage]:
        user = self._user(user_id)
        bot = self._bot(bot_id)
        chat = self.chat(bot.bot_id, user_id)
        chat.started = True
        chat.blocked = False  # "Restart" on a blocked bot unblocks it
        text = f"/start {payload}".strip()
        message = self._append(chat, SimMessage(0, False, text, self._clock.now()))
        event = TextReceived(bot.bot_id, self._sender(user, bot.bot_id), text, message.message_id)
        return await self._deliver(bot.bot_id, event)

    def _started_chat(self, user_id: int, bot_id: str) -> tuple[SimUser, SimBot, SimChat]:
        user = self._user(user_id)
        bot = self._bot(bot_id)
        chat = self.chat(bot.bot_id, user_id)
        if not chat.started or chat.blocked:
            raise ChatNotStarted("start (or unblock) the bot first")
        return user, bot, chat

    async def send_text(self, user_id: int, bot_id: str, text: str) -> list[SimMessage]:
        user, bot, chat = self._started_chat(user_id, bot_id)
        if not text.strip():
            raise SandboxError("text is empty")
        message = self._append(chat, SimMessage(0, False, text, self._clock.now()))
        event = TextReceived(bot.bot_id, self._sender(user, bot.bot_id), text, message.message_id)
        return await self._deliver(bot.bot_id, event)

    async def share_contact(
        self, user_id: int, bot_id: str, phone: str = "", forwarded: bool = False
    ) -> list[SimMessage]:
        user, bot, chat = self._started_chat(user_id, bot_id)
        if phone:
            if not _PHONE_RE.match(phone):
                raise SandboxError("phone must be E.164 digits, e.g. +79991234567")
            contact_user_id = 0  # someone else's contact: Telegram gives user_id 0
        else:
            if not user.phone:
                raise SandboxError("the user has no phone number")
            phone, contact_user_id = user.phone, user.user_id
        digits = phone.lstrip("+")  # Telegram sends contact numbers without "+"
        message = self._append(
            chat, SimMessage(0, False, "[forwarded contact]" if forwarded else "[contact]", self._clock.now())
        )
        event = ContactReceived(
            bot.bot_id, self._sender(user, bot.bot_id), contact_user_id, digits, forwarded, message.message_id
        )
        return await self._deliver(bot.bot_id, event)

    async def set_blocked(self, user_id: int, bot_id: str, blocked: bool) -> None:
        self._user(user_id)
        bot = self._bot(bot_id)
        chat = self.chat(bot.bot_id, user_id)
        if chat.blocked == blocked:
            return
        chat.blocked = blocked
        await self._deliver(bot.bot_id, BotStopped(bot.bot_id, user_id, blocked))

    # What bots do ----------------------------------------------------------------------------

    def _admit(self, bot_id: str, chat: SimChat) -> None:
        now = self._monotonic()
        bot_bucket = self._bot_buckets.get(bot_id)
        if bot_bucket is None:
            bot_bucket = self._bot_buckets[bot_id] = Bucket(Rate(self.limits.bot_rate, self.limits.bot_burst))
        if chat.bucket is None:
            chat.bucket = Bucket(Rate(self.limits.chat_rate, self.limits.chat_burst))
        wait = max(bot_bucket.wait_for(now), chat.bucket.wait_for(now))
        if wait > 0:
            self.flood_errors += 1
            raise FloodWait(max(1, math.ceil(wait)))
        bot_bucket.reserve(now)
        chat.bucket.reserve(now)

    def bot_send(self, bot_id: str, owner: str, peer: Peer, message: OutgoingMessage) -> SimMessage:
        bot = self._bot(bot_id)
        sessions = self._sessions.get(bot.bot_id, {})
        if owner not in sessions:
            raise BotNotRunning(f"bot {bot_id} is not connected by this session")
        if len(sessions) > 1:
            raise AuthKeyDuplicated(f"bot {bot_id} is connected by {len(sessions)} sessions")
        user = self.users.get(peer.user_id)
        if user is None:
            raise PeerInvalid("unknown user")
        if user.deactivated:
            raise UserDeactivated("the account was deleted")
        chat = self.chat(bot.bot_id, user.user_id)
        if not chat.started:
            raise PeerInvalid("the user never started the bot")
        if peer.access_hash != self.access_hash(bot.bot_id, user.user_id):
            raise PeerInvalid("wrong access hash")
        if chat.blocked:
            raise UserBlocked("the user blocked the bot")
        self._admit(bot.bot_id, chat)
        keyboard = message.keyboard
        sent = SimMessage(
            0,
            True,
            message.text,
            self._clock.now(),
            protect_content=message.protect_content,
            silent=message.silent,
            request_contact=bool(keyboard and keyboard.request_contact_label),
            sender_session=owner,
            accepted_at=self._monotonic(),
        )
        self.sent_count += 1
        return self._append(chat, sent)

    def bot_delete(self, bot_id: str, owner: str, peer: Peer, message_ids: list[int]) -> None:
        bot = self._bot(bot_id)
        if owner not in self._sessions.get(bot.bot_id, {}):
            raise BotNotRunning(f"bot {bot_id} is not connected by this session")
        wanted = set(message_ids)
        for candidate in self.chat(bot.bot_id, peer.user_id).messages:
            if candidate.message_id in wanted and candidate.from_bot:
                candidate.deleted = True
                candidate.text = ""


class SandboxTransport:
    """The Transport over a SimulatedTelegram; `owner` names this gateway instance's sessions."""

    def __init__(self, telegram: SimulatedTelegram, owner: str) -> None:
        self.telegram = telegram
        self.owner = owner
        self._handler: EventHandler | None = None
        self._running: set[str] = set()

    def set_handler(self, handler: EventHandler) -> None:
        self._handler = handler

    async def check_token(self, token: str) -> tuple[BotIdentity, str]:
        bot = self.telegram.login(token)
        return BotIdentity(bot.telegram_id, bot.username), f"sandbox:{bot.telegram_id}"

    async def start_bot(self, credentials: BotCredentials) -> tuple[BotIdentity, str]:
        bot = self.telegram.login(credentials.token)
        if self._handler is None:
            raise RuntimeError("set_handler first")
        self.telegram.connect(bot.bot_id, self.owner, self._handler)
        self._running.add(credentials.bot_id)
        return BotIdentity(bot.telegram_id, bot.username), credentials.session or f"sandbox:{bot.telegram_id}"

    async def stop_bot(self, bot_id: str) -> None:
        self.telegram.disconnect(bot_id, self.owner)
        self._running.discard(bot_id)

    def running(self, bot_id: str) -> bool:
        return bot_id in self._running

    async def send(self, bot_id: str, peer: Peer, message: OutgoingMessage) -> int:
        return self.telegram.bot_send(bot_id, self.owner, peer, message).message_id

    async def delete(self, bot_id: str, peer: Peer, message_ids: list[int]) -> None:
        self.telegram.bot_delete(bot_id, self.owner, peer, message_ids)

    async def close(self) -> None:
        for bot_id in list(self._running):
            await self.stop_bot(bot_id)

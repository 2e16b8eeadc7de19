"""A simulated Telegram for bots, with Telegram's rules (dev and sandbox mode only).

What a bot sees is Telegram's MTProto API (services/telegramsim/mtproto.py turns TL requests into
calls here); people act through the sandbox API. The rules kept, as Telegram keeps them:

- Each bot has its update sequences: pts counts message events (a person's message, the bot's own
  message, a deletion by its count), qts counts UpdateBotStopped, seq numbers the Updates
  containers pushed to it. They only grow, across restarts and resets.
- An update is pushed to the bot's connected sessions that asked for updates; a bot with none is
  offline and gets what it missed from updates.getDifference, in slices, or "too long" when it
  is too far behind (or asks from before a reset).
- Message ids are per account (the bot and the person number the same message differently);
  access hashes are per bot and person. Sending needs a started, unblocked chat, the right access
  hash and a live account; limits per bot and per chat answer FLOOD_WAIT_X; bots delete their own
  messages for 48 hours.
- A send's random_id deduplicates it, per bot and person, for ever (Telegram keeps the random_ids
  used and they do not expire): a repeat of a finished send answers with the message that send
  made instead of sending another; a repeat while the first is still being made is refused with
  RANDOM_ID_DUPLICATE. The check comes once the chat is found, before a block or the text can
  refuse the send, so a send refused for those made no message under its random_id.
- Sessions, auth keys and pushes follow Telegram's rules too (services/telegramsim/sessions.py);
  a revoked token ends its sessions (SESSION_REVOKED).

One instance per database: counters and connections live in this process (the log is durable,
counters are recovered from it at start). The rules above are kept together, past the usual
module size, because each one reads and moves the same sequences (pts, qts, seq, message ids).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from services.core.clock import Clock
from services.core.crypto import constant_time_equals
from services.core.gcra import Bucket, Rate
from services.core.sandbox import sandbox_token
from services.telegramsim.model import (
    DELETE_WINDOW_SECONDS,
    MAX_TEXT_UTF16,
    BotStopped,
    ChatNotStarted,
    Deletion,
    Difference,
    Push,
    RpcError,
    SandboxError,
    SandboxLimits,
    SimBot,
    SimChat,
    SimMessage,
    SimUser,
    State,
    UnknownBot,
    UnknownUser,
    bad_request,
    flood_wait,
)
from services.telegramsim.sequence import Sequence
from services.telegramsim.sessions import Sessions
from services.telegramsim.store import AuthKeyRecord, TelegramStore

TOKEN_RE = re.compile(r"^(\d{1,15}):([A-Za-z0-9_-]{1,128})$")
PHONE_RE = re.compile(r"^\+?\d{7,15}$")
RECENT_PER_CHAT = 100
INDEXED_BOT_MESSAGES = 200_000


def utf16_length(text: str) -> int:
    """Telegram measures texts in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


@dataclass
class _BotRuntime:
    """What the process keeps per bot besides its record: sequences, limits, waiters."""

    pts: Sequence
    qts: Sequence
    send_bucket: Bucket
    login_bucket: Bucket
    # (person, random_id) -> the bot-side message id it made; None while that send is being made.
    random_ids: dict[tuple[int, int], int | None]
    person_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    messages: OrderedDict[int, SimMessage] = field(default_factory=OrderedDict)


class SimulatedTelegram:
    def __init__(
        self,
        store: TelegramStore,
        limits: SandboxLimits,
        clock: Clock,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.limits = limits
        self._clock = clock
        self._monotonic = monotonic
        self._salt = b""
        self.users: dict[int, SimUser] = {}
        self._bots: dict[str, SimBot] = {}
        self._by_telegram_id: dict[int, SimBot] = {}
        self._runtime: dict[int, _BotRuntime] = {}
        self.chats: dict[tuple[int, int], SimChat] = {}
        self.sessions = Sessions(store)
        self._chat_buckets: dict[tuple[int, int], Bucket] = {}
        self._next_user_id = 700_000_001
        # What tests and benches read.
        self.flood_errors = 0
        self.sent_count = 0

    async def load(self, shared_bots: Iterable[str] = ()) -> None:
        """Read the state back from the database; make the configured shared bots exist."""
        snapshot = await self.store.load()
        self._salt = snapshot.salt
        self.users = snapshot.users
        self.chats = snapshot.chats
        for bot in snapshot.bots.values():
            self._adopt(bot, dict(snapshot.random_ids.get(bot.telegram_id, {})))
        self.sessions.load(snapshot.auth_keys, {bot.telegram_id: (bot.pts, bot.qts) for bot in snapshot.bots.values()})
        for name in shared_bots:
            if name.lower() not in self._bots:
                await self.add_bot(name.lower(), sandbox_token(name))

    def _adopt(self, bot: SimBot, random_ids: dict[tuple[int, int], int | None]) -> None:
        self._bots[bot.bot_id] = bot
        self._by_telegram_id[bot.telegram_id] = bot
        limits = self.limits
        self._runtime[bot.telegram_id] = _BotRuntime(
            pts=Sequence(bot.pts),
            qts=Sequence(bot.qts),
            send_bucket=Bucket(Rate(limits.bot_rate, limits.bot_burst)),
            login_bucket=Bucket(Rate(1.0 / limits.login_interval, limits.login_burst)),
            random_ids=random_ids,
        )

    # Accounts -------------------------------------------------------------------------------

    async def create_user(
        self,
        user_id: int = 0,
        first_name: str = "",
        language_code: str = "en",
        phone: str = "",
        deactivated: bool = False,
    ) -> SimUser:
        """Create or replace a person (a replaced person keeps their chats and message ids)."""
        if phone and not PHONE_RE.match(phone):
            raise SandboxError("phone must be E.164 digits, e.g. +79991234567")
        if user_id < 0:
            raise SandboxError("user_id must be positive")
        if user_id in self._by_telegram_id:
            raise SandboxError("user_id belongs to a bot")
        if not user_id:
            while self._next_user_id in self.users:
                self._next_user_id += 1
            user_id = self._next_user_id
        if phone and not phone.startswith("+"):
            phone = "+" + phone
        previous = self.users.get(user_id)
        user = SimUser(
            user_id,
            first_name or f"User {user_id}",
            language_code or "en",
            phone,
            deactivated,
            previous.last_message_id if previous else 0,
        )
        await self.store.save_user(user)
        self.users[user_id] = user
        return user

    def user(self, user_id: int) -> SimUser:
        user = self.users.get(user_id)
        if user is None:
            raise UnknownUser(f"no sandbox user {user_id}")
        return user

    async def add_bot(self, username: str, token: str) -> SimBot:
        """A bot as BotFather creates it (shared bots of the sandbox, or a first login by token)."""
        match = TOKEN_RE.match(token)
        if not match:
            raise SandboxError("token is not of the form <bot id>:<secret>")
        existing = self._bots.get(username.lower()) or self._by_telegram_id.get(int(match.group(1)))
        if existing is not None:
            return existing
        bot = SimBot(int(match.group(1)), username, token, self._clock.now())
        await self.store.save_bot(bot)
        self._adopt(bot, {})
        return bot

    def bot(self, bot_id: str) -> SimBot:
        bot = self._bots.get(bot_id.lower())
        if bot is None:
            raise UnknownBot(f"no sandbox bot {bot_id}")
        return bot

    def bot_by_telegram_id(self, telegram_id: int) -> SimBot | None:
        return self._by_telegram_id.get(telegram_id)

    def is_bot(self, user_id: int) -> bool:
        return user_id in self._by_telegram_id

    async def revoke_token(self, bot_id: str) -> str:
        """BotFather's /revoke: a new token; the old one and every session logged in with it end."""
        bot = self.bot(bot_id)
        bot.token = f"{bot.telegram_id}:revoked{os.urandom(8).hex()}"
        await self.store.save_bot(bot)
        await self.sessions.revoke_bot(bot.telegram_id)
        return bot.token

    def access_hash(self, bot: SimBot, user_id: int) -> int:
        """What this bot sees as the person's access hash (differs per bot, as in Telegram)."""
        digest = hmac.new(self._salt, f"{bot.telegram_id}:{user_id}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big", signed=True) or 1

    def state(self, bot: SimBot) -> State:
        runtime = self._runtime[bot.telegram_id]
        return State(runtime.pts.committed, runtime.qts.committed, bot.date or bot.create_time, bot.seq)

    # Logging in ---------------------------------------------------------------------------------

    def authorized(self, key_id: int) -> SimBot:
        """The bot logged in on this key (raises Telegram's refusal otherwise)."""
        bot = self._by_telegram_id.get(self.sessions.bot_of(key_id))
        if bot is None:
            raise RpcError(401, "AUTH_KEY_UNREGISTERED")
        return bot

    async def import_bot_authorization(self, key_id: int, api_id: int, token: str) -> SimBot:
        self.sessions.known(key_id)
        if api_id <= 0:
            raise bad_request("API_ID_INVALID")
        match = TOKEN_RE.match(token)
        if not match:
            raise bad_request("ACCESS_TOKEN_INVALID")
        bot = self._by_telegram_id.get(int(match.group(1)))
        if bot is None:
            bot = await self.add_bot(f"sandbox{match.group(1)}_bot", token)
        elif not constant_time_equals(bot.token, token):
            raise bad_request("ACCESS_TOKEN_INVALID")
        bucket = self._runtime[bot.telegram_id].login_bucket
        now = self._monotonic()
        wait = bucket.wait_for(now)
        if wait > 0:
            raise flood_wait(math.ceil(wait))
        bucket.reserve(now)
        await self.sessions.set_key(AuthKeyRecord(key_id, bot.telegram_id, "active"))
        return bot

    def connected_sessions(self, bot_id: str) -> list[int]:
        """The sessions a bot is online with (what tests assert on)."""
        return [c.session_id for c in self.sessions.online(self.bot(bot_id).telegram_id)]

    async def _replies(
        self, bot: SimBot, chat: SimChat, after: int, pts: int = 0, qts: int = 0, wait: float | None = None
    ) -> list[SimMessage]:
        """What the bot answered to the person's action at `after`, once it handled pts/qts (or at
        once when it is offline, or after the reply wait or the caller's `wait`, if shorter)."""
        timeout = self.limits.reply_wait if wait is None else max(0.0, min(wait, self.limits.reply_wait))
        await self.sessions.handled(bot.telegram_id, pts, qts, timeout)
        return [m for m in chat.recent if m.from_bot and m.user_message_id > after]

    # What bots do -------------------------------------------------------------------------------

    def _admit(self, bot: SimBot, user_id: int) -> None:
        now = self._monotonic()
        runtime = self._runtime[bot.telegram_id]
        key = (bot.telegram_id, user_id)
        chat_bucket = self._chat_buckets.get(key)
        if chat_bucket is None:
            chat_bucket = self._chat_buckets[key] = Bucket(Rate(self.limits.chat_rate, self.limits.chat_burst))
        wait = max(runtime.send_bucket.wait_for(now), chat_bucket.wait_for(now))
        if wait > 0:
            self.flood_errors += 1
            raise flood_wait(math.ceil(wait))
        runtime.send_bucket.reserve(now)
        chat_bucket.reserve(now)

    async def send_message(
        self,
        bot: SimBot,
        session_id: int,
        user_id: int,
        access_hash: int,
        text: str,
        random_id: int,
        *,
        protect_content: bool = False,
        silent: bool = False,
        request_contact: bool = False,
        remove_keyboard: bool = False,
    ) -> SimMessage:
        if user_id in self._by_telegram_id:
            raise bad_request("USER_IS_BOT")
        user = self.users.get(user_id)
        if user is None:
            raise bad_request("PEER_ID_INVALID")
        if user.deactivated:
            raise bad_request("INPUT_USER_DEACTIVATED")
        chat = self.chats.get((bot.telegram_id, user_id))
        if chat is None or not chat.started or access_hash != self.access_hash(bot, user_id):
            raise bad_request("PEER_ID_INVALID")
        runtime = self._runtime[bot.telegram_id]
        key = (user_id, random_id)
        if key in runtime.random_ids:
            return await self._sent_before(bot, runtime.random_ids[key])
        if chat.blocked:
            raise bad_request("USER_IS_BLOCKED")
        if not text.strip():
            raise bad_request("MESSAGE_EMPTY")
        if utf16_length(text) > MAX_TEXT_UTF16:
            raise bad_request("MESSAGE_TOO_LONG")
        self._admit(bot, user_id)
        runtime.random_ids[key] = None  # being made: a repeat now is RANDOM_ID_DUPLICATE
        message = self._new_message(bot, chat, user, from_bot=True, text=text, random_id=random_id)
        message.protect_content, message.silent = protect_content, silent
        message.request_contact, message.remove_keyboard = request_contact, remove_keyboard
        message.session_id, message.accepted_at = session_id, self._monotonic()
        # Made to the end even if the caller goes away meanwhile: the random_id then names it.
        return await asyncio.shield(self._commit(bot, chat, key, message))

    async def _commit(self, bot: SimBot, chat: SimChat, key: tuple[int, int], message: SimMessage) -> SimMessage:
        runtime = self._runtime[bot.telegram_id]
        try:
            await self.store.add_message(message, seq=0)
        except Exception:
            del runtime.random_ids[key]
            raise RpcError(500, "INTERNAL") from None
        finally:
            runtime.pts.done(message.pts)
        runtime.random_ids[key] = message.bot_message_id
        self._remember(bot, chat, message)
        self.sent_count += 1
        return message

    async def _sent_before(self, bot: SimBot, bot_message_id: int | None) -> SimMessage:
        """A repeated random_id: the message its first send made, or a refusal while that is being made."""
        message = None if bot_message_id is None else await self.bot_message(bot, bot_message_id)
        if message is None:
            raise RpcError(500, "RANDOM_ID_DUPLICATE")
        return message

    def _new_message(
        self, bot: SimBot, chat: SimChat, user: SimUser, *, from_bot: bool, text: str, random_id: int
    ) -> SimMessage:
        """Number a message on both sides and reserve its pts (the caller writes it and calls done)."""
        runtime = self._runtime[bot.telegram_id]
        bot.last_message_id += 1
        user.last_message_id += 1
        now = self._clock.now()
        bot.date = now
        return SimMessage(
            bot=bot.telegram_id,
            user_id=user.user_id,
            from_bot=from_bot,
            text=text,
            date=now,
            bot_message_id=bot.last_message_id,
            user_message_id=user.last_message_id,
            pts=runtime.pts.reserve(),
            random_id=random_id,
        )

    def _remember(self, bot: SimBot, chat: SimChat, message: SimMessage) -> None:
        chat.index.append((message.user_message_id, message.pts))
        chat.recent.append(message)
        del chat.recent[:-RECENT_PER_CHAT]
        index = self._runtime[bot.telegram_id].messages
        index[message.bot_message_id] = message
        while len(index) > INDEXED_BOT_MESSAGES:
            index.popitem(last=False)

    async def bot_message(self, bot: SimBot, bot_message_id: int) -> SimMessage | None:
        found = self._runtime[bot.telegram_id].messages.get(bot_message_id)
        return found if found is not None else await self.store.bot_message(bot.telegram_id, bot_message_id)

    async def delete_messages(self, bot: SimBot, bot_message_ids: list[int]) -> tuple[int, int]:
        """Delete the bot's own messages for both sides; returns (pts, pts_count)."""
        runtime = self._runtime[bot.telegram_id]
        found = [m for i in dict.fromkeys(bot_message_ids) if (m := await self.bot_message(bot, i)) is not None]
        mine = [m for m in found if m.from_bot and not m.deleted]
        now = self._clock.now()
        if any(now - m.date > timedelta(seconds=DELETE_WINDOW_SECONDS) for m in mine):
            raise RpcError(403, "MESSAGE_DELETE_FORBIDDEN")
        if not mine:
            return runtime.pts.committed, 0
        last = runtime.pts.reserve(len(mine))
        bot.date = now
        try:
            await self.store.add_deletion(
                bot.telegram_id, Deletion(last, len(mine), tuple(m.bot_message_id for m in mine), now)
            )
            for message in mine:
                message.deleted, message.text = True, ""
                await self.store.mark_deleted(message)
        finally:
            runtime.pts.done(last)
        return last, len(mine)

    async def difference(self, bot: SimBot, pts: int, qts: int, pts_total_limit: int | None) -> Difference:
        """updates.getDifference from (pts, qts)."""
        runtime = self._runtime[bot.telegram_id]
        await runtime.pts.committed_to(pts)  # a bot may know the pts of its own send before it is written
        now = self.state(bot)
        if pts > now.pts or qts > now.qts:
            raise bad_request("PERSISTENT_TIMESTAMP_INVALID")
        limit = min(pts_total_limit or self.limits.difference_limit, self.limits.difference_limit)
        if pts < bot.floor_pts or now.pts - pts > limit:
            return Difference([], [], [], now, too_long=True)
        qts = max(qts, bot.floor_qts)
        last_pts = min(now.pts, pts + self.limits.difference_slice)
        last_qts = min(now.qts, qts + self.limits.difference_slice)
        messages, deletions = await self.store.pts_entries(bot.telegram_id, pts + 1, last_pts)
        stops = await self.store.stops(bot.telegram_id, qts + 1, last_qts)
        final = last_pts == now.pts and last_qts == now.qts
        state = now if final else State(last_pts, last_qts, now.date, now.seq)
        return Difference([m for m in messages if not m.deleted], deletions, stops, state, final=final)

    # What people do -----------------------------------------------------------------------------

    def _chat(self, bot: SimBot, user_id: int) -> SimChat:
        key = (bot.telegram_id, user_id)
        chat = self.chats.get(key)
        if chat is None:
            chat = self.chats[key] = SimChat(bot.telegram_id, user_id)
        return chat

    def chat(self, bot_id: str, user_id: int) -> SimChat:
        """A chat's record, made if new (what tests set up directly, without the conversation)."""
        return self._chat(self.bot(bot_id), user_id)

    def started_chat(self, user_id: int, bot_id: str) -> tuple[SimUser, SimBot, SimChat]:
        user, bot = self.user(user_id), self.bot(bot_id)
        chat = self.chats.get((bot.telegram_id, user_id))
        if chat is None or not chat.started or chat.blocked:
            raise ChatNotStarted("start (or unblock) the bot first")
        return user, bot, chat

    async def _incoming(self, bot: SimBot, chat: SimChat, user: SimUser, text: str, **contact: object) -> SimMessage:
        """A person's message: into the bot's log, then pushed (call under the bot's person lock)."""
        runtime = self._runtime[bot.telegram_id]
        message = self._new_message(bot, chat, user, from_bot=False, text=text, random_id=_random_id())
        for name, value in contact.items():
            setattr(message, name, value)
        bot.seq += 1
        try:
            await self.store.add_message(message, seq=bot.seq)
        finally:
            runtime.pts.done(message.pts)
        await runtime.pts.committed_to(message.pts)
        self._remember(bot, chat, message)
        self.sessions.push(bot.telegram_id, Push(bot.seq, message.date, message=message))
        return message

    async def _stop_event(self, bot: SimBot, chat: SimChat, stopped: bool) -> BotStopped:
        runtime = self._runtime[bot.telegram_id]
        event = BotStopped(runtime.qts.reserve(), chat.user_id, stopped, self._clock.now())
        bot.seq += 1
        bot.date = event.date
        try:
            await self.store.add_stop(bot.telegram_id, event, bot.seq)
        finally:
            runtime.qts.done(event.qts)
        await runtime.qts.committed_to(event.qts)
        self.sessions.push(bot.telegram_id, Push(bot.seq, event.date, stopped=event))
        return event

    async def start_bot(
        self, user_id: int, bot_id: str, payload: str = "", wait: float | None = None
    ) -> list[SimMessage]:
        user, bot = self.user(user_id), self.bot(bot_id)
        runtime = self._runtime[bot.telegram_id]
        async with runtime.person_lock:
            chat = self._chat(bot, user_id)
            stop = await self._stop_event(bot, chat, False) if chat.blocked else None  # "Restart" unblocks
            chat.started, chat.blocked = True, False
            await self.store.save_chat(chat)
            message = await self._incoming(bot, chat, user, f"/start {payload}".strip())
        return await self._replies(bot, chat, message.user_message_id, message.pts, stop.qts if stop else 0, wait)

    async def send_text(self, user_id: int, bot_id: str, text: str, wait: float | None = None) -> list[SimMessage]:
        if not text.strip():
            raise SandboxError("text is empty")
        user, bot, chat = self.started_chat(user_id, bot_id)
        async with self._runtime[bot.telegram_id].person_lock:
            message = await self._incoming(bot, chat, user, text)
        return await self._replies(bot, chat, message.user_message_id, message.pts, wait=wait)

    async def share_contact(
        self, user_id: int, bot_id: str, phone: str = "", forwarded: bool = False, wait: float | None = None
    ) -> list[SimMessage]:
        user, bot, chat = self.started_chat(user_id, bot_id)
        if phone:
            if not PHONE_RE.match(phone):
                raise SandboxError("phone must be E.164 digits, e.g. +79991234567")
            contact_user_id = 0  # someone else's contact: Telegram gives user_id 0
        else:
            if not user.phone:
                raise SandboxError("the user has no phone number")
            phone, contact_user_id = user.phone, user.user_id
        text = "[forwarded contact]" if forwarded else "[contact]"
        async with self._runtime[bot.telegram_id].person_lock:
            message = await self._incoming(
                bot,
                chat,
                user,
                text,
                contact_phone=phone.lstrip("+"),  # Telegram sends contact numbers without "+"
                contact_user_id=contact_user_id,
                forwarded=forwarded,
            )
        return await self._replies(bot, chat, message.user_message_id, message.pts, wait=wait)

    async def set_blocked(self, user_id: int, bot_id: str, blocked: bool, wait: float | None = None) -> None:
        self.user(user_id)
        bot = self.bot(bot_id)
        async with self._runtime[bot.telegram_id].person_lock:
            chat = self._chat(bot, user_id)
            if chat.blocked == blocked:
                return
            chat.blocked = blocked
            await self.store.save_chat(chat)
            stop = await self._stop_event(bot, chat, blocked)
        await self._replies(bot, chat, 0, qts=stop.qts, wait=wait)

    async def history(self, user_id: int, bot_id: str, after_message_id: int = 0) -> list[SimMessage]:
        self.user(user_id)
        bot = self.bot(bot_id)
        chat = self.chats.get((bot.telegram_id, user_id))
        wanted = [pts for user_message_id, pts in (chat.index if chat else []) if user_message_id > after_message_id]
        messages = await self.store.messages(bot.telegram_id, wanted)
        return sorted(messages, key=lambda m: m.user_message_id)

    async def reset(self) -> tuple[int, int]:
        """Erase people, chats and history (bots, keys and counters stay)."""
        for bot in self._bots.values():
            runtime = self._runtime[bot.telegram_id]
            bot.pts, bot.qts = runtime.pts.committed, runtime.qts.committed
        erased = await self.store.reset(self._bots.values())
        self.users.clear()
        self.chats.clear()
        self._chat_buckets.clear()
        for runtime in self._runtime.values():
            runtime.messages.clear()
            runtime.random_ids.clear()  # the people they were used with are gone
        return erased


def _random_id() -> int:
    return int.from_bytes(os.urandom(8), "big", signed=True)

"""The simulated Telegram's sessions: auth keys, the connections on them, pushed updates, and how far
each bot has said it handled its updates.

Rules kept, as on Telegram:
- An auth key is made by the key exchange (CreateAuthKey) and logged in by a bot token; a revoked
  authorization answers SESSION_REVOKED, a key nobody logged in AUTH_KEY_UNREGISTERED, an unknown
  key MTProto's -404.
- One session at a time per key: a second, different session connecting on a key kills it for both
  (AUTH_KEY_DUPLICATED).
- A connection gets pushed updates once it made a request not wrapped in invokeWithoutUpdates; a
  bot is online while such a connection of its is open.

The acknowledgements are the sandbox's own: the gateway says which updates it handled, so that a
person's action can be answered with the bot's replies.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from dataclasses import dataclass, field

from services.core.logging import get_logger
from services.telegramsim.model import Push, RpcError, unauthorized
from services.telegramsim.store import AuthKeyRecord, TelegramStore

log = get_logger(__name__)


def auth_key_id(key: bytes) -> int:
    """MTProto's auth_key_id: the last 8 bytes of the key's SHA-1, little-endian, unsigned."""
    return int(struct.unpack("<Q", hashlib.sha1(key).digest()[12:20])[0])  # noqa: S324 - MTProto's definition


@dataclass
class Connection:
    """One MTProto session connected on an auth key; gets pushes once it asked for updates."""

    key_id: int
    session_id: int
    queue: asyncio.Queue[Push | RpcError] = field(default_factory=asyncio.Queue)
    subscribed: bool = False


@dataclass
class _Waiter:
    pts: int
    qts: int
    future: asyncio.Future[None]


@dataclass
class _Handled:
    """What a bot said it handled, and who waits for more."""

    pts: int = 0
    qts: int = 0
    waiters: list[_Waiter] = field(default_factory=list)


class Sessions:
    def __init__(self, store: TelegramStore) -> None:
        self.store = store
        self.keys: dict[int, AuthKeyRecord] = {}
        self._connections: dict[int, dict[int, Connection]] = {}
        # Sessions that asked for updates. As in Telegram, this is the session's, not its
        # connection's: a request may come before the update stream connects, or between two.
        self._subscribed: set[tuple[int, int]] = set()
        self._handled: dict[int, _Handled] = {}
        self.duplicate_sessions = 0  # what tests assert on

    def load(self, keys: dict[int, AuthKeyRecord], handled: dict[int, tuple[int, int]]) -> None:
        self.keys = keys
        self._handled = {bot: _Handled(pts, qts) for bot, (pts, qts) in handled.items()}

    # Keys ----------------------------------------------------------------------------------------

    async def create_key(self) -> bytes:
        key = os.urandom(256)
        await self.set_key(AuthKeyRecord(auth_key_id(key), 0, "active"))
        return key

    async def set_key(self, key: AuthKeyRecord) -> None:
        await self.store.save_auth_key(key)
        self.keys[key.key_id] = key

    def known(self, key_id: int) -> AuthKeyRecord:
        key = self.keys.get(key_id)
        if key is None:
            raise RpcError(-404, "AUTH_KEY_NOT_FOUND")  # MTProto's transport error for an unknown key
        if key.state == "duplicated":
            raise RpcError(406, "AUTH_KEY_DUPLICATED")
        return key

    def bot_of(self, key_id: int) -> int:
        """The Telegram id of the bot logged in on this key."""
        key = self.known(key_id)
        if key.state == "revoked":
            raise unauthorized("SESSION_REVOKED")
        if not key.bot:
            raise unauthorized("AUTH_KEY_UNREGISTERED")
        return key.bot

    async def log_out(self, key_id: int) -> None:
        key = self.known(key_id)
        await self.set_key(AuthKeyRecord(key.key_id, 0, key.state))

    async def revoke(self, key_id: int) -> None:
        """The authorization on this key ends (SESSION_REVOKED from now on)."""
        key = self.known(key_id)
        await self.set_key(AuthKeyRecord(key.key_id, key.bot, "revoked"))
        self._close(key.key_id, unauthorized("SESSION_REVOKED"))

    async def revoke_bot(self, bot: int) -> None:
        for key in list(self.keys.values()):
            if key.bot == bot and key.state == "active":
                await self.revoke(key.key_id)

    # Connections --------------------------------------------------------------------------------

    async def connect(self, key_id: int, session_id: int) -> Connection:
        """A session connects on a key. A second, different session on the same key kills the key."""
        self.known(key_id)
        sessions = self._connections.setdefault(key_id, {})
        if any(other != session_id for other in sessions):
            self.duplicate_sessions += 1
            log.warning("sandbox_auth_key_duplicated", sessions=len(sessions) + 1)
            key = self.keys[key_id]
            await self.set_key(AuthKeyRecord(key.key_id, key.bot, "duplicated"))
            self._close(key_id, RpcError(406, "AUTH_KEY_DUPLICATED"))
            raise RpcError(406, "AUTH_KEY_DUPLICATED")
        connection = sessions.get(session_id) or Connection(key_id, session_id)
        connection.subscribed = (key_id, session_id) in self._subscribed
        sessions[session_id] = connection
        return connection

    def close_session(self, key_id: int, session_id: int) -> None:
        """The client ended the session: no more updates for it, even if it connects again."""
        self._subscribed.discard((key_id, session_id))
        self.disconnect(key_id, session_id)

    def disconnect(self, key_id: int, session_id: int) -> None:
        sessions = self._connections.get(key_id, {})
        connection = sessions.pop(session_id, None)
        if not sessions:
            self._connections.pop(key_id, None)
        key = self.keys.get(key_id)
        if connection is not None and key is not None and key.bot:
            self._release_if_offline(key.bot)

    def _close(self, key_id: int, error: RpcError) -> None:
        self._subscribed = {item for item in self._subscribed if item[0] != key_id}
        for connection in self._connections.pop(key_id, {}).values():
            connection.queue.put_nowait(error)
        key = self.keys.get(key_id)
        if key is not None and key.bot:
            self._release_if_offline(key.bot)

    def subscribe(self, key_id: int, session_id: int) -> None:
        """The session made a request not wrapped in invokeWithoutUpdates: push to it."""
        self._subscribed.add((key_id, session_id))
        connection = self._connections.get(key_id, {}).get(session_id)
        if connection is not None:
            connection.subscribed = True

    def online(self, bot: int) -> list[Connection]:
        return [
            connection
            for key_id, sessions in self._connections.items()
            if (key := self.keys.get(key_id)) is not None and key.bot == bot and key.state == "active"
            for connection in sessions.values()
            if connection.subscribed
        ]

    def push(self, bot: int, push: Push) -> None:
        for connection in self.online(bot):
            connection.queue.put_nowait(push)

    # What the bots handled (the sandbox's acknowledgements) ------------------------------------------

    def acknowledge(self, key_id: int, pts: int, qts: int) -> None:
        key = self.keys.get(key_id)
        if key is None or not key.bot:
            return
        handled = self._handled.setdefault(key.bot, _Handled())
        handled.pts, handled.qts = max(handled.pts, pts), max(handled.qts, qts)
        for waiter in handled.waiters:
            if waiter.pts <= handled.pts and waiter.qts <= handled.qts and not waiter.future.done():
                waiter.future.set_result(None)

    def _release_if_offline(self, bot: int) -> None:
        if self.online(bot):
            return
        for waiter in self._handled.get(bot, _Handled()).waiters:
            if not waiter.future.done():
                waiter.future.set_result(None)

    async def handled(self, bot: int, pts: int, qts: int, timeout: float) -> None:
        """Return once the bot handled everything up to pts/qts, is offline, or `timeout` passed."""
        handled = self._handled.setdefault(bot, _Handled())
        if (handled.pts >= pts and handled.qts >= qts) or not self.online(bot):
            return
        waiter = _Waiter(pts, qts, asyncio.get_running_loop().create_future())
        handled.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            pass
        finally:
            handled.waiters.remove(waiter)

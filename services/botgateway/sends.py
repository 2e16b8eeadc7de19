"""Sends made once: the random_id of a request, and this process's record of its sends.

Telegram deduplicates `messages.sendMessage` by its random_id, per bot account and person, for
ever: a repeat of a finished send answers with the message that send made, a repeat while the
first is still being made is refused with RANDOM_ID_DUPLICATE. A caller that repeats a send whose
outcome it does not know (its deadline passed, the connection broke, the database failed after
the send) passes the same request_id, so the repeat carries the same random_id and the person
gets one message.

The record keeps, per (bot, person, random_id), the Telegram message id of each send finished
here and the send still in flight: a repeat of a finished one is answered without asking Telegram
(and without spending the bot's rate), a repeat of one in flight waits for it instead of racing
it. It lives in memory, bounded: after a restart or on another replica, Telegram's own
deduplication answers instead. A send runs to its end even when its caller gives up meanwhile, so
its result is there for the repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

SendKey = tuple[str, int, int]  # bot id, person's Telegram id, random_id
RECORDED_SENDS = 100_000


def send_random_id(bot_id: str, request_id: str) -> int:
    """The random_id of every send of `request_id` through `bot_id`: the same on every replica, every
    time (non-zero, a signed 64-bit integer as Telegram's `long`)."""
    digest = hashlib.sha256(f"otpgate-send/{bot_id}/{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True) or 1


@dataclass(frozen=True)
class Sent:
    """A send's result: the bot-side message id (0 when unknown), and whether it was sent before."""

    message_id: int
    already: bool = False


class SendRecord:
    def __init__(self, size: int = RECORDED_SENDS) -> None:
        self._size = size
        self._done: OrderedDict[SendKey, int] = OrderedDict()
        self._flying: dict[SendKey, asyncio.Task[int]] = {}

    def finished(self, key: SendKey) -> int | None:
        """The message id a finished send of `key` made here, if it is remembered."""
        return self._done.get(key)

    async def earlier(self, key: SendKey) -> Sent | None:
        """The result of a send of `key` finished here, or of the one in flight (waited for); None when
        there is none, or the one in flight failed."""
        done = self._done.get(key)
        if done is not None:
            return Sent(done, already=True)
        flying = self._flying.get(key)
        if flying is None:
            return None
        try:
            return Sent(await asyncio.shield(flying), already=True)
        except Exception:
            return None

    async def once(self, key: SendKey, send: Callable[[], Awaitable[int]]) -> Sent:
        """Run `send` for `key` unless a send of it is in flight here, whose result is then shared.
        Raises what the send raised."""
        flying = self._flying.get(key)
        if flying is not None:
            return Sent(await asyncio.shield(flying), already=True)
        task = asyncio.ensure_future(send())
        self._flying[key] = task
        task.add_done_callback(lambda done: self._settle(key, done))
        return Sent(await asyncio.shield(task))

    def _settle(self, key: SendKey, task: asyncio.Task[int]) -> None:
        self._flying.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        self._done[key] = task.result()
        self._done.move_to_end(key)
        while len(self._done) > self._size:
            self._done.popitem(last=False)

"""Telegram's sending limits, kept on our side: token buckets per bot and per chat, flood pauses.

Buckets are GCRA (services/core/gcra.py): a caller learns exactly when its message may go,
reserves that slot only if it can wait that long, and never waits past its own deadline. A FloodWait from Telegram pauses one bot only.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from services.core.gcra import Bucket, Monotonic, Rate, Sleep

__all__ = ["Bucket", "FloodPaused", "Monotonic", "Rate", "RateLimited", "SendLimiter", "Sleep"]


class RateLimited(Exception):
    """The buckets cannot admit within the caller's deadline."""

    def __init__(self, retry_after: float, scope: str) -> None:
        super().__init__(f"{scope} rate limit: retry in {retry_after:.2f} s")
        self.retry_after = retry_after
        self.scope = scope  # "bot" | "chat"


class FloodPaused(Exception):
    """The bot is paused by a Telegram flood wait past the caller's deadline."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"bot paused by flood wait: retry in {retry_after:.1f} s")
        self.retry_after = retry_after


class SendLimiter:
    """Per-bot and per-chat buckets plus flood pauses, for every bot this process runs."""

    def __init__(
        self,
        bot_rate: Rate,
        chat_rate: Rate,
        *,
        now: Monotonic = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_chats: int = 100_000,
    ) -> None:
        self.bot_rate = bot_rate
        self.chat_rate = chat_rate
        self._now = now
        self._sleep = sleep
        self._bots: dict[str, Bucket] = {}
        self._chats: OrderedDict[tuple[str, int], Bucket] = OrderedDict()
        self._paused_until: dict[str, float] = {}
        self._max_chats = max_chats

    def pause(self, bot_id: str, seconds: float) -> None:
        """A FloodWait: nothing goes out through this bot for `seconds`."""
        until = self._now() + seconds
        self._paused_until[bot_id] = max(self._paused_until.get(bot_id, 0.0), until)

    def now(self) -> float:
        """The limiter's monotonic time, in which callers' deadlines are kept."""
        return self._now()

    def paused_for(self, bot_id: str) -> float:
        return max(0.0, self._paused_until.get(bot_id, 0.0) - self._now())

    def _chat(self, bot_id: str, user_id: int) -> Bucket:
        key = (bot_id, user_id)
        bucket = self._chats.get(key)
        if bucket is None:
            bucket = self._chats[key] = Bucket(self.chat_rate)
            if len(self._chats) > self._max_chats:
                self._evict()
        else:
            self._chats.move_to_end(key)
        return bucket

    def _evict(self) -> None:
        now = self._now()
        while len(self._chats) > self._max_chats:
            key, bucket = next(iter(self._chats.items()))
            if not bucket.idle(now):
                break
            del self._chats[key]

    async def acquire(self, bot_id: str, user_id: int, budget: float | None) -> float:
        """Wait for a slot for one message; `budget` is the time the caller can wait (None: unbounded).
        Returns the time waited. Raises FloodPaused or RateLimited without taking a slot."""
        waited = 0.0
        while True:
            now = self._now()
            left = None if budget is None else budget - waited
            pause = max(0.0, self._paused_until.get(bot_id, 0.0) - now)
            if pause > 0:
                if left is not None and pause > left:
                    raise FloodPaused(pause)
                await self._sleep(pause)
                waited += pause
                continue
            bot = self._bots.get(bot_id)
            if bot is None:
                bot = self._bots[bot_id] = Bucket(self.bot_rate)
            chat = self._chat(bot_id, user_id)
            bot_wait, chat_wait = bot.wait_for(now), chat.wait_for(now)
            wait = max(bot_wait, chat_wait)
            if left is not None and wait > left:
                scope = "chat" if chat_wait >= bot_wait else "bot"
                raise RateLimited(wait, scope)
            # Reserve now so concurrent callers queue behind this one, then sleep until the slot.
            bot.reserve(now + wait)
            chat.reserve(now + wait)
            if wait > 0:
                await self._sleep(wait)
                waited += wait
            return waited

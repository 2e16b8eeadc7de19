"""A counter whose numbers are handed out in order and become visible in order.

A bot's pts (and qts) is reserved when an entry of its update log is made and written afterwards,
so concurrent sends can finish writing out of order. `committed` is the highest number below
which every reservation is written: what updates.getState and getDifference may report. A
reservation whose write failed still counts as done (Telegram's sequences have gaps too), so one
failure never holds the sequence back.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Sequence:
    def __init__(self, start: int = 0) -> None:
        self.reserved = start
        self.committed = start
        self._open: deque[int] = deque()  # the last number of each reservation not yet committed
        self._finished: set[int] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def reserve(self, count: int = 1) -> int:
        """Reserve `count` numbers; returns the last of them."""
        self.reserved += count
        self._open.append(self.reserved)
        return self.reserved

    def done(self, last: int) -> None:
        """The reservation ending at `last` is written (or given up)."""
        self._finished.add(last)
        while self._open and self._open[0] in self._finished:
            self.committed = self._open.popleft()
            self._finished.discard(self.committed)
        ready = [(n, f) for n, f in self._waiters if n <= self.committed]
        self._waiters = [(n, f) for n, f in self._waiters if n > self.committed]
        for _, future in ready:
            if not future.done():
                future.set_result(None)

    async def committed_to(self, number: int) -> None:
        """Wait until everything up to `number` (at most what is reserved) is committed."""
        number = min(number, self.reserved)
        if number <= self.committed:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((number, future))
        await future

"""When this replica's dispatcher should look for work next.

Finding due work is a query over the outbox (answered from the `status, next_attempt_at` index on
MongoDB and on the dev database alike), yet polling it twice a second on every replica is work
for nothing most of the time. So the
dispatcher polls often only while it is finding work or knows of work coming due (a retry it
scheduled, an SMS report to ask for, a webhook to post), and otherwise every idle interval,
which bounds how late it notices what other replicas left behind and messages that expire.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

from services.core.clock import Clock


class Wakeup:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._at: datetime | None = None
        self._sooner = asyncio.Event()

    def at(self, when: datetime) -> None:
        """Work becomes due at `when`."""
        if self._at is None or when < self._at:
            self._at = when
            self._sooner.set()

    async def wait(self, idle: float, least: float) -> None:
        """Sleep until the earliest noted moment (but at least `least` seconds) or `idle` seconds."""
        while True:
            self._sooner.clear()
            timeout = idle
            if self._at is not None:
                timeout = min(idle, max(least, (self._at - self._clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sooner.wait(), timeout)
                continue  # something became due sooner: wait again with the new time
            self._at = None  # the pass that follows finds what was due; later work is noted anew
            return

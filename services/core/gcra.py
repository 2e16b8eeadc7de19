"""Pacing as GCRA: a token bucket kept as one "theoretical arrival time".

A caller learns exactly when its next event may happen (`wait_for`), waits that long, then takes
the slot (`reserve`); reserving before sleeping queues concurrent callers behind each other. Used
for Telegram's per-bot and per-chat limits and for an SMSC's submit rate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Monotonic = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int = 1

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second

    @property
    def tolerance(self) -> float:
        return (max(self.burst, 1) - 1) * self.interval


class Bucket:
    """GCRA: admits `burst` at once, then one every `1/rate` seconds."""

    __slots__ = ("_tat", "rate")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._tat = 0.0

    def wait_for(self, now: float) -> float:
        """Seconds until one more event would conform."""
        tat = max(self._tat, now)
        return max(0.0, tat - self.rate.tolerance - now)

    def reserve(self, now: float) -> None:
        """Take the next slot (call after waiting wait_for(now))."""
        self._tat = max(self._tat, now) + self.rate.interval

    def idle(self, now: float) -> bool:
        return self._tat <= now

"""Token buckets as GCRA (a "theoretical arrival time"): a bucket admits `burst` at once, then one
every 1/rate seconds, and says exactly how long the next one has to wait. Used for Telegram's
limits on our side (botgateway) and on the simulated Telegram's side (telegramsim)."""

from __future__ import annotations

from dataclasses import dataclass


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
        """Seconds until one more message would conform."""
        tat = max(self._tat, now)
        return max(0.0, tat - self.rate.tolerance - now)

    def reserve(self, now: float) -> None:
        """Take the next slot (call after waiting wait_for(now))."""
        self._tat = max(self._tat, now) + self.rate.interval

    def idle(self, now: float) -> bool:
        return self._tat <= now

"""The edge's own request limits: in-process token buckets per API key and per IP.

They run before any downstream call and cost a dict lookup; they protect the edge and the
services behind it from one noisy caller. Business limits (per phone, per client per day,
SMS) live in delivery and are shared by all replicas through MongoDB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from services.core.clock import Clock
from services.core.errors import ServiceError, resource_exhausted
from services.edge import metrics


@dataclass
class _Bucket:
    tokens: float
    updated: datetime


class TokenBuckets:
    """One bucket per name: `burst` tokens, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int, clock: Clock, max_entries: int = 50_000) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._max = max_entries

    def take(self, name: str) -> float:
        """0 when admitted, else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = self._clock.now()
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._evict(now)
            bucket = self._buckets[name] = _Bucket(float(self.burst), now)
        else:
            elapsed = max(0.0, (now - bucket.updated).total_seconds())
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def give_back(self, name: str) -> None:
        """Return the token a request took (it turned out not to count)."""
        bucket = self._buckets.get(name)
        if bucket is not None and self.rate > 0:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)

    def _evict(self, now: datetime) -> None:
        """Drop buckets that have refilled completely (they hold no state worth keeping)."""
        full_after = self.burst / self.rate
        idle = [k for k, b in self._buckets.items() if (now - b.updated).total_seconds() >= full_after]
        for name in idle:
            del self._buckets[name]
        if len(self._buckets) >= self._max:  # still full: forget the oldest half
            for name in sorted(self._buckets, key=lambda k: self._buckets[k].updated)[: self._max // 2]:
                del self._buckets[name]


class EdgeLimits:
    def __init__(self, clock: Clock, *, key_rate: float, key_burst: int, ip_rate: float, ip_burst: int) -> None:
        self.keys = TokenBuckets(key_rate, key_burst, clock)
        self.ips = TokenBuckets(ip_rate, ip_burst, clock)

    def check_ip(self, ip: str) -> None:
        wait = self.ips.take(ip or "unknown")
        if wait:
            metrics.limited_total.labels("ip").inc()
            raise _limited("ip", wait, f"{self.ips.rate:g} requests per second per IP")

    def check_key(self, key_id: str) -> None:
        wait = self.keys.take(key_id)
        if wait:
            metrics.limited_total.labels("api_key").inc()
            raise _limited("api_key", wait, f"{self.keys.rate:g} requests per second per API key")

    def give_back_key(self, key_id: str) -> None:
        self.keys.give_back(key_id)


def _limited(subject: str, wait: float, description: str) -> ServiceError:
    return resource_exhausted(
        "EDGE_RATE_LIMITED",
        "too many requests; retry later",
        max(1.0, math.ceil(wait)),
        [(subject, description)],
    )

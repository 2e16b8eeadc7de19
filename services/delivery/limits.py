"""Rate limits shared by every replica, kept in MongoDB.

Each admitted event owns one numbered slot document in its window
(`_id = limit|key|window|slot`, slots 1..limit). Slots are taken with plain inserts,
so the unique `_id` makes admission exact under concurrency on any MongoDB-wire
server: a counter updated with `$inc` is not atomic on the dev database (measured:
20 concurrent increments of one document gave 7), an insert that collides always fails.

Nothing is counted with a query: how far a window is filled is found by probing slot ids
(1, 2, 4, 8, … then bisecting), so every read is an `_id` lookup; a process remembers the
last slot it took per window, so its next event is usually one insert.

Windows are fixed (aligned to the epoch) or sliding (the previous fixed window
weighted by how much of it still overlaps, plus the current one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock
from services.core.errors import ServiceError, resource_exhausted
from services.core.mongo import Document, ensure_index
from services.delivery import metrics


@dataclass(frozen=True)
class Rate:
    """At most `limit` events per `window` seconds. limit 0: unlimited."""

    limit: int
    window: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """ "5/600" -> 5 per 600 s; "20/1d", "5/10m", "100/1h" also accepted."""
        count, sep, window = text.strip().partition("/")
        if not sep:
            raise ValueError("expected <count>/<seconds>, e.g. 5/600 or 5/10m")
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        window = window.strip()
        factor = 1
        if window and window[-1] in units:
            factor, window = units[window[-1]], window[:-1]
        seconds = float(window or "1") * factor
        limit = int(count)
        if limit < 0 or seconds <= 0:
            raise ValueError("count must be >= 0 and the window > 0")
        return cls(limit, seconds)

    def describe(self) -> str:
        seconds = self.window
        for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
            if seconds >= size and seconds % size == 0:
                n = int(seconds // size)
                return f"{self.limit} per {n} {unit}{'s' if n != 1 else ''}"
        return f"{self.limit} per {seconds:g} seconds"


@dataclass(frozen=True)
class Hit:
    """One event to count against one limit. `key` must not contain personal data in clear."""

    limit_name: str
    key: str
    rate: Rate
    sliding: bool = True
    # Shown in QuotaFailure.subject.
    subject: str = ""


@dataclass
class _Taken:
    slot_id: str


class RateLimited(Exception):
    def __init__(self, hit: Hit, retry_after: float) -> None:
        super().__init__(hit.limit_name)
        self.hit = hit
        self.retry_after = retry_after

    def to_error(self) -> ServiceError:
        subject = self.hit.subject or self.hit.limit_name
        return resource_exhausted(
            "RATE_LIMITED",
            f"rate limit reached ({self.hit.limit_name}: {self.hit.rate.describe()}); retry later",
            self.retry_after,
            [(subject, f"{self.hit.limit_name}: {self.hit.rate.describe()}")],
        )


class Limiter:
    def __init__(self, collection: AsyncCollection[Document], clock: Clock, max_probe: int = 64) -> None:
        self._coll = collection
        self._clock = clock
        self._max_probe = max_probe
        # Closed windows never change: their counts are cached (key|window -> count).
        self._closed: dict[str, int] = {}
        # The last slot this process took per open window: the next try starts above it without a
        # count; the first collision (another replica took it) falls back to counting.
        self._hints: dict[str, int] = {}

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("exp", 1)])

    async def acquire(self, hits: list[Hit]) -> None:
        """Count every hit or none: raises RateLimited for the first limit that is full
        (slots already taken for earlier limits are given back)."""
        taken: list[_Taken] = []
        try:
            for hit in hits:
                if hit.rate.limit <= 0:
                    continue
                taken.append(await self._take(hit))
        except RateLimited as exc:
            for given_back in taken:  # one by one: an `_id` lookup each, never a scan
                await self._coll.delete_one({"_id": given_back.slot_id})
            metrics.limiter_rejections_total.labels(exc.hit.limit_name).inc()
            raise

    async def _take(self, hit: Hit) -> _Taken:
        now = self._clock.now()
        epoch = now.timestamp()
        window = hit.rate.window
        index = math.floor(epoch / window)
        start = index * window
        frac = (epoch - start) / window
        base = f"{hit.limit_name}|{hit.key}"
        current_w = f"{base}|{index}"
        previous = 0
        if hit.sliding:
            previous = await self._closed_count(f"{base}|{index - 1}")
        carried = previous * (1.0 - frac)
        limit = hit.rate.limit
        # A hint learnt in this process may be stale (another replica took slots, or slots were
        # given back); it is checked against the database before a refusal.
        probed = False
        for _ in range(self._max_probe):
            # Numbers are reserved in this process before the insert, so concurrent requests here
            # never race for one slot; only other replicas can collide.
            slot = self._reserve(current_w)
            if carried + slot > limit:
                if self._hints.get(current_w) == slot:
                    self._hints[current_w] = slot - 1  # give the number back
                if not probed:
                    probed = True
                    self._hints[current_w] = await self._first_free(current_w, 0) - 1
                    continue
                raise RateLimited(hit, self._retry_after(hit, start, epoch, previous, slot - 1))
            slot_id = f"{current_w}|{slot}"
            try:
                await self._coll.insert_one(
                    {
                        "_id": slot_id,
                        "exp": datetime.fromtimestamp(start + 2 * window, tz=now.tzinfo) + timedelta(seconds=1),
                    }
                )
                return _Taken(slot_id)
            except DuplicateKeyError:
                # Another replica is ahead in this window: continue above its last slot.
                self._raise_hint(current_w, await self._first_free(current_w, slot) - 1)
        raise RateLimited(hit, 1.0)

    async def _first_free(self, window_id: str, taken: int) -> int:
        """A free slot number above `taken` (known taken, or 0) whose predecessor is taken: doubling
        steps until a free slot, then bisection, each probe an `_id` lookup. Slots fill from 1 up,
        so this is the next free slot; a slot given back below it is simply not reused."""
        low, step = taken, 1
        high = low + step
        while await self._is_taken(window_id, high):
            low, step = high, step * 2
            high = low + step
        while high - low > 1:
            middle = (low + high) // 2
            if await self._is_taken(window_id, middle):
                low = middle
            else:
                high = middle
        return high

    async def _is_taken(self, window_id: str, slot: int) -> bool:
        return await self._coll.find_one({"_id": f"{window_id}|{slot}"}, {"_id": 1}) is not None

    def _raise_hint(self, window_id: str, count: int) -> None:
        if len(self._hints) > 50_000:
            self._hints.clear()
        self._hints[window_id] = max(self._hints.get(window_id, 0), count)

    def _reserve(self, window_id: str) -> int:
        """The next slot number for this process, above everything reserved here."""
        slot = self._hints.get(window_id, 0) + 1
        self._hints[window_id] = slot
        return slot

    async def _closed_count(self, window_id: str) -> int:
        cached = self._closed.get(window_id)
        if cached is not None:
            return cached
        count = await self._first_free(window_id, 0) - 1
        if len(self._closed) > 50_000:
            self._closed.clear()
        self._closed[window_id] = count
        return count

    @staticmethod
    def _retry_after(hit: Hit, start: float, epoch: float, previous: int, current: int) -> float:
        window = hit.rate.window
        end = start + window
        limit = hit.rate.limit
        if not hit.sliding or current + 1 > limit or previous == 0:
            return max(1.0, end - epoch)
        # The previous window's weight previous*(1-f) must fall to limit-current-1.
        needed = 1.0 - (limit - current - 1) / previous
        moment = start + max(0.0, min(1.0, needed)) * window
        return max(1.0, moment - epoch)

    async def purge(self) -> int:
        result = await self._coll.delete_many({"exp": {"$lt": self._clock.now()}})
        return int(result.deleted_count)

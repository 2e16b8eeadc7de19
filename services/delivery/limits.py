"""Rate limits shared by every replica, kept in MongoDB.

Each admitted event owns one numbered slot document in its window
(`_id = limit|key|window|slot`, slots 1..limit). Slots are taken with plain inserts,
so the unique `_id` makes admission exact under concurrency across replicas, no two
requests ever write one document, and concurrent requests' slots share one insert
command (services/core/batching.py).

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

from services.core.batching import InsertBatcher
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
class _Window:
    """Where one hit is counted now: its open window and the weight carried from the previous one."""

    hit: Hit
    start: float
    epoch: float
    current: str
    previous: str
    expires: datetime
    carried_count: int = 0  # events in the previous window; stays 0 for a fixed window

    @property
    def carried(self) -> float:
        """The previous window's events still weighing (none for a fixed window)."""
        return self.carried_count * (1.0 - (self.epoch - self.start) / self.hit.rate.window)


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
        self._slots = InsertBatcher(collection)  # concurrent requests' slots share one insert
        self._clock = clock
        self._max_probe = max_probe
        # Closed windows never change: their counts are cached (key|window -> count).
        self._closed: dict[str, int] = {}
        # The last slot this process took per open window: the next try starts above it without
        # probing; a collision (another replica took it) probes for the next free one.
        self._hints: dict[str, int] = {}

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("exp", 1)])

    async def acquire(self, hits: list[Hit]) -> None:
        """Count every hit or none: raises RateLimited for the first limit that is full
        (slots already taken for other limits are given back). Usually two commands for all
        the hits together: one lookup of the previous windows, one insert of every slot."""
        windows = [self._window(hit) for hit in hits if hit.rate.limit > 0]
        if not windows:
            return
        taken: list[str] = []
        try:
            await self._weigh_previous(windows)
            first: list[tuple[_Window, int]] = []
            try:
                for window in windows:
                    first.append((window, await self._candidate(window)))
            except RateLimited:
                for window, slot in first:
                    self._give_back(window.current, slot)
                raise
            for window, slot in await self._insert(first, taken):
                await self._skip_past(window.current, slot)
                taken.append(await self._take(window))
        except RateLimited as exc:
            for slot_id in taken:  # one by one: an `_id` lookup each, never a scan
                await self._coll.delete_one({"_id": slot_id})
            metrics.limiter_rejections_total.labels(exc.hit.limit_name).inc()
            raise

    def _window(self, hit: Hit) -> _Window:
        now = self._clock.now()
        epoch = now.timestamp()
        index = math.floor(epoch / hit.rate.window)
        start = index * hit.rate.window
        base = f"{hit.limit_name}|{hit.key}"
        expires = datetime.fromtimestamp(start + 2 * hit.rate.window, tz=now.tzinfo) + timedelta(seconds=1)
        return _Window(hit, start, epoch, f"{base}|{index}", f"{base}|{index - 1}", expires)

    async def _weigh_previous(self, windows: list[_Window]) -> None:
        """How many events each sliding hit's previous window holds: cached once it is closed,
        otherwise probed, all windows together, at slots 1, 2, 4, … (then bisected when needed)."""
        unknown = [w for w in windows if w.hit.sliding and w.previous not in self._closed]
        probes = {w.previous: _powers(w.hit.rate.limit + 1) for w in unknown}
        ids = [f"{window_id}|{slot}" for window_id, slots in probes.items() for slot in slots]
        present = {doc["_id"] async for doc in self._coll.find({"_id": {"$in": ids}}, {"_id": 1})} if ids else set()
        for window_id, slots in probes.items():
            low = 0
            for slot in slots:
                if f"{window_id}|{slot}" not in present:
                    self._remember_closed(window_id, await self._bisect(window_id, low, slot) - 1)
                    break
                low = slot
            else:
                self._remember_closed(window_id, await self._first_free(window_id, low) - 1)
        for window in windows:
            if window.hit.sliding:
                window.carried_count = self._closed[window.previous]

    async def _candidate(self, window: _Window) -> int:
        """The slot to try first: above the last one this process took, or RateLimited."""
        limit = window.hit.rate.limit
        slot = self._reserve(window.current)
        if window.carried + slot <= limit:
            return slot
        self._give_back(window.current, slot)
        # The hint may be stale (slots given back, or none taken here yet): look before refusing.
        self._hints[window.current] = await self._first_free(window.current, 0) - 1
        slot = self._reserve(window.current)
        if window.carried + slot <= limit:
            return slot
        self._give_back(window.current, slot)
        raise self._refusal(window, slot - 1)

    async def _insert(self, slots: list[tuple[_Window, int]], taken: list[str]) -> list[tuple[_Window, int]]:
        """Insert every slot in one command; returns those another replica took first."""
        ids = [f"{window.current}|{slot}" for window, slot in slots]
        docs = [{"_id": slot_id, "exp": window.expires} for slot_id, (window, _) in zip(ids, slots, strict=True)]
        inserted = await self._slots.insert(docs)
        taken.extend(slot_id for slot_id, ok in zip(ids, inserted, strict=True) if ok)
        return [slot for slot, ok in zip(slots, inserted, strict=True) if not ok]

    async def _take(self, window: _Window) -> str:
        """Take the next free slot of a window another replica is also filling."""
        for _ in range(self._max_probe):
            slot = await self._candidate(window)
            slot_id = f"{window.current}|{slot}"
            if await self._slots.insert_one({"_id": slot_id, "exp": window.expires}):
                return slot_id
            await self._skip_past(window.current, slot)
        raise RateLimited(window.hit, 1.0)

    async def _skip_past(self, window_id: str, collided: int) -> None:
        """Another replica took `collided`: continue above its last slot in this window."""
        self._raise_hint(window_id, await self._first_free(window_id, collided) - 1)

    def _refusal(self, window: _Window, current: int) -> RateLimited:
        retry_after = self._retry_after(window.hit, window.start, window.epoch, window.carried_count, current)
        return RateLimited(window.hit, retry_after)

    async def _first_free(self, window_id: str, taken: int) -> int:
        """A free slot number above `taken` (known taken, or 0) whose predecessor is taken: doubling
        steps until a free slot, then bisection, each probe an `_id` lookup. Slots fill from 1 up,
        so this is the next free slot; a slot given back below it is simply not reused."""
        low, step = taken, 1
        high = low + step
        while await self._is_taken(window_id, high):
            low, step = high, step * 2
            high = low + step
        return await self._bisect(window_id, low, high)

    async def _bisect(self, window_id: str, low: int, high: int) -> int:
        """The first free slot in (low, high], given `low` taken (or 0) and `high` free."""
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

    def _give_back(self, window_id: str, slot: int) -> None:
        if self._hints.get(window_id) == slot:
            self._hints[window_id] = slot - 1

    def _remember_closed(self, window_id: str, count: int) -> None:
        if len(self._closed) > 50_000:
            self._closed.clear()
        self._closed[window_id] = count

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


def _powers(upto: int) -> list[int]:
    """1, 2, 4, … up to the first power of two at or above `upto`."""
    powers = [1]
    while powers[-1] < upto:
        powers.append(powers[-1] * 2)
    return powers

"""Capped counters shared by every replica: reserve a unit first, then act, give it back if unused.

A cap like "100 failed checks per number and hour" must hold however many requests race for
its last unit, across replicas. Each window of a counter is one document, `_id =
name|key|window`, holding `n`; a reservation is one conditional increment,

    find_one_and_update({_id: <window>, n: {$lt: <allowed now>}}, {$inc: {n: 1}}, upsert=True)

which MongoDB applies atomically to one document: of racing callers exactly `allowed - n` win.
A full window does not match the filter, so the upsert tries to insert a second document with
the same `_id` and is refused (E11000): that refusal *is* the answer "full", and no count is
ever read first and written later. A caller whose action turns out not to count gives its unit
back with `$inc: -1`; one that knows beforehand that it will not count (a right code) only asks
`full`, a read that takes nothing.

The window slides in steps: it is cut into `buckets` parts (default 6, so ten minutes of an
hour), units go into the current part, and a reservation succeeds only while the current part
plus the `buckets` parts before it stay below `limit`. Any `window` seconds lie within those
parts, so no `window` ever holds more than `limit` units; a burst keeps the counter full for at
most `window + window / buckets`. Closed parts never grow, so their counts are read once per
process (one `_id $in` lookup of those it lacks) and kept; give-backs only lower them, which
errs on the safe side.

One conditional increment per reservation is the cheapest exact form for one hot key (a
number under a guessing attack): numbered slot inserts (services/delivery/limits.py) collide
there and probe for the next free slot, while they win where several limits are taken at once
(one insert for all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock
from services.core.mongo import Document


@dataclass(frozen=True)
class Reservation:
    """One unit taken from a window; give it back if what it was taken for did not happen."""

    window_id: str
    count: int  # the window's count with this unit


@dataclass(frozen=True)
class Full:
    """No unit left; `retry_after` seconds until one frees up."""

    retry_after: float


class CappedCounter:
    """At most `limit` units in any `window` seconds per key."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        clock: Clock,
        name: str,
        limit: int,
        window: float,
        buckets: int = 6,
    ) -> None:
        self._coll = collection
        self._clock = clock
        self.name = name
        self.limit = limit
        self.window = window
        self.buckets = buckets
        self.step = window / buckets
        self._closed: dict[str, int] = {}

    async def reserve(self, key: str) -> Reservation | Full:
        """Take one unit for `key`, or learn that none is left (nothing written then)."""
        epoch, index, earlier, current = self._parts(key)
        counts = await self._closed_counts([window_id for _, window_id in earlier])
        allowed = self.limit - sum(counts.values())
        if allowed > 0:
            try:
                doc = await self._coll.find_one_and_update(
                    {"_id": current, "n": {"$lt": allowed}},
                    {"$inc": {"n": 1}, "$setOnInsert": {"at": self._expires(index)}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                doc = None  # the part exists and is full: the upsert's insert was refused
            if doc is not None:
                return Reservation(current, int(doc["n"]))
        return Full(self._retry_after(earlier, counts, allowed, index, epoch))

    async def full(self, key: str) -> Full | None:
        """Whether `key` has no unit left, taking nothing: the closed parts this process lacks and
        the current part in one `_id $in` lookup. For what never counts, but must not happen at
        the cap (a right code is only answered while wrong ones could still be counted)."""
        epoch, index, earlier, current = self._parts(key)
        counts, missing = self._known_closed([window_id for _, window_id in earlier])
        wanted = {"_id": {"$in": [*missing, current]}}
        found = {doc["_id"]: int(doc["n"]) async for doc in self._coll.find(wanted, {"n": 1})}
        counts.update(self._remember_closed({window_id: found.get(window_id, 0) for window_id in missing}))
        allowed = self.limit - sum(counts.values())
        if found.get(current, 0) < allowed:
            return None
        return Full(self._retry_after(earlier, counts, allowed, index, epoch))

    def _parts(self, key: str) -> tuple[float, int, list[tuple[int, str]], str]:
        """(now, the current part's index, the earlier parts' (index, id), the current part's id)."""
        epoch = self._clock.now().timestamp()
        index = math.floor(epoch / self.step)
        base = f"{self.name}|{key}|"
        return epoch, index, [(i, f"{base}{i}") for i in range(index - self.buckets, index)], f"{base}{index}"

    def _known_closed(self, window_ids: list[str]) -> tuple[dict[str, int], list[str]]:
        """The closed parts' counts this process keeps, and the ids of those it lacks."""
        known = {window_id: self._closed[window_id] for window_id in window_ids if window_id in self._closed}
        return known, [window_id for window_id in window_ids if window_id not in known]

    def _remember_closed(self, counts: dict[str, int]) -> dict[str, int]:
        if len(self._closed) + len(counts) > 100_000:
            self._closed.clear()
        self._closed.update(counts)
        return counts

    async def give_back(self, reservation: Reservation) -> None:
        await self._coll.update_one({"_id": reservation.window_id, "n": {"$gt": 0}}, {"$inc": {"n": -1}})

    async def _closed_counts(self, window_ids: list[str]) -> dict[str, int]:
        counts, missing = self._known_closed(window_ids)
        if missing:
            found = {doc["_id"]: int(doc["n"]) async for doc in self._coll.find({"_id": {"$in": missing}}, {"n": 1})}
            counts.update(self._remember_closed({window_id: found.get(window_id, 0) for window_id in missing}))
        return counts

    def _retry_after(
        self, earlier: list[tuple[int, str]], counts: dict[str, int], allowed: int, index: int, epoch: float
    ) -> float:
        """Seconds until enough of the oldest parts slide out for one unit (the current part is
        taken as holding what it must hold at least: `allowed` units, or none)."""
        held = sum(counts.values()) + max(allowed, 0)
        needed = held - self.limit + 1
        freed = 0
        for i, window_id in earlier:
            freed += counts[window_id]
            if freed >= needed:
                return max(1.0, (i + self.buckets + 1) * self.step - epoch)
        return max(1.0, (index + self.buckets + 1) * self.step - epoch)

    def _expires(self, index: int) -> datetime:
        """When a part's document may go: once no window it lies in is current any more."""
        now = self._clock.now()
        return datetime.fromtimestamp((index + self.buckets + 1) * self.step, tz=now.tzinfo) + timedelta(seconds=1)

"""Rate limits shared by every replica, kept in MongoDB.

Every limited key (a client, a number, a session, an address: keyed, never in clear) has one
counter document, `_id = key`, holding the count of each limit's recent windows as fields
`<limit>|<window seconds>|<window index>`. Counting a request against every limit on one key is
one `find_one_and_update`: `$inc` on their current windows, upserted, returning the document as
it is after, which also holds each limit's previous window, so a sliding window costs no second
read. MongoDB applies the increment to the one document atomically, so racing requests see
distinct counts; one whose count lands past a limit takes its increments back (`$inc` -1) and is
refused. No request is ever admitted past a limit; racing at the very edge of one, a request may
be refused that would have fitted once the others' give-backs landed (the safe side). Admitted
counts never shrink, so a process that found a window full refuses again without a round trip
until a unit may free up (the retry-after it gave): a number under attack costs no more writes.

Throughput limits (the client's, the service's: thousands a minute on one key) lease their
units (`Hit.lease`): a replica takes that many in one increment and spends them in memory within
that window, so such a key costs one round trip per `lease` requests, not a write by every
request to one hot document. Units leased and not spent when their window ends still count:
they may refuse up to `lease` requests per replica early, never admit one past the limit. Caps
that must be exact both ways (a number's limits, daily SMS caps) lease nothing.

Windows are fixed (aligned to the epoch) or sliding (the previous fixed window weighted by how
much of it still overlaps, plus the current one).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import ReturnDocument
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
    # Units a replica takes from the shared count at once (see the module docstring); 1: exact.
    lease: int = 1


def throughput_lease(rate: Rate) -> int:
    """The lease of a throughput limit: a hundredth of it, from 1 to 50 units."""
    return max(1, min(50, rate.limit // 100))


@dataclass
class _Window:
    """Where one hit is counted now: the field of its open window and of the previous one."""

    hit: Hit
    start: float
    epoch: float
    current: str
    previous: str
    stale: tuple[str, ...]  # fields of windows that no longer weigh: dropped as the count is written
    expires: datetime
    granted: int = 0  # of the units taken, how many fitted under the limit

    @property
    def units(self) -> int:
        """Taken from the shared count by this request: the hit's lease (a block when more than 1)."""
        return self.hit.lease

    @property
    def lease_key(self) -> str:
        """Where this process keeps its lease of the limit on this key."""
        return f"{self.hit.limit_name}|{self.hit.key}"

    @property
    def full_key(self) -> str:
        """Where this process remembers the window found full (under this limit: a raised one is asked)."""
        return f"{self.hit.key}|{self.current}|{self.hit.rate.limit}"

    @property
    def weight(self) -> float:
        """How much of the previous window still weighs (none for a fixed window)."""
        return 1.0 - (self.epoch - self.start) / self.hit.rate.window if self.hit.sliding else 0.0


@dataclass
class _Lease:
    """Units leased by this process for one limit's window, not spent yet."""

    window: str
    left: int


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
    def __init__(self, collection: AsyncCollection[Document], clock: Clock) -> None:
        self._coll = collection
        self._clock = clock
        self._leases: dict[str, _Lease] = {}  # limit|key -> this process's lease of its open window
        self._refills: dict[str, asyncio.Event] = {}  # limit|key -> set once its lease in flight is in
        # key|window|limit -> until when it was found full: a repeat is refused without a round trip (a
        # hammered number costs the database nothing more); admitted counts are never given back. A
        # limit raised since (a policy change) is another entry, so it is asked at once.
        self._full_until: dict[str, float] = {}

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("exp", 1)])

    async def acquire(self, hits: list[Hit]) -> None:
        """Count every hit or none: raises RateLimited for the first limit that is full (what
        was taken for the others is given back). One round trip per key whose limits are not
        served from a lease, all keys at once."""
        windows = [self._window(hit) for hit in hits if hit.rate.limit > 0]
        for window in windows:
            # Refused here before: counts only grow until then, so the answer stands without a write.
            until = self._full_until.get(window.full_key, 0.0)
            if until > window.epoch:
                metrics.limiter_rejections_total.labels(window.hit.limit_name).inc()
                raise RateLimited(window.hit, max(1.0, until - window.epoch))
        from_lease: list[_Window] = []
        refilling: list[str] = []
        admitted = False
        try:
            by_key: dict[str, list[_Window]] = {}
            for window in windows:
                if await self._spend_leased(window, refilling):
                    from_lease.append(window)
                else:
                    by_key.setdefault(window.hit.key, []).append(window)
            groups = list(by_key.items())
            docs = await asyncio.gather(*(self._count(key, group) for key, group in groups))
            refused: tuple[_Window, Document] | None = None
            for (_, group), doc in zip(groups, docs, strict=True):
                for window in group:
                    window.granted = self._fitting(window, doc)
                    if window.granted == 0 and refused is None:
                        refused = (window, doc)
            admitted = refused is None
            unused: dict[str, list[tuple[_Window, int]]] = {}
            for key, group in groups:
                for window in group:
                    if window.units > 1:
                        # A lease: what fitted stays counted and leased (an admitted request spends one).
                        self._keep_lease(window, window.granted - (1 if admitted else 0))
                        back = window.units - window.granted
                    else:
                        back = 0 if admitted else window.units  # one unit: kept only if admitted
                    unused.setdefault(key, []).append((window, back))
            await self._give_back(unused)
            if refused is not None:
                window, doc = refused
                metrics.limiter_rejections_total.labels(window.hit.limit_name).inc()
                previous = int(doc.get(window.previous, 0)) if window.hit.sliding else 0
                before = int(doc.get(window.current, 0)) - window.units
                retry_after = self._retry_after(window.hit, window.start, window.epoch, previous, before)
                self._remember_full(window, retry_after)
                raise RateLimited(window.hit, retry_after)
        finally:
            for lease_key in refilling:
                self._refills.pop(lease_key).set()  # those waiting for this lease go on
            if not admitted:
                for window in from_lease:
                    self._return_leased(window)

    def _window(self, hit: Hit) -> _Window:
        now = self._clock.now()
        epoch = now.timestamp()
        index = math.floor(epoch / hit.rate.window)
        start = index * hit.rate.window
        base = f"{hit.limit_name}|{hit.rate.window:g}|".replace(".", "_")  # a dot would nest the field
        expires = datetime.fromtimestamp(start + 2 * hit.rate.window, tz=now.tzinfo) + timedelta(seconds=1)
        stale = (f"{base}{index - 2}", f"{base}{index - 3}")
        return _Window(hit, start, epoch, f"{base}{index}", f"{base}{index - 1}", stale, expires)

    async def _spend_leased(self, window: _Window, refilling: list[str]) -> bool:
        """Spend one unit this process leased for the window. When none is left, one request
        takes the next lease (its key joins `refilling`) and the others wait for it, so a burst
        takes one lease, not one each."""
        if window.units == 1:
            return False
        lease_key = window.lease_key
        while True:
            lease = self._leases.get(lease_key)
            if lease is not None and lease.window == window.current and lease.left > 0:
                lease.left -= 1
                return True
            pending = self._refills.get(lease_key)
            if pending is None:
                break
            await pending.wait()
        self._refills[lease_key] = asyncio.Event()
        refilling.append(lease_key)
        return False

    def _return_leased(self, window: _Window) -> None:
        lease = self._leases.get(window.lease_key)
        if lease is not None and lease.window == window.current:
            lease.left += 1

    def _remember_full(self, window: _Window, retry_after: float) -> None:
        if len(self._full_until) > 50_000:
            self._full_until.clear()
        self._full_until[window.full_key] = window.epoch + retry_after

    def _keep_lease(self, window: _Window, left: int) -> None:
        if len(self._leases) > 50_000:
            self._leases.clear()
        self._leases[window.lease_key] = _Lease(window.current, max(0, left))

    async def _count(self, key: str, windows: list[_Window]) -> Document:
        """Add the windows' units to the key's document; the document as it is after."""
        update: Document = {
            "$inc": {window.current: window.units for window in windows},
            "$max": {"exp": max(window.expires for window in windows)},
            "$unset": {name: "" for window in windows for name in window.stale},
        }
        for _ in range(2):
            try:
                doc = await self._coll.find_one_and_update(
                    {"_id": key}, update, upsert=True, return_document=ReturnDocument.AFTER
                )
                return doc or {}
            except DuplicateKeyError:
                continue  # another request created the document first: now it is an update
        raise RuntimeError("the limit document was created and removed under us twice")

    @staticmethod
    def _fitting(window: _Window, doc: Document) -> int:
        """How many of the window's units fit: the limit, less the previous window's weight, less
        what others counted before these units."""
        limit = window.hit.rate.limit
        carried = int(doc.get(window.previous, 0)) * window.weight
        before = int(doc.get(window.current, 0)) - window.units
        room = math.floor(limit - carried + 1e-9) - before
        return max(0, min(window.units, room))

    async def _give_back(self, returns: dict[str, list[tuple[_Window, int]]]) -> None:
        """Take back units counted and not used, one update per key that has any."""
        updates = []
        for key, items in returns.items():
            inc = {window.current: -units for window, units in items if units > 0}
            if inc:
                updates.append(self._coll.update_one({"_id": key}, {"$inc": inc}))
        await asyncio.gather(*updates)

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
        """Documents whose every window has stopped weighing."""
        result = await self._coll.delete_many({"exp": {"$lt": self._clock.now()}})
        return int(result.deleted_count)

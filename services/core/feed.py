"""Per-owner feeds: the ids of an owner's records, newest first, paged without a query that scans.

A listing such as "this client's verifications, newest first" is a sorted query on
(client_id, created_at) that MongoDB (and now the dev database, README) answers from an index; a
feed does the same with lookups by `_id` alone, so its cost is the same on any server and at any
size, filters included (at most `max_candidates` entries read per page). A feed numbers: each record appended to
its owner's feed takes the next number with a plain insert of `_id = "<owner>|<n>"`, so the
unique `_id` makes numbers exact however many replicas append at once (a collision means
another writer took it: take the next). A page is one `_id $in` lookup of the numbers below a
cursor, so reading costs the same at any size of the collection.

The head (the highest number taken) is found by probing, not counting: from what this
process saw last (or the owner's head hint, written every HINT_EVERY numbers and never
purged), one `$in` of head+1, head+2, head+4, … finds how far the feed grew, and batched
lookups bisect the last step. Numbers stay dense from the oldest kept entry to the head:
entries are never deleted one by one, only purged oldest first with their records.

An entry is appended before its record is written, so no record is ever missing from its feed;
an entry may point to a record that never came to be or is gone (a start refused downstream
deletes its record): readers skip those.

`read_page` is the listing every feed serves (AIP-132/158): newest first from a cursor, a filter
applied to each page's candidates, and at most `max_candidates` of them read per request, so a
selective filter answers a short (even empty) page with a next-page cursor instead of walking
the whole history in one request. Page tokens carry the cursor and are bound to the filter they
were made with (`encode_token`/`decode_token`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from pymongo.asynchronous.collection import AsyncCollection

from services.core import page_tokens
from services.core.batching import InsertBatcher
from services.core.errors import invalid_argument
from services.core.mongo import Document, ensure_index, purge_before, put_by_id

HINT_EVERY = 16
_PROBE_STEPS = 40  # head + 2**39 is beyond any feed
_BISECT_WIDTH = 32  # numbers looked up per bisection round
_MAX_APPEND_TRIES = 8


def entry_id(owner: str, number: int) -> str:
    return f"{owner}|{number:012d}"


def _hint_id(owner: str) -> str:
    return f"{owner}|head"


@dataclass(frozen=True)
class FeedEntry:
    number: int
    record_id: str


class Feed:
    """One collection of feed entries for many owners (an owner id must not contain '|')."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection
        self._inserts = InsertBatcher(collection)
        self._heads: dict[str, int] = {}

    async def create_indexes(self) -> None:
        await ensure_index(self.collection, [("at", 1)], name="at")

    async def append(self, owner: str, record_id: str, at: datetime) -> int:
        """Give `record_id` the next number in `owner`'s feed; returns it."""
        if owner not in self._heads:
            await self.head(owner)
        for _ in range(_MAX_APPEND_TRIES):
            # Reserved before the insert is awaited, so this process's concurrent appends never collide.
            number = self._heads[owner] = self._heads.get(owner, 0) + 1
            doc = {"_id": entry_id(owner, number), "record_id": record_id, "at": at}
            if await self._inserts.insert_one(doc):
                if number % HINT_EVERY == 0:
                    await put_by_id(self.collection, _hint_id(owner), {"head": number})
                return number
            await self.head(owner, at_least=number)  # another replica took it: skip to past its head
        raise RuntimeError(f"feed {owner!r}: no free number after {_MAX_APPEND_TRIES} tries")

    async def head(self, owner: str, *, at_least: int = 0) -> int:
        """The highest number taken in `owner`'s feed (0: empty)."""
        known = max(at_least, self._heads.get(owner, 0))
        if known == 0:
            hint = await self.collection.find_one({"_id": _hint_id(owner)})
            known = int(hint["head"]) if hint is not None else 0
        # Gallop: the largest of known + 2**k that exists bounds the head from below. Each probe
        # has a neighbour, so a lone hole (a number whose insert failed) cannot stop the gallop.
        steps = sorted({known + 2**k + extra for k in range(_PROBE_STEPS) for extra in (0, 1)})
        found = await self._existing(owner, steps)
        if not found:
            self._remember(owner, known)
            return known
        low = max(found)
        high = next((s for s in steps if s > low), low + 1)  # the first probe above low: absent
        # Bisect (low exists, high does not) with batched lookups.
        while high - low > 1:
            span = high - low
            points = sorted({low + max(1, span * i // (_BISECT_WIDTH + 1)) for i in range(1, _BISECT_WIDTH + 1)})
            points = [p for p in points if low < p < high]
            present = await self._existing(owner, points)
            below = [p for p in points if p in present]
            above = [p for p in points if p not in present]
            low = max(below, default=low)
            high = min((p for p in above if p > low), default=high)
        self._remember(owner, low)
        return low

    async def page(self, owner: str, before: int, size: int) -> list[FeedEntry]:
        """Up to `size` entries numbered below `before` (0: from the head), newest first."""
        top = (await self.head(owner)) + 1 if before <= 0 else before
        numbers = list(range(top - 1, max(0, top - 1 - size), -1))
        if not numbers:
            return []
        ids = [entry_id(owner, n) for n in numbers]
        docs = {str(doc["_id"]): doc async for doc in self.collection.find({"_id": {"$in": ids}})}
        return [
            FeedEntry(number, str(docs[key]["record_id"]))
            for number, key in zip(numbers, ids, strict=True)
            if key in docs
        ]

    async def purge(self, before: datetime) -> int:
        """Entries appended before `before` (oldest first, so numbers stay dense); hints stay."""
        return await purge_before(self.collection, "at", before)

    async def _existing(self, owner: str, numbers: list[int]) -> set[int]:
        if not numbers:
            return set()
        ids = {entry_id(owner, n): n for n in numbers}
        cursor = self.collection.find({"_id": {"$in": list(ids)}}, projection={"_id": 1})
        return {ids[str(doc["_id"])] async for doc in cursor}

    def _remember(self, owner: str, number: int) -> None:
        if number > self._heads.get(owner, 0):
            if len(self._heads) > 100_000:
                self._heads.clear()
            self._heads[owner] = number


R = TypeVar("R")


@dataclass(frozen=True)
class FeedPage(Generic[R]):
    items: list[R]
    # The feed number the next page starts below; 0: there is no next page.
    next_before: int


async def read_page(
    feed: Feed,
    owner: str,
    before: int,
    size: int,
    load: Callable[[Sequence[str]], Awaitable[list[R]]],
    matches: Callable[[R], bool] | None = None,
    ended: Callable[[R], bool] | None = None,
    max_candidates: int = 500,
) -> FeedPage[R]:
    """Up to `size` of `owner`'s records below feed number `before` (0: from the newest) that
    `matches` keeps, newest first. `load` reads the records of a list of ids, in that order,
    leaving out those that are gone; `ended` says a record is older than anything wanted (a
    creation-time bound), which ends the listing."""
    found: list[R] = []
    read = 0
    while len(found) < size and read < max_candidates:
        batch = min(size - len(found), max_candidates - read) if matches else size - len(found)
        entries = await feed.page(owner, before, batch)
        if not entries:
            return FeedPage(found, 0)
        read += len(entries)
        for record in await load([entry.record_id for entry in entries]):
            if ended is not None and ended(record):
                return FeedPage(found, 0)
            if matches is None or matches(record):
                found.append(record)
        before = entries[-1].number
        if before <= 1:
            return FeedPage(found, 0)
    return FeedPage(found, before)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def encode_token(before: int, filter_text: str) -> str:
    return page_tokens.encode(json.dumps([before, _fingerprint(filter_text)]))


def decode_token(token: str, filter_text: str) -> int:
    """The feed number the next page starts below; the token is bound to the filter it was made with."""
    try:
        before, fingerprint = json.loads(page_tokens.decode(token))
        valid = isinstance(before, int) and before > 0 and isinstance(fingerprint, str)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise invalid_argument([("page_token", "is not a token from a previous page")])
    if fingerprint != _fingerprint(filter_text):
        raise invalid_argument([("page_token", "was made for another filter; start again without it")])
    return int(before)

"""Capped counters on the real dev database: exact under racing callers, sliding, and honest
about when a unit frees up."""

from __future__ import annotations

import asyncio

from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.counters import CappedCounter, Full, Reservation
from services.core.mongo import Document


async def test_racing_reservations_take_exactly_the_limit(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    # Three "replicas" (own caches), 150 callers, one key: 50 win.
    counters = [CappedCounter(database["caps"], clock, "c", 50, 3600) for _ in range(3)]
    results = await asyncio.gather(*(counters[n % 3].reserve("k") for n in range(150)))
    won = [r for r in results if isinstance(r, Reservation)]
    assert len(won) == 50 and sorted(r.count for r in won) == list(range(1, 51))
    assert all(isinstance(r, Full) and r.retry_after >= 1 for r in results if not isinstance(r, Reservation))
    # Another key has its own cap.
    assert isinstance(await counters[0].reserve("other"), Reservation)


async def test_given_back_units_are_reused(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    counter = CappedCounter(database["caps"], clock, "c", 2, 600)
    first = await counter.reserve("k")
    second = await counter.reserve("k")
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert isinstance(await counter.reserve("k"), Full)
    await counter.give_back(second)
    assert isinstance(await counter.reserve("k"), Reservation)


async def test_no_window_ever_holds_more_than_the_limit(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    counter = CappedCounter(database["caps"], clock, "c", 10, 3600)  # ten-minute parts
    taken: list[float] = []
    for _ in range(2000):  # one attempt every 30 s for ~17 hours
        if isinstance(await counter.reserve("k"), Reservation):
            taken.append(clock.now().timestamp())
        clock.advance(30)
    assert len(taken) >= 10 * 14  # it keeps admitting, about ten an hour ...
    for i, start in enumerate(taken):  # ... and never eleven within an hour
        assert sum(1 for t in taken[i:] if t < start + 3600) <= 10


async def test_full_says_when_the_oldest_part_leaves(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    counter = CappedCounter(database["caps"], clock, "c", 3, 600, buckets=6)  # 100 s parts
    clock.advance(-(clock.now().timestamp() % 100))  # at the start of a part
    for _ in range(3):
        assert isinstance(await counter.reserve("k"), Reservation)
        clock.advance(100)
    refused = await counter.reserve("k")
    assert isinstance(refused, Full)
    # The first unit's part stops counting once seven parts (this one and six before) are past it.
    assert refused.retry_after == 400
    clock.advance(399)
    assert isinstance(await counter.reserve("k"), Full)
    clock.advance(1)
    assert isinstance(await counter.reserve("k"), Reservation)


async def test_full_takes_nothing_and_agrees_with_reserve(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    writer = CappedCounter(database["caps"], clock, "c", 3, 600, buckets=6)  # 100 s parts
    reader = CappedCounter(database["caps"], clock, "c", 3, 600, buckets=6)  # another replica
    clock.advance(-(clock.now().timestamp() % 100))
    assert await reader.full("k") is None
    assert await database["caps"].count_documents({}) == 0  # asking wrote nothing
    for _ in range(2):  # two units in earlier parts, one in the current part
        assert isinstance(await writer.reserve("k"), Reservation)
        clock.advance(100)
    assert await reader.full("k") is None
    assert isinstance(await writer.reserve("k"), Reservation)
    said = await reader.full("k")
    refused = await writer.reserve("k")
    assert isinstance(said, Full) and isinstance(refused, Full)
    assert said.retry_after == refused.retry_after == 500
    current = await database["caps"].find_one({"_id": f"c|k|{int(clock.now().timestamp() // 100)}"})
    assert current is not None and current["n"] == 1  # asking at the cap took nothing either

"""Per-owner feeds on the dev database: exact numbers under concurrency, heads found by probing
from a cold start, pages newest first, and nothing read but by `_id`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from services.core.feed import HINT_EVERY, Feed, entry_id
from services.core.mongo import Document

T0 = datetime(2026, 12, 1, tzinfo=UTC)


class Finds(monitoring.CommandListener):
    """The filter of every find command sent to one collection."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.filters: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == self.collection:
            self.filters.append(dict(event.command.get("filter", {})))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_concurrent_appends_from_two_replicas_take_every_number_once(database: AsyncDatabase[Document]) -> None:
    one, two = Feed(database["feed"]), Feed(database["feed"])
    await one.create_indexes()
    numbers = await asyncio.gather(
        *(feed.append("shop", f"r{i}", T0 + timedelta(seconds=i)) for i, feed in enumerate([one, two] * 25))
    )
    assert sorted(numbers) == list(range(1, 51))
    assert await one.head("shop") == 50 and await two.head("shop") == 50
    assert await one.head("other") == 0


async def test_a_cold_process_finds_the_head_and_pages_newest_first(
    mongo_uri: str, database: AsyncDatabase[Document]
) -> None:
    writer = Feed(database["feed"])
    for i in range(1, 2 * HINT_EVERY + 6):
        await writer.append("shop", f"r{i}", T0 + timedelta(seconds=i))
    listener = Finds("feed")
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_uri, event_listeners=[listener], tz_aware=True)
    try:
        reader = Feed(client[database.name]["feed"])
        assert await reader.head("shop") == 2 * HINT_EVERY + 5
        page = await reader.page("shop", 0, 4)
        assert [(e.number, e.record_id) for e in page] == [(37 - n, f"r{37 - n}") for n in range(4)]
        rest = await reader.page("shop", page[-1].number, 100)
        assert [e.number for e in rest] == list(range(33, 0, -1))
        # Every read was by _id: a key lookup on any server, whatever the collection's size.
        assert listener.filters and all(set(f) == {"_id"} for f in listener.filters), listener.filters
    finally:
        await client.close()


async def test_purged_entries_leave_the_head_and_numbering_intact(database: AsyncDatabase[Document]) -> None:
    feed = Feed(database["feed"])
    for i in range(1, 41):
        await feed.append("shop", f"r{i}", T0 + timedelta(seconds=i))
    assert await feed.purge(T0 + timedelta(seconds=35)) == 34  # 1..34 (hints stay)
    cold = Feed(database["feed"])
    assert await cold.head("shop") == 40
    assert await cold.append("shop", "r41", T0 + timedelta(seconds=41)) == 41
    assert [e.number for e in await cold.page("shop", 0, 100)] == [41, 40, 39, 38, 37, 36, 35]
    # Everything purged: numbering goes on from the last hint (numbers above it are free again,
    # since purging goes oldest first), and the new entry is the whole feed.
    await feed.purge(T0 + timedelta(days=1))
    again = Feed(database["feed"])
    number = await again.append("shop", "r42", T0 + timedelta(days=2))
    assert number == 2 * HINT_EVERY + 1
    assert await database["feed"].find_one({"_id": entry_id("shop", number)}) is not None
    assert [(e.number, e.record_id) for e in await Feed(database["feed"]).page("shop", 0, 100)] == [(number, "r42")]

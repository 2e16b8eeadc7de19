"""Group commit of inserts against the real dev database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from services.core.batching import InsertBatcher
from services.core.mongo import Document, ensure_index


class InsertCommands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            self.sizes.append(len(event.command.get("documents", [])))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def counted(mongo_uri: str) -> AsyncIterator[tuple[AsyncDatabase[Document], InsertCommands]]:
    listener = InsertCommands()
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_uri, event_listeners=[listener], tz_aware=True)
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield client[name], listener
    await client.drop_database(name)
    await client.close()


async def test_concurrent_callers_share_commands_and_each_learns_its_own_outcome(
    counted: tuple[AsyncDatabase[Document], InsertCommands],
) -> None:
    database, commands = counted
    items = database.items
    await ensure_index(items, [("code", 1)], unique=True)
    await items.insert_one({"_id": "taken", "code": "c-taken"})
    batcher = InsertBatcher(items)
    commands.sizes.clear()

    async def caller(n: int) -> list[bool]:
        docs = [{"_id": f"a{n}", "code": f"c{n}"}, {"_id": f"b{n}", "code": f"d{n}"}]
        if n % 5 == 0:
            docs.append({"_id": "taken"})  # duplicate _id
        if n % 7 == 0:
            docs.append({"_id": f"x{n}", "code": "c-taken"})  # duplicate of another unique index
        return await batcher.insert(docs)

    results = await asyncio.gather(*(caller(n) for n in range(1, 31)))

    for n, result in enumerate(results, start=1):
        expected = [True, True] + ([False] if n % 5 == 0 else []) + ([False] if n % 7 == 0 else [])
        assert result == expected, n
    stored = {doc["_id"] async for doc in items.find({})}
    assert stored == {"taken"} | {f"{p}{n}" for p in "ab" for n in range(1, 31)}
    # 30 callers, far fewer commands: the first leaves alone, the rest wait together.
    assert sum(commands.sizes) == sum(len(r) for r in results)
    assert commands.sizes[0] <= 4 and len(commands.sizes) < 10


async def test_an_idle_collection_sends_at_once_and_failures_reach_only_their_callers(
    counted: tuple[AsyncDatabase[Document], InsertCommands],
) -> None:
    database, commands = counted
    batcher = InsertBatcher(database.items)
    assert await batcher.insert_one({"_id": "one"}) is True
    assert await batcher.insert_one({"_id": "one"}) is False
    assert commands.sizes == [1, 1]
    assert await batcher.insert([]) == []

    # A document the server rejects for another reason fails its caller only, not the others
    # sent in the same command (the first insert leaves alone; the next two wait together).
    commands.sizes.clear()
    outcomes = await asyncio.gather(
        batcher.insert([{"_id": "lead"}]),
        batcher.insert([{"_id": "ok-1"}, {"_id": "bad", "$weird": 1}]),
        batcher.insert([{"_id": "ok-2"}]),
        return_exceptions=True,
    )
    assert commands.sizes == [1, 3]
    assert outcomes[0] == [True]
    assert isinstance(outcomes[1], OperationFailure)
    assert outcomes[2] == [True]
    assert await database.items.count_documents({"_id": {"$in": ["lead", "ok-2"]}}) == 2


async def test_callers_racing_for_one_unique_key_in_one_command_have_one_winner(
    counted: tuple[AsyncDatabase[Document], InsertCommands],
) -> None:
    # Two starts for one number, two claims of one request id: their documents can leave in
    # the same command, and the unique key must still pick exactly one of them.
    database, commands = counted
    items = database.items
    await ensure_index(items, [("pending", 1)], unique=True)
    batcher = InsertBatcher(items)
    for trial in range(20):
        commands.sizes.clear()
        won = await asyncio.gather(
            *(batcher.insert_one({"_id": f"t{trial}-{n}", "pending": f"p{trial}"}) for n in range(8)),
            *(batcher.insert_one({"_id": f"slot{trial}"}) for _ in range(8)),
        )
        assert won[:8].count(True) == 1 and won[8:].count(True) == 1, trial
        assert max(commands.sizes) > 2  # racers did share a command
        assert await items.count_documents({"pending": f"p{trial}"}) == 1


async def test_a_caller_cancelled_before_its_insert_leaves_stores_nothing(
    counted: tuple[AsyncDatabase[Document], InsertCommands],
) -> None:
    database, commands = counted
    batcher = InsertBatcher(database.items)
    first = asyncio.ensure_future(batcher.insert_one({"_id": "first"}))
    waiting = asyncio.ensure_future(batcher.insert_one({"_id": "cancelled"}))
    await asyncio.sleep(0)  # both queued; the first one's insert is on its way
    waiting.cancel()
    assert await first is True
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await batcher.insert_one({"_id": "after"}) is True
    assert {doc["_id"] async for doc in database.items.find({})} == {"first", "after"}
    assert sum(commands.sizes) == 2

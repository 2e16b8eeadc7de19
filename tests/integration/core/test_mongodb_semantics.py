"""MongoDB's guarantees that otpgate relies on, pinned against the server the tests use.

Runs against the dev database, or against `MONGODB_URI` when it is set: nothing here may rely on
a dev-database quirk. Every service's "exactly once" rests on these: a write to one document is
atomic, so of many concurrent conditional writes to one document exactly one wins; update
operators never lose an update; unique indexes refuse duplicates on insert and on update alike.

Races are real: each trial has many callers on separate connections at once, and there are
hundreds of trials, so a rare interleaving shows. The last tests pin what the dev database does
*not* do (TTL indexes, transactions), so a change in it is noticed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from services.core.mongo import Document, connect

TRIALS = 200  # trials per race
CALLERS = 16  # concurrent callers per trial, each on its own connection


@pytest.fixture(scope="module")
async def racers(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[Document]]:
    """A client whose pool has a connection for every caller, so the races happen at the server."""
    client = connect(mongo_uri, "conformance", max_pool_size=CALLERS * 4)
    yield client
    await client.close()


@pytest.fixture
async def db(racers: AsyncMongoClient[Document], database: AsyncDatabase[Document]) -> AsyncDatabase[Document]:
    # The test's own fresh database (dropped by the shared fixture), through the racing client.
    return racers[database.name]


async def warm(collection: AsyncCollection[Document]) -> None:
    """Open as many connections as there will be callers, so the first trial races too."""
    await asyncio.gather(*(collection.find_one({"_id": "warm-up"}) for _ in range(CALLERS)))


async def race(callers: int, call: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Start every caller at once; exceptions are returned as values."""
    start = asyncio.Event()

    async def one(i: int) -> Any:
        await start.wait()
        return await call(i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(callers)]
    await asyncio.sleep(0)  # let every task reach the start line
    start.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


def unexpected(results: list[Any]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException) and not isinstance(r, DuplicateKeyError)]


async def is_dev_database(db: AsyncDatabase[Document]) -> bool:
    info = await db.command("buildInfo")
    return "ferretdbVersion" in info


# Exactly one winner among conditional writes to one document ------------------------------------


async def test_conditional_find_one_and_update_has_exactly_one_winner(db: AsyncDatabase[Document]) -> None:
    claims = db["claims"]
    await warm(claims)
    for trial in range(TRIALS):
        doc_id = f"job-{trial}"
        await claims.insert_one({"_id": doc_id, "owner": None, "claims": 0})
        results = await race(
            CALLERS,
            lambda i, doc_id=doc_id: claims.find_one_and_update(
                {"_id": doc_id, "owner": None},
                {"$set": {"owner": f"caller-{i}"}, "$inc": {"claims": 1}},
                return_document=ReturnDocument.AFTER,
            ),
        )
        assert not unexpected(results)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, f"trial {trial}: {len(winners)} winners"
        stored = await claims.find_one({"_id": doc_id})
        assert stored == winners[0]
        assert stored is not None and stored["claims"] == 1


async def test_conditional_find_one_and_update_by_other_field_has_exactly_one_winner(
    db: AsyncDatabase[Document],
) -> None:
    # The filter does not name the _id: how leases and claims are found by state.
    leases = db["leases"]
    await warm(leases)
    for trial in range(TRIALS // 2):
        await leases.insert_one({"_id": f"bot-{trial}", "bot": trial, "holder": "", "epoch": 0})
        results = await race(
            CALLERS,
            lambda i, trial=trial: leases.find_one_and_update(
                {"bot": trial, "holder": ""}, {"$set": {"holder": f"replica-{i}"}, "$inc": {"epoch": 1}}
            ),
        )
        assert not unexpected(results)
        assert sum(r is not None for r in results) == 1, f"trial {trial}"
        stored = await leases.find_one({"bot": trial})
        assert stored is not None and stored["epoch"] == 1


async def test_conditional_update_one_is_modified_for_exactly_one_caller(db: AsyncDatabase[Document]) -> None:
    codes = db["codes"]
    await warm(codes)
    for trial in range(TRIALS):
        doc_id = f"code-{trial}"
        await codes.insert_one({"_id": doc_id, "status": "pending", "uses": 0})
        results = await race(
            CALLERS,
            lambda i, doc_id=doc_id: codes.update_one(
                {"_id": doc_id, "status": "pending"}, {"$set": {"status": "used", "by": i}, "$inc": {"uses": 1}}
            ),
        )
        assert not unexpected(results)
        assert [r.modified_count for r in results].count(1) == 1, f"trial {trial}"
        assert all(r.matched_count == r.modified_count for r in results)
        stored = await codes.find_one({"_id": doc_id})
        assert stored is not None and stored["uses"] == 1


async def test_conditional_delete_one_deletes_for_exactly_one_caller(db: AsyncDatabase[Document]) -> None:
    items = db["items"]
    await warm(items)
    for trial in range(TRIALS):
        await items.insert_one({"_id": f"item-{trial}", "trial": trial, "state": "open"})
        results = await race(
            CALLERS,
            lambda i, trial=trial: items.delete_one({"trial": trial, "state": "open"}),
        )
        assert not unexpected(results)
        assert [r.deleted_count for r in results].count(1) == 1, f"trial {trial}"
    assert await items.count_documents({}) == 0


async def test_delete_and_conditional_update_of_one_document_never_both_win(db: AsyncDatabase[Document]) -> None:
    # A delete with a condition and an update that breaks that condition: one of them goes first.
    docs = db["docs"]
    await warm(docs)
    for trial in range(TRIALS):
        doc_id = f"doc-{trial}"
        await docs.insert_one({"_id": doc_id, "state": "open"})
        deleted, updated = await race(
            2,
            lambda i, doc_id=doc_id: (
                docs.delete_one({"_id": doc_id, "state": "open"})
                if i == 0
                else docs.update_one({"_id": doc_id, "state": "open"}, {"$set": {"state": "closed"}})
            ),
        )
        stored = await docs.find_one({"_id": doc_id})
        if deleted.deleted_count == 1:
            assert updated.modified_count == 0 and stored is None, f"trial {trial}"
        else:
            assert updated.modified_count == 1 and stored == {"_id": doc_id, "state": "closed"}, f"trial {trial}"


# Update operators never lose an update -----------------------------------------------------------


async def test_concurrent_inc_loses_no_increment(db: AsyncDatabase[Document]) -> None:
    counters = db["counters"]
    await warm(counters)
    await counters.insert_one({"_id": "c", "n": 0})
    rounds, callers = 10, 50
    for _ in range(rounds):
        results = await race(callers, lambda i: counters.update_one({"_id": "c"}, {"$inc": {"n": 1}}))
        assert not unexpected(results)
    stored = await counters.find_one({"_id": "c"})
    assert stored is not None and stored["n"] == rounds * callers


async def test_conditional_inc_never_passes_its_cap(db: AsyncDatabase[Document]) -> None:
    # Reserve-then-decide: an increment conditioned on the count stays below a cap exactly.
    counters = db["counters"]
    await warm(counters)
    cap = 7
    for trial in range(TRIALS // 2):
        doc_id = f"window-{trial}"
        await counters.insert_one({"_id": doc_id, "n": 0})
        results = await race(
            CALLERS,
            lambda i, doc_id=doc_id: counters.find_one_and_update(
                {"_id": doc_id, "n": {"$lt": cap}}, {"$inc": {"n": 1}}, return_document=ReturnDocument.AFTER
            ),
        )
        assert not unexpected(results)
        granted = sorted(r["n"] for r in results if r is not None)
        assert granted == list(range(1, cap + 1)), f"trial {trial}: {granted}"
        stored = await counters.find_one({"_id": doc_id})
        assert stored is not None and stored["n"] == cap


async def test_concurrent_min_max_and_inc_in_one_update_lose_nothing(db: AsyncDatabase[Document]) -> None:
    stats = db["stats"]
    await warm(stats)
    for trial in range(TRIALS // 4):
        doc_id = f"prefix-{trial}"
        await stats.insert_one({"_id": doc_id, "n": 0, "low": 1000, "high": -1})
        values = [(trial * 7 + i * 13) % 101 for i in range(CALLERS)]
        results = await race(
            CALLERS,
            lambda i, doc_id=doc_id, values=values: stats.update_one(
                {"_id": doc_id}, {"$inc": {"n": 1}, "$min": {"low": values[i]}, "$max": {"high": values[i]}}
            ),
        )
        assert not unexpected(results)
        stored = await stats.find_one({"_id": doc_id})
        assert stored == {"_id": doc_id, "n": CALLERS, "low": min(values), "high": max(values)}, f"trial {trial}"


async def test_concurrent_push_keeps_every_element(db: AsyncDatabase[Document]) -> None:
    lists = db["lists"]
    await warm(lists)
    for trial in range(TRIALS // 4):
        doc_id = f"list-{trial}"
        await lists.insert_one({"_id": doc_id, "items": []})
        results = await race(
            CALLERS,
            lambda i, doc_id=doc_id: lists.update_one({"_id": doc_id}, {"$push": {"items": i}}),
        )
        assert not unexpected(results)
        stored = await lists.find_one({"_id": doc_id})
        assert stored is not None and sorted(stored["items"]) == list(range(CALLERS)), f"trial {trial}"


async def test_readers_never_see_half_an_update(db: AsyncDatabase[Document]) -> None:
    pairs = db["pairs"]
    await warm(pairs)
    await pairs.insert_one({"_id": "p", "a": 0, "b": 0})
    seen: list[Document] = []

    async def writer(n: int) -> None:
        for i in range(1, n + 1):
            await pairs.update_one({"_id": "p"}, {"$set": {"a": i, "b": i}})

    async def reader(until: asyncio.Task[None]) -> None:
        while not until.done():
            doc = await pairs.find_one({"_id": "p"})
            assert doc is not None
            seen.append(doc)

    writing = asyncio.ensure_future(writer(300))
    await asyncio.gather(writing, *(reader(writing) for _ in range(4)))
    assert seen and all(doc["a"] == doc["b"] for doc in seen)


# Upserts and unique indexes -------------------------------------------------------------------


async def test_upsert_race_on_a_unique_key_inserts_once(db: AsyncDatabase[Document]) -> None:
    # An upsert that finds nothing inserts; of concurrent upserts on one unique key, one inserts and
    # the others update it or are refused with a duplicate key (MongoDB may do either).
    pointers = db["pointers"]
    await pointers.create_index("key", unique=True)
    await warm(pointers)
    for trial in range(TRIALS // 2):
        key = f"key-{trial}"
        results = await race(
            CALLERS,
            lambda i, key=key: pointers.update_one(
                {"key": key}, {"$setOnInsert": {"first": i}, "$inc": {"writes": 1}}, upsert=True
            ),
        )
        assert not unexpected(results)
        done = [r for r in results if not isinstance(r, BaseException)]
        assert sum(r.upserted_id is not None for r in done) == 1, f"trial {trial}"
        assert await pointers.count_documents({"key": key}) == 1
        stored = await pointers.find_one({"key": key})
        assert stored is not None and stored["writes"] == len(done)


async def test_upsert_race_by_id_creates_one_document(db: AsyncDatabase[Document]) -> None:
    docs = db["by_id"]
    await warm(docs)
    for trial in range(TRIALS // 2):
        doc_id = f"id-{trial}"
        results = await race(
            CALLERS,
            lambda i, doc_id=doc_id: docs.find_one_and_update(
                {"_id": doc_id},
                {"$setOnInsert": {"first": i}, "$inc": {"writes": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            ),
        )
        assert not unexpected(results)
        done = [r for r in results if not isinstance(r, BaseException)]
        assert sorted(r["writes"] for r in done) == list(range(1, len(done) + 1)), f"trial {trial}"
        stored = await docs.find_one({"_id": doc_id})
        assert stored is not None and stored["writes"] == len(done)


async def test_unique_index_refuses_a_duplicate_on_insert(db: AsyncDatabase[Document]) -> None:
    keys = db["keys"]
    await keys.create_index("request", unique=True)
    await keys.insert_one({"_id": "a", "request": "r1"})
    with pytest.raises(DuplicateKeyError) as refused:
        await keys.insert_one({"_id": "b", "request": "r1"})
    assert refused.value.code == 11000
    with pytest.raises(DuplicateKeyError):
        await keys.insert_one({"_id": "a", "request": "r2"})
    assert await keys.count_documents({}) == 1


async def test_concurrent_inserts_of_one_unique_key_store_one(db: AsyncDatabase[Document]) -> None:
    keys = db["keys"]
    await keys.create_index("request", unique=True)
    await warm(keys)
    for trial in range(TRIALS // 2):
        results = await race(
            CALLERS,
            lambda i, trial=trial: keys.insert_one({"_id": f"{trial}-{i}", "request": f"r{trial}"}),
        )
        assert not unexpected(results)
        assert sum(not isinstance(r, BaseException) for r in results) == 1, f"trial {trial}"
        assert sum(isinstance(r, DuplicateKeyError) for r in results) == CALLERS - 1


async def test_unique_index_refuses_a_duplicate_on_update(db: AsyncDatabase[Document]) -> None:
    keys = db["keys"]
    await keys.create_index("request", unique=True)
    await keys.insert_many([{"_id": "a", "request": "r1"}, {"_id": "b", "request": "r2"}])
    with pytest.raises(DuplicateKeyError) as refused:
        await keys.update_one({"_id": "b"}, {"$set": {"request": "r1"}})
    assert refused.value.code == 11000
    with pytest.raises(DuplicateKeyError):
        await keys.find_one_and_update({"_id": "b"}, {"$set": {"request": "r1"}})
    with pytest.raises(DuplicateKeyError):
        await keys.replace_one({"_id": "b"}, {"request": "r1"})
    with pytest.raises(DuplicateKeyError):
        await keys.update_one({"request": "r9"}, {"$set": {"request": "r1"}}, upsert=True)
    # Nothing changed.
    assert await keys.find({}, sort=[("_id", ASCENDING)]).to_list() == [
        {"_id": "a", "request": "r1"},
        {"_id": "b", "request": "r2"},
    ]


async def test_compound_unique_index_counts_the_whole_key(db: AsyncDatabase[Document]) -> None:
    slots = db["slots"]
    await slots.create_index([("owner", ASCENDING), ("n", ASCENDING)], unique=True)
    await slots.insert_many([{"owner": "a", "n": 1}, {"owner": "b", "n": 1}, {"owner": "a", "n": 2}])
    with pytest.raises(DuplicateKeyError):
        await slots.insert_one({"owner": "a", "n": 1})


# What an update returns ---------------------------------------------------------------------------


async def test_return_document_before_and_after(db: AsyncDatabase[Document]) -> None:
    docs = db["docs"]
    await docs.insert_one({"_id": "d", "n": 1})
    before = await docs.find_one_and_update({"_id": "d"}, {"$inc": {"n": 1}}, return_document=ReturnDocument.BEFORE)
    after = await docs.find_one_and_update({"_id": "d"}, {"$inc": {"n": 1}}, return_document=ReturnDocument.AFTER)
    assert before == {"_id": "d", "n": 1}
    assert after == {"_id": "d", "n": 3}
    missing = await docs.find_one_and_update({"_id": "none"}, {"$inc": {"n": 1}})
    assert missing is None
    upserted_before = await docs.find_one_and_update(
        {"_id": "new"}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.BEFORE
    )
    assert upserted_before is None
    assert await docs.find_one({"_id": "new"}) == {"_id": "new", "n": 1}


async def test_find_one_and_update_takes_the_first_by_sort(db: AsyncDatabase[Document]) -> None:
    queue = db["queue"]
    await queue.insert_many([{"_id": f"m{i}", "due": (i * 7) % 10, "owner": None} for i in range(10)])
    first = await queue.find_one_and_update(
        {"owner": None}, {"$set": {"owner": "x"}}, sort=[("due", ASCENDING)], return_document=ReturnDocument.AFTER
    )
    assert first is not None and first["due"] == 0
    last = await queue.find_one_and_update({"owner": None}, {"$set": {"owner": "y"}}, sort=[("due", -1)])
    assert last is not None and last["due"] == 9


async def test_concurrent_sorted_claims_take_each_document_once(db: AsyncDatabase[Document]) -> None:
    # A work queue: every claimer takes the earliest free job; none is taken twice, none skipped.
    queue = db["queue"]
    await warm(queue)
    jobs = CALLERS * 8
    await queue.insert_many([{"_id": f"j{i:03d}", "due": i, "owner": None} for i in range(jobs)])

    async def claimer(i: int) -> list[int]:
        taken = []
        while (
            job := await queue.find_one_and_update(
                {"owner": None}, {"$set": {"owner": i}}, sort=[("due", ASCENDING)], return_document=ReturnDocument.AFTER
            )
        ) is not None:
            taken.append(job["due"])
        return taken

    results = await race(CALLERS, claimer)
    assert not unexpected(results)
    claimed = [due for taken in results for due in taken]
    assert sorted(claimed) == list(range(jobs))
    assert all(taken == sorted(taken) for taken in results)


async def test_update_many_updates_every_match_once(db: AsyncDatabase[Document]) -> None:
    docs = db["docs"]
    await warm(docs)
    await docs.insert_many([{"_id": f"d{i}", "group": i % 2, "n": 0} for i in range(40)])
    results = await race(CALLERS, lambda i: docs.update_many({"group": 0}, {"$inc": {"n": 1}}))
    assert not unexpected(results)
    assert all(r.modified_count == 20 for r in results)
    assert {d["n"] for d in await docs.find({"group": 0}).to_list()} == {CALLERS}
    assert {d["n"] for d in await docs.find({"group": 1}).to_list()} == {0}


# Aggregation: the subset the services use ($match, $group with $sum and $count, $sort, $limit) --


async def test_group_gives_every_accumulator_the_whole_group(db: AsyncDatabase[Document]) -> None:
    usage = db["usage"]
    await usage.insert_many(
        [
            {"c": "shop", "k": "a", "v": 2},
            {"c": "shop", "k": "a", "v": 3},
            {"c": "shop", "k": "b", "v": 5},
            {"c": "other", "k": "a", "v": 100},
        ]
    )
    pipeline: list[Document] = [
        {"$match": {"c": "shop"}},
        {"$group": {"_id": "$k", "n": {"$sum": 1}, "total": {"$sum": "$v"}, "rows": {"$count": {}}}},
        {"$sort": {"_id": ASCENDING}},
    ]
    rows = await (await usage.aggregate(pipeline)).to_list()
    assert rows == [{"_id": "a", "n": 2, "total": 5, "rows": 2}, {"_id": "b", "n": 1, "total": 5, "rows": 1}]
    top = await (await usage.aggregate([*pipeline[:2], {"$sort": {"total": -1, "_id": -1}}, {"$limit": 1}])).to_list()
    assert [row["_id"] for row in top] == ["b"]


# What the dev database does not do, asserted so a change is noticed ---------------------------


async def test_dev_database_has_no_ttl_indexes(db: AsyncDatabase[Document]) -> None:
    if os.environ.get("MONGODB_URI") or not await is_dev_database(db):
        pytest.skip("a property of the dev database")
    # services.core.mongo.ensure_index skips such an index and the services purge instead.
    with pytest.raises(OperationFailure) as refused:
        await db["expiring"].create_index("at", expireAfterSeconds=60)
    assert refused.value.code == 238  # NotImplemented


async def test_dev_database_has_no_transactions(
    db: AsyncDatabase[Document], racers: AsyncMongoClient[Document]
) -> None:
    if os.environ.get("MONGODB_URI") or not await is_dev_database(db):
        pytest.skip("a property of the dev database")
    # The services use no multi-document transactions (docs/decisions.md, the dev database).
    await db["t"].insert_one({"_id": "x"})
    with pytest.raises(PyMongoError):
        async with racers.start_session() as session, await session.start_transaction():
            await db["t"].insert_one({"_id": "y"}, session=session)
    assert await db["t"].find_one({"_id": "y"}) is None

"""The number -> record pointers on the real dev database: a hint that speeds lookups, never the truth."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from services.directory.store import SubscriberStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def subscriber(doc_id: str, user: int, index: str) -> Document:
    return {
        "_id": doc_id,
        "telegram_user_id": user,
        "phone": b"sealed",
        "phone_index": index,
        "phone_index_key": "k1",
        "region": "RU",
        "links": {},
        "linked_at": T0,
        "confirmed_at": None,
        "created_at": T0,
        "updated_at": T0,
    }


async def test_a_number_is_found_through_its_pointer_and_a_moved_number_is_not(
    database: AsyncDatabase[Document],
) -> None:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    holder = await store.insert(subscriber("a", 1, "ix-old"))
    assert await database["numbers"].find_one({"_id": "ix-old"}) == {"_id": "ix-old", "subscriber_id": "a"}
    found = await store.by_phone(["ix-old"])
    assert found is not None and found.id == "a"
    # The person shares another number: the old one leads nowhere, the new one to them.
    moved = await store.update_if_unchanged(holder, {"$set": {"phone_index": "ix-new"}})
    assert moved is not None
    assert await store.by_phone(["ix-old"]) is None
    assert await database["numbers"].find_one({"_id": "ix-old"}) is None
    again = await store.by_phone(["ix-new"])
    assert again is not None and again.id == "a"


async def test_a_stale_or_missing_pointer_still_finds_the_true_holder(database: AsyncDatabase[Document]) -> None:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    await store.insert(subscriber("a", 1, "ix-a"))
    await store.insert(subscriber("b", 2, "ix-b"))
    # A pointer left behind (e.g. by a crash between two writes) names the wrong record.
    await database["numbers"].replace_one({"_id": "ix-b"}, {"subscriber_id": "a"})
    found = await store.by_phone(["ix-b"])
    assert found is not None and found.id == "b"
    assert await database["numbers"].find_one({"_id": "ix-b"}) == {"_id": "ix-b", "subscriber_id": "b"}
    # No pointer at all (e.g. the index key was rotated): the unique index answers.
    await database["numbers"].delete_many({})
    found = await store.by_phone(["ix-other-key", "ix-a"])
    assert found is not None and found.id == "a"


async def test_many_readers_rewriting_one_missing_pointer_at_once_all_succeed(
    database: AsyncDatabase[Document],
) -> None:
    stores = [SubscriberStore(database), SubscriberStore(database)]
    await stores[0].ensure_indexes()
    await stores[0].insert(subscriber("a", 1, "ix-a"))
    await database["numbers"].delete_many({})
    found = await asyncio.gather(*(stores[i % 2].by_phone(["ix-a"]) for i in range(20)))
    assert all(record is not None and record.id == "a" for record in found)
    assert await database["numbers"].find_one({"_id": "ix-a"}) == {"_id": "ix-a", "subscriber_id": "a"}


async def test_forgetting_removes_the_pointers(database: AsyncDatabase[Document]) -> None:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    await store.insert(subscriber("a", 1, "ix-a"))
    await store.insert(subscriber("b", 2, "ix-b"))
    assert await store.delete_by_user(1) == 1
    assert await store.delete_by_phone(["ix-b"]) == 1
    assert await database["numbers"].count_documents({}) == 0

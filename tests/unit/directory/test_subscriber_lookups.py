"""Finding a number's holder on the real dev database: one query on the unique phone_index index,
under every key that may have made the index, and nothing left behind by a move or a deletion."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from services.directory.store import SubscriberStore, UniqueViolation

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


async def test_a_number_is_found_by_its_index_and_a_moved_number_is_not(database: AsyncDatabase[Document]) -> None:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    holder = await store.insert(subscriber("a", 1, "ix-old"))
    found = await store.by_phone(["ix-old"])
    assert found is not None and found.id == "a"
    # The person shares another number: the old one leads nowhere, the new one to them.
    moved = await store.update_if_unchanged(holder, {"$set": {"phone_index": "ix-new"}})
    assert moved is not None
    assert await store.by_phone(["ix-old"]) is None
    again = await store.by_phone(["ix-new"])
    assert again is not None and again.id == "a"
    # A record read before the move no longer matches: the conditional update changes nothing.
    assert await store.update_if_unchanged(holder, {"$set": {"region": "FR"}}) is None


async def test_a_number_indexed_under_an_older_key_is_found_and_a_number_is_held_once(
    database: AsyncDatabase[Document],
) -> None:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    await store.insert(subscriber("a", 1, "ix-a-k1"))
    found = await store.by_phone(["ix-a-k2", "ix-a-k1"])  # current key first, then the older one
    assert found is not None and found.id == "a"
    with pytest.raises(UniqueViolation):
        await store.insert(subscriber("b", 2, "ix-a-k1"))


async def test_concurrent_readers_all_find_the_holder(database: AsyncDatabase[Document]) -> None:
    stores = [SubscriberStore(database), SubscriberStore(database)]
    await stores[0].ensure_indexes()
    await stores[0].insert(subscriber("a", 1, "ix-a"))
    found = await asyncio.gather(*(stores[i % 2].by_phone(["ix-a"]) for i in range(20)))
    assert all(record is not None and record.id == "a" for record in found)


async def test_forgetting_by_person_or_by_number_removes_the_record(database: AsyncDatabase[Document]) -> None:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    await store.insert(subscriber("a", 1, "ix-a"))
    await store.insert(subscriber("b", 2, "ix-b"))
    assert await store.delete_by_user(1) == 1
    assert await store.delete_by_phone(["ix-b"]) == 1
    assert await store.by_phone(["ix-a"]) is None and await store.by_phone(["ix-b"]) is None
    assert await store.count() == 0


async def test_pointers_left_by_an_earlier_version_are_dropped(database: AsyncDatabase[Document]) -> None:
    await database["numbers"].insert_one({"_id": "ix-a", "subscriber_id": "gone"})
    await SubscriberStore(database).ensure_indexes()
    assert "numbers" not in await database.list_collection_names()

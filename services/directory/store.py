"""Subscriber records in MongoDB.

One document per person (Telegram user id) holding one number:

    {
      "_id": "<new_id>",
      "telegram_user_id": 123456789,                 # unique
      "phone": <sealed bytes>,                        # SealContext("subscribers", _id, "phone")
      "phone_index": "<hex HMAC-SHA256 of E.164>",    # unique; blind index
      "phone_index_key": "<key id of the index>",
      "region": "RU",
      "links": {"<bot_id>": {"status": "CONNECTED", "created_at": ..., "updated_at": ...}},
      "linked_at": ...,        # when this number was linked to this person
      "confirmed_at": ... | None,
      "created_at": ..., "updated_at": ...
    }

Bot links are a sub-document keyed by bot id: bounded by the number of bots, never by time.
Every change is one single-document atomic operation, conditioned on what was read.

A number's holder is found by its blind index on the unique `phone_index` index, a person's
record on the unique `telegram_user_id` index: one indexed query each, on MongoDB and on the
dev database alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.core.clock import as_utc
from services.core.mongo import Document, ensure_index
from services.directory.sealed import SUBSCRIBERS


@dataclass(frozen=True)
class BotLinkRecord:
    status: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SubscriberRecord:
    id: str
    telegram_user_id: int
    phone_sealed: bytes
    phone_index: str
    phone_index_key: str
    region: str
    links: dict[str, BotLinkRecord]
    linked_at: datetime
    confirmed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    raw: Document = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_doc(cls, doc: Document) -> SubscriberRecord:
        links: dict[str, BotLinkRecord] = {}
        for bot_id, link in (doc.get("links") or {}).items():
            links[str(bot_id)] = BotLinkRecord(
                status=str(link.get("status", "")),
                created_at=as_utc(link.get("created_at") or link["updated_at"]),
                updated_at=as_utc(link["updated_at"]),
            )
        confirmed = doc.get("confirmed_at")
        return cls(
            id=str(doc["_id"]),
            telegram_user_id=int(doc["telegram_user_id"]),
            phone_sealed=bytes(doc["phone"]),
            phone_index=str(doc["phone_index"]),
            phone_index_key=str(doc.get("phone_index_key", "")),
            region=str(doc.get("region", "")),
            links=links,
            linked_at=as_utc(doc.get("linked_at") or doc["created_at"]),
            confirmed_at=as_utc(confirmed) if confirmed else None,
            created_at=as_utc(doc["created_at"]),
            updated_at=as_utc(doc["updated_at"]),
            raw=doc,
        )


class UniqueViolation(Exception):
    """A write would have given a person or a number a second record."""


def link_path(bot_id: str) -> str:
    """The field path of one bot's link. Bot ids are validated (A-Z a-z 0-9 _), so safe as field names."""
    return f"links.{bot_id}"


class SubscriberStore:
    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = database[SUBSCRIBERS]
        self._database = database

    async def ensure_indexes(self) -> None:
        await ensure_index(self.collection, [("phone_index", 1)], name="phone_index_unique", unique=True)
        await ensure_index(self.collection, [("telegram_user_id", 1)], name="telegram_user_id_unique", unique=True)
        # Number -> record pointers of earlier versions; lookups use the unique index now.
        await self._database.drop_collection("numbers")

    # Reads ---------------------------------------------------------------------

    async def by_user(self, telegram_user_id: int) -> SubscriberRecord | None:
        doc = await self.collection.find_one({"telegram_user_id": telegram_user_id})
        return SubscriberRecord.from_doc(doc) if doc else None

    async def by_phone(self, indexes: Sequence[str]) -> SubscriberRecord | None:
        """The record holding a number, given its blind index under every key that may have made it.
        Two records match only in the transient clash of an index-key rotation, which
        `otpgate keys rotate` settles; either one is a valid answer meanwhile."""
        doc = await self.collection.find_one({"phone_index": {"$in": list(indexes)}})
        return SubscriberRecord.from_doc(doc) if doc else None

    async def count(self) -> int:
        return int(await self.collection.count_documents({}))

    # Writes --------------------------------------------------------------------

    async def insert(self, doc: Document) -> SubscriberRecord:
        """Raises UniqueViolation when the person or the number already has a record."""
        try:
            await self.collection.insert_one(doc)
        except DuplicateKeyError:
            raise UniqueViolation from None
        return SubscriberRecord.from_doc(doc)

    async def update_if_unchanged(self, record: SubscriberRecord, update: Document) -> SubscriberRecord | None:
        """Apply `update` only if the record still holds the number it held when read.
        None: it changed or vanished meanwhile. Raises UniqueViolation when the new phone_index is taken."""
        try:
            doc = await self.collection.find_one_and_update(
                {"_id": record.id, "phone_index": record.phone_index, "telegram_user_id": record.telegram_user_id},
                update,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            raise UniqueViolation from None
        return SubscriberRecord.from_doc(doc) if doc else None

    async def update_by_user(self, telegram_user_id: int, update: Document) -> SubscriberRecord | None:
        doc = await self.collection.find_one_and_update(
            {"telegram_user_id": telegram_user_id}, update, return_document=ReturnDocument.AFTER
        )
        return SubscriberRecord.from_doc(doc) if doc else None

    async def update_by_user_and_phone(
        self, telegram_user_id: int, indexes: Sequence[str], update: Document
    ) -> SubscriberRecord | None:
        doc = await self.collection.find_one_and_update(
            {"telegram_user_id": telegram_user_id, "phone_index": {"$in": list(indexes)}},
            update,
            return_document=ReturnDocument.AFTER,
        )
        return SubscriberRecord.from_doc(doc) if doc else None

    async def delete_if_unchanged(self, record: SubscriberRecord) -> bool:
        """Delete a record only if it still holds the number it held when read."""
        result = await self.collection.delete_one(
            {"_id": record.id, "phone_index": record.phone_index, "telegram_user_id": record.telegram_user_id}
        )
        return bool(result.deleted_count)

    async def delete_by_user(self, telegram_user_id: int) -> int:
        result = await self.collection.delete_many({"telegram_user_id": telegram_user_id})
        return int(result.deleted_count)

    async def delete_by_phone(self, indexes: Sequence[str]) -> int:
        result = await self.collection.delete_many({"phone_index": {"$in": list(indexes)}})
        return int(result.deleted_count)

"""The outbox (messages), idempotency pointers, usage records and their indexes.

A message document (its shape: record.py) is written only by whoever holds its claim
(services/delivery/claims.py). Texts and phones are sealed; lookups by phone use a blind index;
the prefix is never stored in clear (the masked phone shows the last 4 digits, the prefix would
show the rest).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson.int64 import Int64
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.core import page_tokens
from services.core.batching import InsertBatcher
from services.core.clock import Clock, as_utc
from services.core.mongo import Document, ensure_index
from services.delivery.record import (
    DELIVERED,
    EXPIRED,
    GATEWAY,
    HELD,
    OPEN_STATUSES,
    QUEUED,
    SENT,
    SMS,
    MessageChanges,
    MessageRecord,
)
from services.delivery.wakeup import Wakeup


def encode_page_token(created_at: datetime, message_id: str) -> str:
    return page_tokens.encode(json.dumps([as_utc(created_at).isoformat(), message_id]))


def decode_page_token(token: str) -> tuple[datetime, str]:
    created, message_id = json.loads(page_tokens.decode(token))
    return datetime.fromisoformat(created), str(message_id)


class RequestInProgress(Exception):
    """Another request with the same idempotency key is still being accepted."""


class Store:
    def __init__(self, database: AsyncDatabase[Document], clock: Clock, wakeup: Wakeup | None = None) -> None:
        self.db = database
        self.wakeup = wakeup or Wakeup(clock)
        self.messages = database["messages"]
        self.usage = database["usage"]
        # client_id + request_id -> message id, keyed by _id: repeats are found without scanning the outbox.
        self.idempotency = database["idempotency"]
        self.clock = clock
        # Every accepted message inserts into these three: concurrent requests share the commands.
        self._new_messages = InsertBatcher(self.messages)
        self._new_usage = InsertBatcher(self.usage)
        self._new_idem = InsertBatcher(self.idempotency)

    async def create_indexes(self) -> None:
        m = self.messages
        await ensure_index(m, [("idem", 1)], unique=True)
        await ensure_index(m, [("client_id", 1), ("created_at", -1), ("_id", -1)])
        await ensure_index(m, [("status", 1), ("next_attempt_at", 1)])
        await ensure_index(m, [("status", 1), ("expire_at", 1)])
        await ensure_index(m, [("phone_index", 1), ("status", 1)])
        await ensure_index(m, [("sms_poll_at", 1)])
        await ensure_index(m, [("provider_id", 1)])  # pushed delivery reports (SMPP receipts)
        await ensure_index(m, [("purge_at", 1)])
        await ensure_index(m, [("fallback_at", 1)])  # Gateway codes to revoke so they may climb
        await ensure_index(m, [("revoked_request_id", 1)])  # reports of a revoked Gateway request
        await ensure_index(self.usage, [("c", 1), ("d", 1)])
        await ensure_index(self.usage, [("d", 1)])  # the purge

    async def insert(self, record: MessageRecord) -> MessageRecord | None:
        """Insert a new message; on an idempotency key already used, return the existing one."""
        if await self._new_messages.insert_one(record.to_doc()):
            return None
        existing = await self.messages.find_one({"idem": record.idem})
        if existing is None:
            raise DuplicateKeyError(f"message {record.id} exists already")
        return MessageRecord.from_doc(existing)

    async def get(self, message_id: str) -> MessageRecord | None:
        return _record(await self.messages.find_one({"_id": message_id}))

    async def reserve_idem(self, idem: str, message_id: str, stale_after: float) -> MessageRecord | None:
        """Take an idempotency key for a new message with one insert: None when taken for it, else
        the message already stored under the key. Raises RequestInProgress while the request that
        took the key has not stored its message yet; a key held longer than `stale_after` seconds
        without a message (its process died) is taken over."""
        now = self.clock.now()
        for _ in range(3):
            if await self._new_idem.insert_one({"_id": idem, "message_id": message_id, "created_at": now}):
                return None
            pointer = await self.idempotency.find_one({"_id": idem})
            if pointer is None:
                continue  # given back meanwhile
            existing = await self.get(str(pointer["message_id"]))
            if existing is not None:
                return existing
            if (now - as_utc(pointer["created_at"])).total_seconds() < stale_after:
                raise RequestInProgress
            await self.release_idem(idem, str(pointer["message_id"]))
        raise RequestInProgress

    async def release_idem(self, idem: str, message_id: str) -> None:
        """Give a key back, unless another message holds it by now."""
        await self.idempotency.delete_one({"_id": idem, "message_id": message_id})

    async def get_for_client(self, client_id: str, message_id: str) -> MessageRecord | None:
        return _record(await self.messages.find_one({"_id": message_id, "client_id": client_id}))

    async def sent_by_provider_id(self, provider_id: str) -> MessageRecord | None:
        """The SENT message an SMS provider knows by `provider_id` (a provider's pushed report)."""
        return _record(await self.messages.find_one({"provider_id": provider_id, "status": SENT}))

    async def gateway_message(self, request_id: str) -> MessageRecord | None:
        """The message the Telegram Gateway knows by `request_id` (its reports name only that): the
        one it went out as, or the one whose code was revoked there and climbed to another rung."""
        query = {"$or": [{"provider_id": request_id, "channel": GATEWAY}, {"revoked_request_id": request_id}]}
        return _record(await self.messages.find_one(query))

    async def write(self, message_id: str, changes: MessageChanges) -> None:
        """Write under the message's claim (see claims.py)."""
        await self.messages.update_one({"_id": message_id}, {"$set": changes})
        for moment in (changes.get("next_attempt_at"), changes.get("sms_poll_at"), changes.get("fallback_at")):
            if moment is not None:
                self.wakeup.at(moment)

    async def list_for_client(
        self,
        client_id: str,
        page_size: int,
        after: tuple[datetime, str] | None,
        status: int,
        created_after: datetime | None,
        created_before: datetime | None,
    ) -> list[MessageRecord]:
        query: dict[str, Any] = {"client_id": client_id}
        created: dict[str, Any] = {}
        if created_after is not None:
            created["$gte"] = created_after
        if created_before is not None:
            created["$lt"] = created_before
        if after is not None:
            at, last_id = after
            query["$or"] = [{"created_at": {"$lt": at}}, {"created_at": at, "_id": {"$lt": last_id}}]
        if created:
            query["created_at"] = created
        if status:
            now = self.clock.now()
            if status == EXPIRED:
                query["$and"] = [
                    {"$or": [{"status": EXPIRED}, {"status": {"$in": list(OPEN_STATUSES)}, "expire_at": {"$lte": now}}]}
                ]
            elif status in OPEN_STATUSES:
                query["status"] = status
                query["expire_at"] = {"$gt": now}
            else:
                query["status"] = status
        cursor = self.messages.find(query).sort([("created_at", -1), ("_id", -1)]).limit(page_size + 1)
        return [MessageRecord.from_doc(doc) async for doc in cursor]

    async def due(self, now: datetime, limit: int, skip: Collection[str] = ()) -> list[MessageRecord]:
        query = _skipping({"status": QUEUED, "next_attempt_at": {"$lte": now}, "lease_until": {"$lte": now}}, skip)
        cursor = self.messages.find(query).sort("next_attempt_at", 1).limit(limit)
        return [MessageRecord.from_doc(doc) async for doc in cursor]

    async def fallback_due(self, now: datetime, limit: int, skip: Collection[str] = ()) -> list[MessageRecord]:
        """SENT Gateway codes whose rung's fallback_after has passed (dispatch.py `_fall_back`)."""
        query = {"status": SENT, "fallback_at": {"$lte": now}, "lease_until": {"$lte": now}}
        return await self._find(_skipping(query, skip), limit)

    async def held_needing_confirmation(
        self, now: datetime, limit: int, skip: Collection[str] = ()
    ) -> list[MessageRecord]:
        query = {
            "status": HELD,
            "confirmation_started": False,
            "next_attempt_at": {"$lte": now},
            "lease_until": {"$lte": now},
        }
        return await self._find(_skipping(query, skip), limit)

    async def expired_open(self, now: datetime, limit: int) -> list[MessageRecord]:
        query = {"status": {"$in": list(OPEN_STATUSES)}, "expire_at": {"$lte": now}, "lease_until": {"$lte": now}}
        return await self._find(query, limit)

    async def held_for_phone(self, phone_indexes: list[str]) -> list[MessageRecord]:
        return await self._find({"phone_index": {"$in": phone_indexes}, "status": HELD}, 500)

    async def sms_to_poll(self, now: datetime, limit: int) -> list[MessageRecord]:
        # DELIVERED too: a Telegram Gateway code is polled until it is read (an SMS is not, then).
        query = {"status": {"$in": [SENT, DELIVERED]}, "sms_poll_at": {"$lte": now}, "lease_until": {"$lte": now}}
        return await self._find(query, limit)

    async def _find(self, query: Document, limit: int) -> list[MessageRecord]:
        return [MessageRecord.from_doc(doc) async for doc in self.messages.find(query).limit(limit)]

    async def purge_texts(self, now: datetime) -> int:
        result = await self.messages.update_many(
            {"purge_at": {"$lte": now}}, {"$set": {"text": None, "phone": None, "code": None, "purge_at": None}}
        )
        return int(result.modified_count)

    async def purge_messages(self, before: datetime) -> int:
        result = await self.messages.delete_many(
            {"created_at": {"$lt": before}, "status": {"$nin": list(OPEN_STATUSES)}}
        )
        # Pointers outlive nothing they point to; a pointer to a purged message reads as "not seen".
        await self.idempotency.delete_many({"created_at": {"$lt": before}})
        return int(result.deleted_count)

    # Usage: one record per counted message (unique id), summed on read. ---------------------

    async def count_usage(
        self,
        message_id: str,
        client_id: str,
        day: str,
        channel: int,
        billed: bool,
        parts: int = 1,
        cost_micros: int = 0,
    ) -> bool:
        """One record per message; `parts` is the SMS it went as (a long SMS is billed per part),
        `cost_micros` what it cost. False: counted already."""
        # A message counted already (a repeat of the status change) is refused by its _id.
        key = f"{day}|{channel}|{1 if billed else 0}" + (f"|{parts}" if parts != 1 else "")
        doc: Document = {"_id": message_id, "c": client_id, "d": day, "k": key}
        if cost_micros:
            doc["cost"] = Int64(cost_micros)
        return await self._new_usage.insert_one(doc)

    async def refund_usage(self, message_id: str) -> bool:
        """The provider gave the message's fee back (a Gateway code not delivered within its ttl)."""
        result = await self.usage.update_one({"_id": message_id, "r": {"$ne": 1}}, {"$set": {"cost": Int64(0), "r": 1}})
        return result.modified_count == 1

    async def purge_usage(self, oldest_day: str) -> int:
        """Usage records of days before `oldest_day` (YYYY-MM-DD, UTC)."""
        result = await self.usage.delete_many({"d": {"$lt": oldest_day}})
        return int(result.deleted_count)

    async def usage_between(self, client_id: str, start: str, end: str) -> list[UsageTotal]:
        """Totals by day and channel: the records are grouped by their combined key
        (day|channel|billed, and |parts when not 1) and counted; parts are multiplied here."""
        pipeline: list[Document] = [
            {"$match": {"c": client_id, "d": {"$gte": start, "$lte": end}}},
            {"$group": {"_id": "$k", "n": {"$sum": 1}, "cost": {"$sum": "$cost"}, "refunded": {"$sum": "$r"}}},
        ]
        totals: dict[tuple[str, int], UsageTotal] = {}
        async for row in await self.usage.aggregate(pipeline):
            day, channel, billed, *rest = str(row["_id"]).split("|")
            n, parts = int(row["n"]), int(rest[0]) if rest else 1
            entry = totals.setdefault((day, int(channel)), UsageTotal(day, int(channel)))
            entry.messages += n
            entry.cost_micros += int(row.get("cost") or 0)
            entry.refunded += int(row.get("refunded") or 0)
            if int(channel) == SMS:
                entry.sms_parts += n * parts
            if billed == "1":
                entry.billed_sms += n * parts
        return [totals[key] for key in sorted(totals)]


@dataclass
class UsageTotal:
    day: str
    channel: int
    messages: int = 0
    billed_sms: int = 0  # SMS parts billed to the client
    sms_parts: int = 0  # SMS parts sent, billed or not
    cost_micros: int = 0  # what they cost, refunds taken off
    refunded: int = 0  # Telegram Gateway messages refunded


def _record(doc: Document | None) -> MessageRecord | None:
    return MessageRecord.from_doc(doc) if doc is not None else None


def _skipping(query: Document, skip: Collection[str]) -> Document:
    """`query` without the messages in `skip` (candidates a dispatcher has already tried)."""
    return {**query, "_id": {"$nin": list(skip)}} if skip else query

"""MongoDB access of the verification service: collections, indexes, counters, request claims.

Collections (database owned by this service only):
- verifications: Verify API codes (one pending per client and phone through `pending_key`).
- confirmations: phone re-confirmations (one pending per phone through `pending_key`).
- verification_requests: request_id claims for StartVerification idempotency (AIP-155).
- code_slots: no longer written. Attempts and sends were documents of their own here before
  the records counted them (codes.py); pending records adopt theirs at start, and the rest
  leave with retention.
- failed_checks: failed code checks per number, a capped counter (services/core/counters.py):
  `_id = failed|<phone blind index>|<part of the hour>`, `n`, `at` (when the part stops counting).
- verification_feed: each client's verifications numbered newest first (services/core/feed.py),
  so ListVerifications pages by `_id` lookups instead of a sorted query on client_id.
- pending_pointers: pending_key -> id of the confirmation that held it when it was created, so
  a re-confirmation start finds the pending one by `_id`. A pointer is a hint: the record is read
  with the key as a condition, and a new record's insert, refused by the unique pending_key index,
  is what proves one is pending when no pointer says so. A Verify start needs none: it inserts
  first and, refused, finds the pending verification by that index.

`pending_key` carries a unique index. While a record is pending it holds the key that must be
unique among pending records; every final state sets it to the record's own id. This gives
"unique among pending" without partial indexes, which the dev database does not implement.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from services.core.batching import InsertBatcher
from services.core.clock import Clock, as_utc
from services.core.counters import CappedCounter
from services.core.feed import Feed
from services.core.mongo import Document, ensure_index, purge_before, put_by_id
from services.verification.sealed import CONFIRMATIONS, VERIFICATIONS

REQUESTS = "verification_requests"
SLOTS = "code_slots"
PENDING_POINTERS = "pending_pointers"
FAILED_CHECKS = "failed_checks"
FEED = "verification_feed"

# One blind index of the phone for both flows, so failed checks of a number add up across them.
PHONE_INDEX = "verification/phone"

PENDING = "PENDING"
APPROVED = "APPROVED"
CANCELED = "CANCELED"
EXPIRED = "EXPIRED"
MAX_ATTEMPTS_REACHED = "MAX_ATTEMPTS_REACHED"
FINAL_STATUSES = (APPROVED, CANCELED, EXPIRED, MAX_ATTEMPTS_REACHED)

REQUEST_CLAIM_DAYS = 1
# A claim without a result this old belongs to a request that died; a retry may take it over.
STALE_CLAIM = timedelta(seconds=60)


@dataclass
class Store:
    database: AsyncDatabase[Document]

    def __post_init__(self) -> None:
        self.feed = Feed(self.database[FEED])
        # Concurrent requests' claims go to the server together (services/core/batching.py).
        self.new_requests = InsertBatcher(self.requests)

    @property
    def verifications(self) -> AsyncCollection[Document]:
        return self.database[VERIFICATIONS]

    @property
    def confirmations(self) -> AsyncCollection[Document]:
        return self.database[CONFIRMATIONS]

    @property
    def requests(self) -> AsyncCollection[Document]:
        return self.database[REQUESTS]

    @property
    def slots(self) -> AsyncCollection[Document]:
        return self.database[SLOTS]

    @property
    def pending_pointers(self) -> AsyncCollection[Document]:
        return self.database[PENDING_POINTERS]

    @property
    def failed_checks(self) -> AsyncCollection[Document]:
        return self.database[FAILED_CHECKS]

    async def ensure_indexes(self) -> None:
        for coll in (self.verifications, self.confirmations):
            await ensure_index(coll, [("pending_key", 1)], name="pending_key_unique", unique=True)
            await ensure_index(coll, [("status", 1), ("expire_at", 1)], name="status_expire")
            await ensure_index(coll, [("final_at", 1)], name="final_at")
        await ensure_index(self.verifications, [("client_id", 1), ("created_at", -1)], name="client_created")
        await ensure_index(
            self.confirmations, [("telegram_user_id", 1), ("created_at", -1)], name="telegram_user_created"
        )
        await ensure_index(self.confirmations, [("followup_pending", 1)], name="followup_pending")
        await ensure_index(self.requests, [("created_at", 1)], name="created_at")
        await ensure_index(self.slots, [("at", 1)], name="at")
        await ensure_index(self.pending_pointers, [("at", 1)], name="at")
        await ensure_index(self.failed_checks, [("at", 1)], name="at")
        await self.feed.create_indexes()

    # Failed checks per phone -------------------------------------------------------------

    def failed_check_counter(self, clock: Clock, per_hour: int) -> CappedCounter:
        """Failed checks per number (key: its blind index) over a sliding hour, shared by the Verify
        API and re-confirmations."""
        return CappedCounter(self.failed_checks, clock, "failed", per_hour, 3600.0)

    # Request claims (StartVerification idempotency) ---------------------------------------

    @staticmethod
    def request_key(client_id: str, request_id: str) -> str:
        return f"{client_id}\x1f{request_id}"

    async def claim_request(
        self,
        client_id: str,
        request_id: str,
        fingerprint: str,
        now: datetime,
        planned_id: str,
        started: Callable[[str], Awaitable[bool]],
    ) -> Document | None:
        """Claim a request id for the verification it will create as `planned_id`. Returns None
        when claimed now, else the earlier claim. A claim is complete once it names its outcome
        (`verification_id`, written when that is another record) or once its planned record's
        first send went out (`started`); one neither after STALE_CLAIM lost its owner mid-request
        and is taken over."""
        key = self.request_key(client_id, request_id)
        claim = {
            "_id": key,
            "fingerprint": fingerprint,
            "verification_id": None,
            "planned_id": planned_id,
            "created_at": now,
        }
        if await self.new_requests.insert_one(claim):
            return None
        existing = await self.requests.find_one({"_id": key})
        if existing is None:  # released between the two calls: try once more
            return await self.claim_request(client_id, request_id, fingerprint, now, planned_id, started)
        stale = as_utc(existing["created_at"]) <= now - STALE_CLAIM
        if existing.get("verification_id") is None and stale and not await started(existing.get("planned_id") or ""):
            # Its owner died mid-request: take the request id over.
            taken = await self.requests.delete_one(
                {"_id": key, "verification_id": None, "created_at": existing["created_at"]}
            )
            if taken.deleted_count:
                return await self.claim_request(client_id, request_id, fingerprint, now, planned_id, started)
        return existing

    async def complete_request(self, client_id: str, request_id: str, verification_id: str) -> None:
        await self.requests.update_one(
            {"_id": self.request_key(client_id, request_id)}, {"$set": {"verification_id": verification_id}}
        )

    async def release_request(self, client_id: str, request_id: str) -> None:
        await self.requests.delete_one({"_id": self.request_key(client_id, request_id), "verification_id": None})

    # Generic record helpers --------------------------------------------------------------

    @staticmethod
    async def update(coll: AsyncCollection[Document], query: dict[str, Any], update: dict[str, Any]) -> Document | None:
        return await coll.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)

    async def latest_confirmation(self, telegram_user_id: int, status: str | None = None) -> Document | None:
        query: dict[str, Any] = {"telegram_user_id": telegram_user_id}
        if status:
            query["status"] = status
        return await self.confirmations.find_one(query, sort=[("created_at", DESCENDING)])

    # Pending records by key --------------------------------------------------------------

    async def pending_by_key(self, coll: AsyncCollection[Document], key: str, *, search: bool) -> Document | None:
        """The record holding `key` now, through its pointer; with `search`, also through the
        unique pending_key index when no pointer leads to it (the pointer is written again)."""
        pointer = await self.pending_pointers.find_one({"_id": key})
        if pointer is not None:
            doc = await coll.find_one({"_id": pointer["record_id"], "pending_key": key})
            if doc is not None:
                return doc
        if not search:
            return None
        doc = await self.holding(coll, key)
        if doc is not None:
            await self.point_pending(key, str(doc["_id"]), as_utc(doc["created_at"]))
        return doc

    @staticmethod
    async def holding(coll: AsyncCollection[Document], key: str) -> Document | None:
        """The record holding `key` now, found by the unique pending_key index."""
        return await coll.find_one({"pending_key": key})

    async def point_pending(self, key: str, record_id: str, at: datetime) -> None:
        await put_by_id(self.pending_pointers, key, {"record_id": record_id, "at": at})

    # Retention -----------------------------------------------------------------------------

    async def purge(self, now: datetime, retention: timedelta) -> int:
        cutoff = now - retention
        removed = 0
        for coll in (self.verifications, self.confirmations):
            removed += await purge_before(coll, "final_at", cutoff)
        removed += await purge_before(self.requests, "created_at", now - timedelta(days=REQUEST_CLAIM_DAYS))
        removed += await purge_before(self.slots, "at", cutoff - timedelta(days=1))
        removed += await purge_before(self.pending_pointers, "at", cutoff)
        removed += await purge_before(self.failed_checks, "at", now)
        removed += await self.feed.purge(cutoff - timedelta(days=1))
        return removed

"""Exclusive, leased claims on a document, for every replica, on any MongoDB-wire server.

A claim is the insert of `<kind>:<id>:<seq>` into the claims collection: the unique
`_id` lets exactly one caller win each sequence number. The winner holds the lease until
it releases the claim (marks it released) or `lease_until` passes (it crashed); then the
next caller takes `seq + 1`. Every state change of a message happens under a claim, so
two replicas never send the same message and no update is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock, as_utc
from services.core.mongo import Document, ensure_index


@dataclass(frozen=True)
class Claim:
    kind: str
    target: str
    seq: int
    owner: str
    lease_until: datetime
    # Held by creating the document itself (its lease_until and claim_seq), with no claim record.
    implicit: bool = False

    @property
    def claim_id(self) -> str:
        return f"{self.kind}:{self.target}:{self.seq}"


class Claims:
    def __init__(self, collection: AsyncCollection[Document], clock: Clock, owner: str, lease: float) -> None:
        self._coll = collection
        self._clock = clock
        self.owner = owner
        self.lease = lease

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("at", 1)])

    def implicit(self, kind: str, target: str) -> Claim:
        """The claim of whoever inserts a new document with `claim_seq` 1 and `lease_until` set to
        this claim's lease: others see the lease on the document and stay away (see acquire)."""
        until = self._clock.now() + timedelta(seconds=self.lease)
        return Claim(kind, target, 1, self.owner, until, implicit=True)

    async def acquire(
        self, kind: str, target: str, last_seq: int, *, lease_until: datetime | None = None, max_probe: int = 16
    ) -> Claim | None:
        """Claim `target`; `last_seq` and `lease_until` are what the document records. None: busy."""
        now = self._clock.now()
        if lease_until is not None and as_utc(lease_until) > now:
            return None
        until = now + timedelta(seconds=self.lease)
        seq = last_seq + 1
        for _ in range(max_probe):
            claim = Claim(kind, target, seq, self.owner, until)
            try:
                await self._coll.insert_one(
                    {"_id": claim.claim_id, "owner": self.owner, "lease_until": until, "released": False, "at": now}
                )
                return claim
            except DuplicateKeyError:
                held = await self._coll.find_one({"_id": claim.claim_id})
                if held is None:
                    continue  # purged in between: try the same number again
                if not held.get("released") and as_utc(held["lease_until"]) > now:
                    return None
                seq += 1
        return None

    async def release(self, claim: Claim) -> None:
        if claim.implicit:
            return
        await self._coll.update_one({"_id": claim.claim_id}, {"$set": {"released": True}})

    async def purge(self, before: datetime) -> int:
        result = await self._coll.delete_many({"at": {"$lt": before}, "released": True})
        stale = await self._coll.delete_many({"at": {"$lt": before - timedelta(days=1)}})
        return int(result.deleted_count) + int(stale.deleted_count)

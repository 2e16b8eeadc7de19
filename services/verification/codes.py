"""The code engine shared by phone re-confirmation and the Verify API.

A code comes from `secrets`, is stored as a keyed HMAC bound to the record id
(Keyring.code_hash) and checked in constant time (Keyring.code_matches). The code itself is
kept sealed only while it may be re-sent and erased at every final state. Expiry is decided
at read time with the injected clock; the sweeper only tidies up.

Every decision that must happen once is made by one atomic write that racing callers cannot
both win, with nothing read first:

- attempt slots `<coll>:<id>:attempt:<n>`, n = 1..max_attempts, inserted into `code_slots`
  (the unique `_id` decides): a check must take one first, so no more than max_attempts codes
  are ever compared, however many checks race;
- send slots `<coll>:<id>:send:<n>`, n = 2..max_sends, likewise: a re-send takes the next one,
  so two racing re-sends never both go out, and the cooldown is measured from the latest one.
  The first send is the record's own (its insert decides it): its slot `…:send:1` is written
  once it went out, holding what delivery answered;
- the final state: the first of APPROVED / EXPIRED / CANCELED / MAX_ATTEMPTS_REACHED to write
  it wins, with one find_one_and_update of the record conditioned on status PENDING (atomic on
  one document), which erases the sealed code in the same write.

So 100 concurrent correct checks approve exactly once, and a check that loses the race with
expiry (decided with the clock at the moment of the decision) cannot approve after it.

Failed checks also count per number, across records and clients (`check_capped`): a check of a
pending record first reserves one failure from the number's capped counter (core/counters.py)
and gives it back unless the code was wrong, so the cap holds however many checks race.

A check compared elsewhere (a code the Telegram Gateway made) that gets no verdict, because the
Gateway or delivery is away, gives its attempt slot back as well: the person keeps the attempt,
and the next check takes the lowest free slot.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection

from services.core.batching import InsertBatcher
from services.core.clock import Clock, as_utc
from services.core.counters import CappedCounter, Full
from services.core.crypto import Keyring, SealContext
from services.core.mongo import Document
from services.verification.store import (
    APPROVED,
    EXPIRED,
    FINAL_STATUSES,
    MAX_ATTEMPTS_REACHED,
    PENDING,
    Store,
)

MIN_CODE_LENGTH = 4
MAX_CODE_LENGTH = 10
DEFAULT_CODE_LENGTH = 6


def generate_code(length: int = DEFAULT_CODE_LENGTH) -> str:
    if not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        raise ValueError("code length must be 4 to 10")
    return str(secrets.randbelow(10**length)).zfill(length)


def normalize_typed_code(raw: str) -> str:
    """What a person types: spaces and dashes ignored."""
    return "".join(ch for ch in raw if ch not in " -\u00a0\t")


def is_code_shaped(code: str) -> bool:
    return MIN_CODE_LENGTH <= len(code) <= MAX_CODE_LENGTH and code.isascii() and code.isdigit()


def expire_at(record: Document) -> datetime:
    return as_utc(record["expire_at"])


@dataclass
class View:
    """A record with what lives beside it: attempts used, sends made, the latest send."""

    record: Document
    status: str  # effective status: the record's, but a lapsed PENDING reads EXPIRED
    attempts: int
    send_count: int
    last_send: Document | None
    # The lowest attempt slot not taken: attempts + 1, unless a check gave one back below that.
    first_free_attempt: int = 1

    @property
    def id(self) -> str:
        return str(self.record["_id"])

    @property
    def attempts_left(self) -> int:
        return max(0, int(self.record["max_attempts"]) - self.attempts)

    @property
    def pending(self) -> bool:
        return self.status == PENDING

    @property
    def last_send_at(self) -> datetime:
        return as_utc((self.last_send or self.record)["at" if self.last_send else "created_at"])

    @property
    def last_message_id(self) -> str:
        """Delivery's message that carried the latest send ("" before one went out)."""
        return str((self.last_send or {}).get("message_id") or "")


class CheckOutcome(enum.Enum):
    APPROVED = "approved"
    WRONG_CODE = "wrong_code"
    # No attempt left: the wrong code used the last one, or concurrent checks used them up.
    EXHAUSTED = "exhausted"
    EXPIRED = "expired"
    # The record is already final (approved by an earlier or concurrent check, canceled, ...).
    FINAL = "final"


@dataclass
class CheckResult:
    outcome: CheckOutcome
    view: View
    # This check used up one attempt with a wrong code (counts against the phone's failed checks).
    counted_failure: bool = False

    @property
    def record(self) -> Document:
        return self.view.record

    @property
    def attempts_left(self) -> int:
        return self.view.attempts_left


class SendRefusal(enum.Enum):
    TOO_SOON = "too_soon"
    MAX_SENDS = "max_sends"
    NOT_PENDING = "not_pending"


@dataclass
class SendReservation:
    view: View
    number: int = 0
    refusal: SendRefusal | None = None
    retry_after: float = 0.0


class CodeEngine:
    """State changes of one collection of code records."""

    def __init__(
        self,
        store: Store,
        collection: AsyncCollection[Document],
        keyring: Keyring,
        clock: Clock,
        *,
        final_unset: Sequence[str] = ("code", "phone"),
        approve_unset: Sequence[str] = ("code", "phone"),
        approve_set: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.collection = collection
        self._inserts = InsertBatcher(collection)
        self.keyring = keyring
        self.clock = clock
        self._final_unset = {name: "" for name in final_unset}
        self._approve_unset = {name: "" for name in approve_unset}
        self._approve_set = dict(approve_set or {})

    # Building ----------------------------------------------------------------------------

    def context(self, record_id: str, field: str) -> SealContext:
        return SealContext(self.collection.name, record_id, field)

    def code_fields(self, record_id: str, code: str) -> dict[str, Any]:
        """What a new record stores about its code: the keyed hash and the sealed code."""
        return {
            "code_hash": self.keyring.code_hash(record_id, code),
            "code": self.keyring.seal(code, self.context(record_id, "code")),
        }

    def seal_phone(self, record_id: str, e164: str) -> bytes:
        return self.keyring.seal(e164, self.context(record_id, "phone"))

    def open_code(self, record: Document) -> str:
        return self.keyring.open_str(record["code"], self.context(str(record["_id"]), "code"))

    def open_phone(self, record: Document) -> str:
        return self.keyring.open_str(record["phone"], self.context(str(record["_id"]), "phone"))

    def owner(self, record_id: str) -> str:
        return f"{self.collection.name}:{record_id}"

    def slot_id(self, record_id: str, kind: str, number: int) -> str:
        return f"{self.owner(record_id)}:{kind}:{number}"

    async def insert(self, record: Document) -> bool:
        """Insert a new pending record, whose first send it is; False if one is pending (the unique
        pending key refused it)."""
        return await self._inserts.insert_one(record)

    def _slot_fields(self, record_id: str, kind: str, number: int, at: datetime) -> Document:
        """What a slot holds besides its `_id` (slot_id) and what is recorded on it."""
        return {"owner": self.owner(record_id), "kind": kind, "n": number, "at": at}

    async def _take_slot(self, record_id: str, kind: str, number: int, now: datetime) -> bool:
        slot = {"_id": self.slot_id(record_id, kind, number), **self._slot_fields(record_id, kind, number, now)}
        return await self.store.new_slots.insert_one(slot)

    # Reading -----------------------------------------------------------------------------

    def is_lapsed(self, record: Document, now: datetime | None = None) -> bool:
        return expire_at(record) <= (now or self.clock.now())

    def slot_ids(self, record: Document) -> list[str]:
        """Every slot a record can ever have: its attempts and its sends."""
        record_id = str(record["_id"])
        attempts = range(1, int(record["max_attempts"]) + 1)
        sends = range(1, int(record["max_sends"]) + 1)
        return [
            *(self.slot_id(record_id, "attempt", n) for n in attempts),
            *(self.slot_id(record_id, "send", n) for n in sends),
        ]

    async def view(self, record: Document) -> View:
        return (await self.views([record]))[0]

    async def views(self, records: Sequence[Document]) -> list[View]:
        """Each record with its slots, read in one lookup by `_id` for all of them (a key lookup
        on every server; the slots are numbered from 1 and bounded by each record's own limits)."""
        wanted = {slot: index for index, record in enumerate(records) for slot in self.slot_ids(record)}
        found: list[list[Document]] = [[] for _ in records]
        if wanted:
            async for doc in self.store.slots.find({"_id": {"$in": list(wanted)}}):
                found[wanted[str(doc["_id"])]].append(doc)
        return [self._view(record, slots) for record, slots in zip(records, found, strict=True)]

    def _view(self, record: Document, slots: list[Document]) -> View:
        taken = {int(doc["n"]) for doc in slots if doc.get("kind") == "attempt"}
        attempts = len(taken)
        free = next(n for n in range(1, len(taken) + 2) if n not in taken)
        sends = [doc for doc in slots if doc.get("kind") == "send"]
        last_send = max(sends, key=lambda doc: int(doc["n"]), default=None)
        status = str(record["status"])
        if status == PENDING and self.is_lapsed(record):
            status = EXPIRED
        # The first send belongs to the record; its slot appears once it went out.
        return View(record, status, attempts, int(last_send["n"]) if last_send else 1, last_send, free)

    async def load(self, record_id: str, extra: dict[str, Any] | None = None) -> View | None:
        record = await self.collection.find_one({"_id": record_id, **(extra or {})})
        return None if record is None else await self.view(record)

    async def reload(self, view: View) -> View:
        return await self.load(view.id) or view

    def issued(self, record: Document, first_send: Document) -> View:
        """A record just inserted, with its first send: what a read would find, without reading."""
        return self._view(record, [first_send])

    # Final states ------------------------------------------------------------------------

    async def decide(self, record_id: str, status: str, before: View | None = None) -> tuple[bool, View | None]:
        """Try to move a pending record to a final status. (won, view after). Once per record:
        the write matches only while the record is PENDING. With `before` (the record's slots as
        the caller knows them), the winner's view is the record its write returned with those
        slots, not read again."""
        assert status in FINAL_STATUSES
        at = self.clock.now()
        update: dict[str, Any] = {
            "$set": {"status": status, "final_at": at, "updated_at": at, "pending_key": record_id},
        }
        unset = self._approve_unset if status == APPROVED else self._final_unset
        if status == APPROVED:
            update["$set"].update(self._approve_set)
        if unset:
            update["$unset"] = unset
        record = await self.store.update(self.collection, {"_id": record_id, "status": PENDING}, update)
        if record is None:
            return False, await self.load(record_id)
        if before is not None:
            return True, replace(before, record=record, status=status)
        return True, await self.view(record)

    async def settle_lapsed(self, view: View) -> View:
        """Write EXPIRED for a lapsed pending record (read-time expiry made durable)."""
        if view.record["status"] != PENDING or not self.is_lapsed(view.record):
            return view
        _, after = await self.decide(view.id, EXPIRED, view)
        return after or view

    # Checking ----------------------------------------------------------------------------

    async def check(
        self, view: View, code: str, matches: Callable[[str], Awaitable[bool]] | None = None
    ) -> CheckResult:
        """One check of a code. At most max_attempts comparisons ever happen per record. `matches`
        compares elsewhere (a code the Telegram Gateway made); else the stored keyed hash does."""
        if view.record["status"] != PENDING:
            return CheckResult(CheckOutcome.FINAL, view)
        if self.is_lapsed(view.record):
            return await self._expired(view)
        max_attempts = int(view.record["max_attempts"])
        number = view.first_free_attempt
        while number <= max_attempts and not await self._take_slot(view.id, "attempt", number, self.clock.now()):
            number += 1
        if number > max_attempts:
            after = await self.reload(view)
            if after.record["status"] == PENDING and not self.is_lapsed(after.record):
                return CheckResult(CheckOutcome.EXHAUSTED, after)
            return self._classify_final(after)
        if matches is None:
            right = self.keyring.code_matches(str(view.record["code_hash"]), view.id, code)
        else:
            try:
                right = await matches(code)
            except BaseException:
                # Nothing was compared (the Gateway did not answer): the attempt is given back.
                await self.store.slots.delete_one({"_id": self.slot_id(view.id, "attempt", number)})
                raise
        if right:
            if self.is_lapsed(view.record):  # the clock passed expiry while this check ran
                return await self._expired(view)
            taken = replace(view, attempts=max(view.attempts, number))
            won, decided = await self.decide(view.id, APPROVED, taken)
            if won:
                return CheckResult(CheckOutcome.APPROVED, decided or view)
            return self._classify_final(decided or view)
        if number >= max_attempts:
            _, decided = await self.decide(view.id, MAX_ATTEMPTS_REACHED, replace(view, attempts=number))
            final = decided or view
            outcome = CheckOutcome.EXHAUSTED if final.status == MAX_ATTEMPTS_REACHED else CheckOutcome.FINAL
            return CheckResult(outcome, final, counted_failure=True)
        after = await self.reload(view)
        after.attempts = max(after.attempts, number)
        return CheckResult(CheckOutcome.WRONG_CODE, after, counted_failure=True)

    async def check_capped(
        self,
        view: View,
        code: str,
        failures: CappedCounter,
        key: str,
        matches: Callable[[str], Awaitable[bool]] | None = None,
    ) -> CheckResult | Full:
        """A check whose wrong code counts against `key`'s cap of failed checks (Full: none left,
        nothing answered). Checks of a record no longer pending never count, so they take nothing;
        nor does a right code compared here, which only needs the cap not to be full (one read,
        where a unit taken and given back would be a read and two writes)."""
        if not view.pending:
            return await self.check(view, code, matches)
        if matches is None and self.keyring.code_matches(str(view.record["code_hash"]), view.id, code):
            full = await failures.full(key)
            return full if full is not None else await self.check(view, code)
        reserved = await failures.reserve(key)
        if isinstance(reserved, Full):
            return reserved
        try:
            result = await self.check(view, code, matches)
        except BaseException:
            await failures.give_back(reserved)
            raise
        if not result.counted_failure:
            await failures.give_back(reserved)
        return result

    async def _expired(self, view: View) -> CheckResult:
        after = await self.settle_lapsed(view)
        if after.status == EXPIRED:
            return CheckResult(CheckOutcome.EXPIRED, after)
        return self._classify_final(after)

    @staticmethod
    def _classify_final(view: View) -> CheckResult:
        if view.status == EXPIRED:
            return CheckResult(CheckOutcome.EXPIRED, view)
        if view.status == MAX_ATTEMPTS_REACHED:
            return CheckResult(CheckOutcome.EXHAUSTED, view)
        return CheckResult(CheckOutcome.FINAL, view)

    # Sending -----------------------------------------------------------------------------

    async def reserve_send(self, view: View, cooldown: float, now: datetime | None = None) -> SendReservation:
        """Take the next send of a pending record if its cooldown passed and sends are left."""
        now = now or self.clock.now()
        if not view.pending:
            return SendReservation(view, refusal=SendRefusal.NOT_PENDING)
        number = view.send_count + 1
        if number > int(view.record["max_sends"]):
            left = (expire_at(view.record) - now).total_seconds()
            return SendReservation(view, refusal=SendRefusal.MAX_SENDS, retry_after=max(left, 1.0))
        ready_at = view.last_send_at + timedelta(seconds=cooldown)
        if ready_at > now:
            wait = (ready_at - now).total_seconds()
            return SendReservation(view, refusal=SendRefusal.TOO_SOON, retry_after=max(wait, 1.0))
        if not await self._take_slot(view.id, "send", number, now):
            # A concurrent re-send took it this instant.
            return SendReservation(view, refusal=SendRefusal.TOO_SOON, retry_after=max(cooldown, 1.0))
        after = await self.reload(view)
        if after.send_count < number:
            after.send_count = number
        return SendReservation(after, number)

    async def discard_slots(self, record: Document) -> None:
        """Remove every slot of a record that is being discarded."""
        await self.store.slots.delete_many({"_id": {"$in": self.slot_ids(record)}})

    async def undo_send(self, record_id: str, number: int) -> None:
        """Give back a reserved send that was refused downstream (the earlier code stays valid)."""
        await self.store.slots.delete_one({"_id": self.slot_id(record_id, "send", number)})

    async def record_send(self, record: Document, number: int, fields: dict[str, Any]) -> Document:
        """What delivery answered for one send (message id, channel), kept on its slot: the slot
        a re-send reserved, or the first send's, written now (dated from the record). Returned."""
        record_id = str(record["_id"])
        slot = await self.store.slots.find_one_and_update(
            {"_id": self.slot_id(record_id, "send", number)},
            {"$set": fields, "$setOnInsert": self._slot_fields(record_id, "send", number, record["created_at"])},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert slot is not None  # an upsert returning the document after it always has one
        return slot

    # Housekeeping ------------------------------------------------------------------------

    async def sweep_lapsed(self, limit: int = 500) -> int:
        """Write EXPIRED (erasing sealed codes) for pending records past their expiry."""
        now = self.clock.now()
        done = 0
        cursor = self.collection.find({"status": PENDING, "expire_at": {"$lte": now}}, {"_id": 1}).limit(limit)
        async for doc in cursor:
            record_id = str(doc["_id"])
            await self.decide(record_id, EXPIRED)
            done += 1
        return done

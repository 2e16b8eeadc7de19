"""The code engine shared by phone re-confirmation and the Verify API.

A code comes from `secrets`, is stored as a keyed HMAC bound to the record id
(Keyring.code_hash) and checked in constant time (Keyring.code_matches). The code itself is
kept sealed only while it may be re-sent and erased at every final state. Expiry is decided
at read time with the injected clock; the sweeper only tidies up.

Every decision that must happen once is one conditional write of the record, which racing
callers cannot both win (single-document atomicity):

- attempts: a check takes one with `$inc` on the record's `attempts`, matched only while the
  record is PENDING and `attempts` is below max_attempts, so no more than max_attempts checks
  are ever answered however many race. A right code compared here takes its attempt and
  approves in that same write;
- sends: the record counts its sends (`sends`) and keeps the latest (`last_send`: its number,
  when it went out, what delivery answered). A re-send takes the next number with a write
  matched on the count it read, so two racing re-sends never both go out, and the cooldown is
  measured from the latest one. The first send is the record's own (its insert decides it);
- the final state: the first of APPROVED / EXPIRED / CANCELED / MAX_ATTEMPTS_REACHED to write
  it wins, with one find_one_and_update of the record conditioned on status PENDING, which
  erases the sealed code in the same write.

So 100 concurrent correct checks approve exactly once, and a check that loses the race with
expiry (decided with the clock at the moment of the decision) cannot approve after it.

Failed checks also count per number, across records and clients (`check_capped`): a check of a
pending record first reserves one failure from the number's capped counter (core/counters.py)
and gives it back unless the code was wrong, so the cap holds however many checks race.

A check compared elsewhere (a code the Telegram Gateway made) takes its attempt first and, when
it gets no verdict because the Gateway or delivery is away, gives it back: the person keeps
the attempt.

Records written before the counters lived on them kept attempts and sends as documents of
`code_slots`; `adopt_slots` folds those of pending records into their records once, at start.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

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
    """A record read as a state: attempts used, sends made, the latest send."""

    record: Document
    status: str  # effective status: the record's, but a lapsed PENDING reads EXPIRED
    attempts: int
    send_count: int
    last_send: Document  # n, at, and what delivery answered once the send went out

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
        return as_utc(self.last_send["at"])

    @property
    def last_message_id(self) -> str:
        """Delivery's message that carried the latest send ("" before one went out)."""
        return str(self.last_send.get("message_id") or "")


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

    async def insert(self, record: Document) -> bool:
        """Insert a new pending record, whose first send it is (its counters are added to it); False
        if one is pending (the unique pending key refused it)."""
        record.update(attempts=0, sends=1, last_send={"n": 1, "at": record["created_at"]})
        return await self._inserts.insert_one(record)

    # Reading -----------------------------------------------------------------------------

    def is_lapsed(self, record: Document, now: datetime | None = None) -> bool:
        return expire_at(record) <= (now or self.clock.now())

    def view(self, record: Document) -> View:
        status = str(record["status"])
        if status == PENDING and self.is_lapsed(record):
            status = EXPIRED
        last_send = record.get("last_send") or {"n": 1, "at": record["created_at"]}
        return View(record, status, int(record.get("attempts", 0)), int(record.get("sends", 1)), last_send)

    async def load(self, record_id: str, extra: dict[str, Any] | None = None) -> View | None:
        record = await self.collection.find_one({"_id": record_id, **(extra or {})})
        return None if record is None else self.view(record)

    async def reload(self, view: View) -> View:
        return await self.load(view.id) or view

    # Final states ------------------------------------------------------------------------

    async def decide(
        self, record_id: str, status: str, *, also: dict[str, Any] | None = None, take_attempt_below: int = 0
    ) -> tuple[bool, View | None]:
        """Try to move a pending record to a final status. (won, view after). Once per record:
        the write matches only while the record is PENDING. `also` narrows the match further;
        `take_attempt_below` takes an attempt in the same write, matched only while fewer than
        that many are taken."""
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
        match: dict[str, Any] = {"_id": record_id, "status": PENDING, **(also or {})}
        if take_attempt_below:
            match["attempts"] = {"$lt": take_attempt_below}
            update["$inc"] = {"attempts": 1}
        record = await self.store.update(self.collection, match, update)
        if record is None:
            return False, await self.load(record_id)
        return True, self.view(record)

    async def settle_lapsed(self, view: View) -> View:
        """Write EXPIRED for a lapsed pending record (read-time expiry made durable)."""
        if view.record["status"] != PENDING or not self.is_lapsed(view.record):
            return view
        _, after = await self.decide(view.id, EXPIRED)
        return after or view

    # Checking ----------------------------------------------------------------------------

    async def check(
        self, view: View, code: str, matches: Callable[[str], Awaitable[bool]] | None = None
    ) -> CheckResult:
        """One check of a code. At most max_attempts checks are ever answered per record. `matches`
        compares elsewhere (a code the Telegram Gateway made); else the stored keyed hash does."""
        if view.record["status"] != PENDING:
            return CheckResult(CheckOutcome.FINAL, view)
        if self.is_lapsed(view.record):
            return await self._expired(view)
        max_attempts = int(view.record["max_attempts"])
        if matches is None and self.keyring.code_matches(str(view.record["code_hash"]), view.id, code):
            # One write takes the attempt and approves, and only before expiry.
            unexpired = {"expire_at": {"$gt": self.clock.now()}}
            won, decided = await self.decide(view.id, APPROVED, also=unexpired, take_attempt_below=max_attempts)
            if won and decided is not None:
                return CheckResult(CheckOutcome.APPROVED, decided)
            return await self._lost(decided or view)
        taken = await self._take_attempt(view.id, max_attempts)
        if taken is None:
            return await self._lost(await self.reload(view))
        if matches is not None:
            try:
                right = await matches(code)
            except BaseException:
                # Nothing was compared (the Gateway did not answer): the attempt is given back.
                await self._give_back_attempt(view.id)
                raise
            if right:
                if self.is_lapsed(view.record):  # the clock passed expiry while this check ran
                    return await self._expired(taken)
                won, decided = await self.decide(view.id, APPROVED)
                if won and decided is not None:
                    return CheckResult(CheckOutcome.APPROVED, decided)
                return self._classify_final(decided or taken)
        if taken.attempts >= max_attempts:
            _, decided = await self.decide(view.id, MAX_ATTEMPTS_REACHED)
            final = decided or taken
            outcome = CheckOutcome.EXHAUSTED if final.status == MAX_ATTEMPTS_REACHED else CheckOutcome.FINAL
            return CheckResult(outcome, final, counted_failure=True)
        return CheckResult(CheckOutcome.WRONG_CODE, taken, counted_failure=True)

    async def _take_attempt(self, record_id: str, max_attempts: int) -> View | None:
        """The record after one more attempt was taken; None if it is no longer pending or has
        none left."""
        record = await self.store.update(
            self.collection,
            {"_id": record_id, "status": PENDING, "attempts": {"$lt": max_attempts}},
            {"$inc": {"attempts": 1}},
        )
        return None if record is None else self.view(record)

    async def _give_back_attempt(self, record_id: str) -> None:
        await self.collection.update_one(
            {"_id": record_id, "status": PENDING, "attempts": {"$gt": 0}}, {"$inc": {"attempts": -1}}
        )

    async def _lost(self, after: View) -> CheckResult:
        """What a check that could not take an attempt answers, from the record as it is now."""
        if after.pending:
            return CheckResult(CheckOutcome.EXHAUSTED, after)
        if after.record["status"] == PENDING:  # lapsed meanwhile
            return await self._expired(after)
        return self._classify_final(after)

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
        sent = {"n": number, "at": now}
        record = await self.store.update(
            self.collection,
            {"_id": view.id, "status": PENDING, "sends": view.send_count},
            {"$set": {"sends": number, "last_send": sent}},
        )
        if record is None:
            after = await self.reload(view)
            if not after.pending:
                return SendReservation(after, refusal=SendRefusal.NOT_PENDING)
            # A concurrent re-send took it this instant.
            return SendReservation(after, refusal=SendRefusal.TOO_SOON, retry_after=max(cooldown, 1.0))
        return SendReservation(self.view(record), number)

    async def undo_send(self, before: View, number: int) -> None:
        """Give back a reserved send that was refused downstream: the record's sends are again
        those of `before` (the earlier code stays valid)."""
        await self.collection.update_one(
            {"_id": before.id, "sends": number}, {"$set": {"sends": before.send_count, "last_send": before.last_send}}
        )

    async def record_send(self, view: View, fields: dict[str, Any]) -> View:
        """What delivery answered for the record's latest send (message id, channel), kept on it.
        The view with it, not read again."""
        number = view.send_count
        await self.collection.update_one(
            {"_id": view.id, "last_send.n": number}, {"$set": {f"last_send.{name}": v for name, v in fields.items()}}
        )
        last_send = {**view.last_send, **fields}
        return replace(view, record={**view.record, "last_send": last_send}, last_send=last_send)

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

    async def adopt_slots(self) -> int:
        """Pending records written while attempts and sends were documents of `code_slots`: their
        counters, from those documents, written once onto the record. How many were adopted."""
        adopted = 0
        async for record in self.collection.find({"status": PENDING, "attempts": {"$exists": False}}):
            owner = f"{self.collection.name}:{record['_id']}"
            ids = [f"{owner}:attempt:{n}" for n in range(1, int(record["max_attempts"]) + 1)]
            ids += [f"{owner}:send:{n}" for n in range(1, int(record["max_sends"]) + 1)]
            slots = [doc async for doc in self.store.slots.find({"_id": {"$in": ids}})]
            sends = [doc for doc in slots if doc.get("kind") == "send"]
            latest = max(sends, key=lambda doc: int(doc["n"]), default=None)
            last_send = (
                {"n": 1, "at": record["created_at"]}
                if latest is None
                else {name: value for name, value in latest.items() if name not in ("_id", "owner", "kind")}
            )
            counters = {
                "attempts": sum(1 for doc in slots if doc.get("kind") == "attempt"),
                "sends": int(last_send["n"]),
                "last_send": last_send,
            }
            result = await self.collection.update_one(
                {"_id": record["_id"], "attempts": {"$exists": False}}, {"$set": counters}
            )
            adopted += result.modified_count
        return adopted

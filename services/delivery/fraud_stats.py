"""The fraud guard's statistics: windowed counters in MongoDB, the same numbers for every replica.

Counters: one document per key and ten-minute bucket in `fraud_counters`,
`_id = <kind>|<key hash>|<bucket>`:

    a   numbers asked for with this key (one per case, see below), whatever was decided
    s   of those, numbers that were sent an SMS
    c   of those, numbers whose code was entered
    b   prefix keys only: requests per block of 32 last-four-digit values (b.<block>), for runs
        of near-sequential numbers; the digits are shifted by a keyed offset per prefix first,
        so distances survive and the digits do not
    exp when the document may be purged

Cases: a number's requests within twenty minutes of each other are one case, one document
`_id = case|<number hash>` beside the counters: the buckets it was counted in (`ids`), whether it
was sent an SMS and whether its code was entered. Only a case's first request is counted, so a
person asking again ("send me the code again", a CAPTCHA retried) adds nothing, while pumping,
which needs a new number for every SMS it is paid for, adds one per number. The first SMS of a
case counts `s` in its buckets, the first entered code `c`.

Keys are keyed hashes (blind index) of the prefix, range, IP address, network, session, device,
client and country, or country: nothing stored reads as a number or an address.

The request path costs one `_id $in` lookup (every key's last six buckets and the case) and one
unordered bulk of upserts; an SMS adds one update of its case, one bulk and its own document in
`fraud_sms` (`_id` = the message id, naming its case), and an entered code three updates by `_id`.
Nothing is counted with a query.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.core.clock import Clock, as_utc
from services.core.mongo import Document, ensure_index
from services.delivery.fraud_score import Counts, KeyStats, Kind

BUCKET = 600.0  # seconds
SETTLED = (2, 6)  # buckets b-2 .. b-5: every code has had ten minutes at least
CASE = timedelta(minutes=20)  # a number's requests this close together are one case
DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class LegKeys:
    """The counter keys of one request (hashed), its number's case and the suffix block."""

    keys: Mapping[Kind, str]
    case: str  # the number's hash
    suffix_block: int | None


@dataclass(frozen=True)
class Converted:
    """An SMS whose code was entered, counted now."""

    # The attacked range's CAPTCHA budget unit the SMS took, if any (fraud.py gives it back).
    budget: str | None


@dataclass(frozen=True)
class Reading:
    stats: dict[Kind, KeyStats]
    # This request continues an open case of its number (it was counted before).
    repeat: bool


class FraudStats:
    def __init__(self, counters: AsyncCollection[Document], sms: AsyncCollection[Document], clock: Clock) -> None:
        self._counters = counters
        self._sms = sms
        self._clock = clock

    async def create_indexes(self) -> None:
        await ensure_index(self._counters, [("exp", 1)])
        await ensure_index(self._sms, [("exp", 1)])

    def _bucket(self) -> tuple[int, float]:
        """The current bucket and how far into it we are (0..1)."""
        epoch = self._clock.now().timestamp()
        index = math.floor(epoch / BUCKET)
        return index, (epoch - index * BUCKET) / BUCKET

    async def read(self, leg: LegKeys) -> Reading:
        """Every key's recent (the last ten minutes, sliding) and settled counts, and whether the
        number has an open case, in one lookup."""
        index, elapsed = self._bucket()
        case_id = f"case|{leg.case}"
        ids = [f"{kind}|{key}|{index - back}" for kind, key in leg.keys.items() for back in range(SETTLED[1])]
        docs = {doc["_id"]: doc async for doc in self._counters.find({"_id": {"$in": [*ids, case_id]}})}
        stats: dict[Kind, KeyStats] = {}
        weight = 1.0 - elapsed
        for kind, key in leg.keys.items():
            current = docs.get(f"{kind}|{key}|{index}", {})
            previous = docs.get(f"{kind}|{key}|{index - 1}", {})
            older = [docs.get(f"{kind}|{key}|{index - back}", {}) for back in range(*SETTLED)]
            blocks: dict[int, float] = {}
            if kind == Kind.PREFIX:
                for doc, share in ((current, 1.0), (previous, weight)):
                    for block, count in (doc.get("b") or {}).items():
                        blocks[int(block)] = blocks.get(int(block), 0.0) + share * float(count)
            stats[kind] = KeyStats(
                recent=Counts(*(_n(current, f) + weight * _n(previous, f) for f in ("a", "s", "c"))),
                settled=Counts(*(sum(_n(d, f) for d in older) for f in ("a", "s", "c"))),
                blocks=blocks,
            )
        case = docs.get(case_id)
        open_case = case is not None and as_utc(case["at"]) > self._clock.now() - CASE and not case.get("entered")
        return Reading(stats, repeat=open_case)

    async def count_request(self, leg: LegKeys, repeat: bool) -> None:
        """A request reached the guard (counted whatever it decided): a new case is counted in
        every key's current bucket, a repeat only keeps its case open."""
        index, _ = self._bucket()
        now = self._clock.now()
        case: Document = {"_id": f"case|{leg.case}"}
        ops: list[UpdateOne] = []
        if repeat:
            ops.append(UpdateOne(case, {"$set": {"at": now, "exp": now + CASE * 2}}))
        else:
            ids = self._ids(leg.keys, index)
            expires = self._expires(index)
            for kind, doc_id in ids.items():
                inc = {"a": 1}
                if kind == Kind.PREFIX and leg.suffix_block is not None:
                    inc[f"b.{leg.suffix_block}"] = 1
                ops.append(UpdateOne({"_id": doc_id}, {"$inc": inc, "$setOnInsert": {"exp": expires}}, upsert=True))
            case_fields = {"ids": list(ids.values()), "at": now, "sms": False, "entered": False, "exp": now + CASE * 2}
            ops.append(UpdateOne(case, {"$set": case_fields}, upsert=True))
        await _bulk_upsert(self._counters, ops)

    async def count_sms(self, message_id: str, leg: LegKeys, converts: bool, budget: str | None = None) -> None:
        """An SMS went out: the case's first one counts `s` where the case was counted. With
        `converts` (a code someone is expected to type) the message is tied to its case (and the
        budget unit it took) until the code is entered or can no longer be."""
        case_id = f"case|{leg.case}"
        case = await self._counters.find_one_and_update(
            {"_id": case_id, "sms": False}, {"$set": {"sms": True}}, return_document=ReturnDocument.BEFORE
        )
        if case is not None:
            await self._counters.update_many({"_id": {"$in": list(case["ids"])}}, {"$inc": {"s": 1}})
        if converts:
            with contextlib.suppress(DuplicateKeyError):  # counted before (a retried dispatch): once is enough
                await self._sms.insert_one(
                    {
                        "_id": message_id,
                        "case": case_id,
                        "converted": False,
                        "budget": budget,
                        "exp": self._clock.now() + 2 * CASE,
                    }
                )

    async def convert(self, message_id: str) -> Converted | None:
        """The code an SMS carried was entered: its case's first entered code counts `c`, once.
        None when the SMS is unknown (not sent by SMS, or too long ago); counted before: no budget."""
        doc = await self._sms.find_one_and_update(
            {"_id": message_id, "converted": False},
            {"$set": {"converted": True}},
            return_document=ReturnDocument.BEFORE,
        )
        if doc is None:
            return Converted(None) if await self._sms.find_one({"_id": message_id}, {"_id": 1}) else None
        case = await self._counters.find_one_and_update(
            {"_id": doc["case"], "entered": False}, {"$set": {"entered": True}}, return_document=ReturnDocument.BEFORE
        )
        if case is not None:
            await self._counters.update_many({"_id": {"$in": list(case["ids"])}}, {"$inc": {"c": 1}})
        return Converted(doc.get("budget"))

    async def purge(self) -> int:
        now = self._clock.now()
        removed = 0
        for collection in (self._counters, self._sms):
            result = await collection.delete_many({"exp": {"$lt": now}})
            removed += int(result.deleted_count)
        return removed

    @staticmethod
    def _ids(keys: Mapping[Kind, str], index: int) -> dict[Kind, str]:
        return {kind: f"{kind}|{key}|{index}" for kind, key in keys.items()}

    def _expires(self, index: int) -> datetime:
        now = self._clock.now()
        end = (index + SETTLED[1] + 1) * BUCKET
        return datetime.fromtimestamp(end, tz=now.tzinfo) + timedelta(seconds=1)


async def _bulk_upsert(collection: AsyncCollection[Document], ops: list[UpdateOne]) -> None:
    """Unordered upserts; one that lost a race to create its document (E11000) is retried, and
    then finds the document the winner created."""
    pending = ops
    for _ in range(3):
        try:
            await collection.bulk_write(pending, ordered=False)
            return
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            pending = [pending[e["index"]] for e in errors]
    await collection.bulk_write(pending, ordered=False)


def _n(doc: Document, name: str) -> float:
    return float(doc.get(name, 0) or 0)

"""The dev database answers queries from its indexes without changing an answer.

FerretDB's handler applies the whole filter to whatever the SQLite backend returns, so the WHERE
clauses the backend pushes down (tools/devdb/patches.json: sqlite/pushdown.go) may let through
more documents than a filter matches, never fewer. The differential test holds the dev database
to that: the same random documents (every BSON type the services store, mixed within a field,
with the numbers and strings where conversions go wrong) and hundreds of random filters of the
shapes that are pushed down and of those that are not, run on a dev database with pushdown off
(which reads whole collections and filters in Go) and on the normal one, must give identical
answers to find (sorted, limited, skipped), count, distinct, update_many, find_one_and_update and
delete_many, and leave identical collections. MongoDB has no pushdown to switch off, so with
MONGODB_URI set only that part is skipped.

Sorted queries may walk an index instead of being sorted (sqlite/index_walk.go), when the values
at the sort's fields are of one kind each. A second differential test holds that to the same
standard: documents whose indexed fields hold one kind each (strings, dates, ObjectIDs, ints,
bools; with nulls, missing fields and many ties) next to fields of mixed kinds, one that turns
mixed halfway and one indexed only once it is mixed; sorted, skipped and limited finds and
find_one_and_update, in both directions of compound indexes, with equality prefixes, ranges and
page-token $or filters, must answer as with pushdown off. MongoDB leaves the order of ties open,
so where a sort does not end in _id the sort keys of the answer are compared, not the documents.

The other tests run on MongoDB too: a lookup by an indexed field reads about as many documents
as it matches (serverStatus metrics.queryExecutor.scannedObjects, documents examined), a sorted
page through an index reads about its own documents, and queries still match array elements
once an indexed field holds arrays (a multikey index).
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import Binary, Int64, ObjectId, Regex, Timestamp
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from services.core.devdb import DevDatabase
from services.core.mongo import Document, connect

# Values -------------------------------------------------------------------------------------------


def _date(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


OIDS = [ObjectId(f"65{n:022x}") for n in range(4)]
DATES = [
    _date(1969, 12, 31, 23, 59, 59, 999000),
    _date(1970, 1, 1),
    _date(2025, 6, 1, 12, 0, 0, 123000),
    _date(2025, 6, 1, 12, 0, 0, 124000),
    _date(2031, 1, 1),
]
STRINGS = [
    "",
    "a",
    "ab",
    "ab!",  # "!" sorts below the closing quote of JSON text
    "abc",
    "b",
    "B",
    "é",
    "😀",
    "<&>",  # Go's encoder writes these as \u003c\u0026\u003e
    'q"uote',
    "back\\slash",
    "nul\x00x",
    "line\u2028sep",
    "tab\t",
    "5",
    str(OIDS[0]),  # an ObjectID's hex, as a string
]
INTS = [0, 1, -1, 5, 7, 2**31 - 1, -(2**31)]
LONGS = [Int64(n) for n in (0, 5, 2**53, 2**53 + 1, 2**60, 2**62 + 1, -(2**63), 2**63 - 1)]
DOUBLES = [
    0.0,
    -0.0,
    5.0,
    5.5,
    0.1 + 0.2,
    0.3,
    4.999999999999999,
    5.000000000000001,
    -2.5,
    2.0**53,
    2.0**60,  # written by Go as 1152921504606847000
    2.0**63,
    1e20,
    1e21,
    1e300,
    -1e300,
    1.7976931348623157e308,
    5e-324,
    -1e-300,
    1.2345678901234568e-250,  # SQLite reads such numbers a few ulps off
    8.530285511201364e278,
]
NUMBERS: list[Any] = [*INTS, *LONGS, *DOUBLES]
OTHERS: list[Any] = [None, True, False, {"x": 1}, {"x": "a"}, Regex("^a"), Binary(b"\x00\x01"), Timestamp(5, 1)]
# Not nested: FerretDB refuses those.
ARRAYS: list[Any] = [["a", "b"], [5, 7.5], [], [None], [True, 5.5], ["abc"], [DATES[2]], [{"x": 1}]]

SORT_FIELDS = ["_id", "a", "b", "c", "d", "u", "p"]  # never arrays, whose sort order is FerretDB's own


# Values that collide across types and with the elements of ARRAYS, drawn half of the time, so
# that filters and documents meet where a wrong condition would show.
HOT: list[Any] = [
    "a",
    "abc",
    "ab!",
    5,
    Int64(5),
    5.0,
    5.5,
    7.5,
    True,
    DATES[2],
    Int64(2**60),
    2.0**60,
    Int64(2**53 + 1),
    2.0**53,
    1.2345678901234568e-250,
    8.530285511201364e278,
    OIDS[0],
    str(OIDS[0]),
]


def _value(rng: random.Random) -> Any:
    """Any value a document may hold at a field, arrays aside."""
    return _scalar(rng) if rng.random() < 0.8 else rng.choice(OTHERS)


def _scalar(rng: random.Random) -> Any:
    if rng.random() < 0.5:
        return rng.choice(HOT)
    return rng.choice(rng.choice([STRINGS, NUMBERS, NUMBERS, DATES, OIDS, [True, False]]))


def _bound(rng: random.Random) -> Any:
    value = _scalar(rng)
    return value if isinstance(value, (str, int, float, datetime)) and not isinstance(value, bool) else 5


# Documents and filters ------------------------------------------------------------------------------
#
# Indexed: a; (b, c desc); d; u unique; (p, q) unique; m, which holds arrays from the start; n,
# which gets them from updates. Not indexed: z (arrays too) and e (an embedded document).


# The first documents' u, where equality by JSON text could go wrong (pairwise unequal).
UNIQUE: list[Any] = [Int64(2**60), 2.0**53, 5.5, Int64(5), "a", OIDS[0], 1.2345678901234568e-250]


def _document(rng: random.Random, i: int) -> Document:
    doc: Document = {"_id": rng.choice([i, i, f"s{i:04d}", ObjectId(f"66{i:022x}")])}
    for field in ("a", "b", "c", "d", "n"):
        if rng.random() < 0.9:
            doc[field] = rng.choice(DATES) if field == "d" and rng.random() < 0.6 else _value(rng)
    doc["u"] = (
        UNIQUE[i] if i < len(UNIQUE) else rng.choice([f"u{i}", i + 1000, Int64(10**12 + i), ObjectId(f"67{i:022x}")])
    )
    doc["p"], doc["q"] = rng.choice(STRINGS[:6]), i
    doc["m"] = rng.choice(ARRAYS) if rng.random() < 0.3 else _value(rng)
    doc["z"] = rng.choice(ARRAYS) if rng.random() < 0.3 else _value(rng)
    doc["e"] = {"x": _value(rng)}
    return doc


FIELDS = ["_id", "a", "b", "c", "d", "u", "p", "q", "m", "m", "n", "n", "z"]  # the multikey ones twice


def _field_filter(rng: random.Random, field: str) -> Any:
    """A condition on one field: mostly shapes that are pushed down, also those that are not."""
    shape = rng.randrange(14)
    if shape <= 3:
        return _scalar(rng) if shape else _value(rng)
    if shape == 4:
        return {"$eq": _scalar(rng)}
    if shape in (5, 6):
        values = [_scalar(rng) for _ in range(rng.randint(1, 4))]
        if shape == 6:
            values.append(rng.choice([None, {"x": 1}, ["a", "b"], rng.choice(DOUBLES)]))
        return {"$in": values}
    if shape in (7, 8):
        ops = rng.sample(["$gt", "$gte", "$lt", "$lte"], rng.randint(1, 2))
        return {op: _bound(rng) for op in ops}
    if shape == 9:
        return {rng.choice(["$gt", "$lte"]): rng.choice([None, OIDS[1], True, [5], {"x": 1}])}
    if shape == 10:
        return rng.choice([{"x": 1}, ["a", "b"], [5, 7.5], Regex("^a"), None])
    if shape == 11:
        return {"$gte": _bound(rng), "$ne": _scalar(rng)}
    unsupported: list[Any] = [
        {"$ne": _scalar(rng)},
        {"$nin": [_scalar(rng), None]},
        {"$exists": rng.choice([True, False])},
        {"$not": {"$gt": rng.choice(NUMBERS)}},
        {"$size": 2},
        {"$all": [_scalar(rng)]},
        {"$elemMatch": {"$gt": rng.choice(NUMBERS)}},
    ]
    return rng.choice(unsupported)


def _filter(rng: random.Random, depth: int = 0) -> Document:
    kind = rng.randrange(10)
    if kind < 5 or depth > 1:
        fields = list(dict.fromkeys(rng.choices(FIELDS, k=rng.choice([1, 1, 1, 1, 2, 2, 3]))))
        return {field: _field_filter(rng, field) for field in fields}
    if kind < 7:
        return {"$and": [_filter(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == 7:
        return {rng.choice(["$or", "$nor"]): [_filter(rng, depth + 1) for _ in range(rng.randint(1, 2))]}
    if kind == 8:
        return {"e.x": _scalar(rng), rng.choice(FIELDS): _field_filter(rng, "")}
    return {**_filter(rng, depth + 1), "$and": [_filter(rng, depth + 1)]}


def _sort(rng: random.Random) -> list[tuple[str, int]]:
    first = rng.choice(SORT_FIELDS)
    order = [(first, rng.choice([ASCENDING, DESCENDING]))]
    return order if first == "_id" else [*order, ("_id", ASCENDING)]


# Running one operation on both servers ------------------------------------------------------------

RAW = CodecOptions(document_class=RawBSONDocument, tz_aware=True)


def _canonical(value: Any) -> Any:
    """A comparable form: raw BSON keeps every type (int, long and double stay apart)."""
    if isinstance(value, RawBSONDocument):
        return value.raw
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


async def _outcome(call: Callable[[AsyncCollection[RawBSONDocument]], Any], coll: AsyncCollection[Any]) -> Any:
    try:
        return ("ok", _canonical(await call(coll.with_options(codec_options=RAW))))
    except OperationFailure as error:
        return ("error", error.code)


def _brief(outcome: Any) -> str:
    """An outcome as a person reads it: documents by their _id."""

    def one(value: Any) -> Any:
        return bson.decode(value).get("_id", value) if isinstance(value, bytes) else value

    status, value = outcome
    return f"{status} {[one(v) for v in value] if isinstance(value, list) else one(value)!r}"


async def _contents(coll: AsyncCollection[Any]) -> list[bytes]:
    return sorted([doc.raw async for doc in coll.with_options(codec_options=RAW).find({})])


class Pair:
    """One collection on the reference server and one on the dev database under test."""

    def __init__(self, reference: AsyncCollection[Document], subject: AsyncCollection[Document]) -> None:
        self.reference, self.subject = reference, subject
        self.operations = 0

    async def same(self, what: str, call: Callable[[AsyncCollection[RawBSONDocument]], Any]) -> Any:
        expected = await _outcome(call, self.reference)
        got = await _outcome(call, self.subject)
        assert got == expected, f"{what}: the dev database answered {_brief(got)}, pushdown off {_brief(expected)}"
        self.operations += 1
        return got

    async def same_contents(self, what: str) -> None:
        got, expected = await _contents(self.subject), await _contents(self.reference)
        assert got == expected, f"after {what}: {_brief(('ok', got))} against {_brief(('ok', expected))}"

    async def both(self, call: Callable[[AsyncCollection[Document]], Any]) -> None:
        for coll in (self.reference, self.subject):
            await call(coll)


async def _rows(cursor: Any) -> list[Any]:
    return [doc async for doc in cursor]


async def _unordered(cursor: Any) -> list[bytes]:
    return sorted([doc.raw async for doc in cursor])


async def _distinct(coll: AsyncCollection[Any], flt: Document) -> list[str]:
    # Equal numbers of different types (5, 5.0) are one value; which of them is returned
    # depends on the order the documents are read in, on MongoDB too.
    def key(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"number {Fraction(value)}"
        return repr(bson.encode({"v": value}))

    return sorted(key(v) for v in await coll.distinct("a", flt))


async def _exercise(pair: Pair, rng: random.Random, filters: int) -> None:
    for index, keys, unique in [
        ("a", [("a", ASCENDING)], False),
        ("bc", [("b", ASCENDING), ("c", DESCENDING)], False),
        ("d", [("d", ASCENDING)], False),
        ("u", [("u", ASCENDING)], True),
        ("pq", [("p", ASCENDING), ("q", ASCENDING)], True),
        ("m", [("m", ASCENDING)], False),
    ]:
        await pair.both(
            lambda c, keys=keys, index=index, unique=unique: c.create_index(keys, name=index, unique=unique)
        )
    docs = [_document(rng, i) for i in range(150)]
    await pair.both(lambda c: c.insert_many(docs))
    # n gets its index after some documents store arrays there.
    await pair.both(lambda c: c.update_many({"q": {"$lt": 50}}, {"$set": {"n": ["a", 5]}}))
    await pair.both(lambda c: c.create_index([("n", ASCENDING)], name="n"))

    read = await _scanned(pair.reference.database), await _scanned(pair.subject.database)
    await _sweep(pair)
    # Pushdown did narrow there: the dev database read a fraction of what the reference read.
    without = await _scanned(pair.reference.database) - read[0]
    narrowed = await _scanned(pair.subject.database) - read[1]
    assert narrowed < without / 2, f"the sweep read {narrowed} documents with pushdown, {without} without"
    for step in range(filters):
        await _step(pair, rng, step)
    await pair.same_contents("the run")


async def _sweep(pair: Pair) -> None:
    """Fields of each kind of index (non-unique, second and descending in a compound one,
    unique, _id's) against every value of HOT, by equality and by each range operator; and n,
    indexed after arrays were stored there, by equality."""
    for field in ("a", "c", "u", "_id", "n"):
        for value in HOT:
            shapes: list[Any] = [value, {"$in": [value, "zz"]}]
            if field != "n" and not isinstance(value, (bool, ObjectId)):
                shapes += [{op: value} for op in ("$gt", "$gte", "$lt", "$lte")]
            for shape in shapes:
                await pair.same(f"sweep {field}: {shape!r}", lambda c, flt={field: shape}: _unordered(c.find(flt)))


async def _step(pair: Pair, rng: random.Random, step: int) -> None:
    """One random filter, through the operations that take one."""
    flt = _filter(rng)
    what = f"step {step}, filter {flt!r}"
    sort, limit, skip = _sort(rng), rng.choice([0, 1, 3, 20]), rng.choice([0, 0, 2])
    await pair.same(f"find {what}", lambda c: _unordered(c.find(flt)))
    await pair.same(f"sorted find {what}", lambda c: _rows(c.find(flt, sort=sort, limit=limit, skip=skip)))
    if step % 2 == 0:
        await pair.same(f"count {what}", lambda c: c.count_documents(flt))
    if step % 3 == 0:
        await pair.same(f"count command {what}", lambda c: c.database.command("count", c.name, query=flt))
        await pair.same(f"distinct {what}", lambda c: _distinct(c, flt))
    if step % 4 == 1:
        change: Document = {"$set": {"w": step}, "$inc": {"hits": 1}}
        if rng.random() < 0.3:  # indexed fields change too, and n gets more arrays
            field = rng.choice(["a", "b", "d", "n"])
            change["$set"][field] = rng.choice(ARRAYS) if field == "n" and rng.random() < 0.5 else _scalar(rng)
        await pair.same(f"update_many {what}", lambda c: _update_counts(c.update_many(flt, change)))
        await pair.same_contents(f"update_many {what}")
    if step % 4 == 2:
        returned = rng.choice([ReturnDocument.BEFORE, ReturnDocument.AFTER])
        await pair.same(
            f"find_one_and_update {what}",
            lambda c: c.find_one_and_update(flt, {"$set": {"claimed": step}}, sort=sort, return_document=returned),
        )
    if step % 25 == 24:
        extra = [_document(rng, 1000 + step * 10 + i) for i in range(5)]
        await pair.both(lambda c: c.insert_many(extra))
    if step % 40 == 39:
        await pair.same(f"delete_many {what}", lambda c: _deleted(c.delete_many(flt)))
        await pair.same_contents(f"delete_many {what}")


async def _update_counts(result: Any) -> tuple[int, int]:
    done = await result
    return done.matched_count, done.modified_count


async def _deleted(result: Any) -> int:
    return int((await result).deleted_count)


# Sorted reads ---------------------------------------------------------------------------------------
#
# A collection with string ids whose indexed fields mostly hold one kind each, so that sorted
# queries walk indexes: st (s, t desc, _id desc) as delivery lists messages, ti (t, i), o desc,
# ks (k, s); g holds dates until updates store strings there; x and f (doubles) are mixed from the
# start, and h gets its index once it is mixed.

WALKED: list[list[tuple[str, int]]] = [
    [("s", ASCENDING), ("t", DESCENDING), ("_id", DESCENDING)],
    [("t", ASCENDING), ("i", ASCENDING)],
    [("o", DESCENDING)],
    [("k", ASCENDING), ("s", ASCENDING)],
    [("g", ASCENDING), ("_id", ASCENDING)],
    [("x", ASCENDING), ("t", ASCENDING)],
    [("f", DESCENDING)],
]
KINDS: dict[str, list[Any]] = {
    "s": ["", "a", "ab", "ab!", "b", "B", "é", "😀", "<&>", 'q"uote', "nul\x00x", "5", str(OIDS[0])],
    "t": DATES,
    "o": [*OIDS, ObjectId("ff" * 12), ObjectId("00" * 12)],
    "i": [*INTS, *LONGS, Int64(7), 7],
    "k": [True, False],
    "g": DATES[1:4],
    "f": [0.5, 2.0**60, 1.2345678901234568e-250, 8.530285511201364e278, 5.0, -2.5],  # FerretDB refuses NaN
}


def _kind_value(rng: random.Random, field: str) -> Any:
    return rng.choice(KINDS[field]) if field in KINDS else _value(rng)


def _ordered_document(rng: random.Random, i: int) -> Document:
    doc: Document = {"_id": f"{rng.choice('abc')}{i:05d}"}
    for field in ("s", "t", "o", "i", "k", "g", "x", "f", "h"):
        roll = rng.random()
        if roll < 0.85:
            doc[field] = _kind_value(rng, field)
        elif roll < 0.93:
            doc[field] = None
    return doc


def _sort_key(value: Any) -> Any:
    """A sort key as MongoDB compares it: null and missing alike, numbers by value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", Fraction(value))
    return value


async def _sorted(coll: AsyncCollection[Any], flt: Document, sort: list[tuple[str, int]], limit: int, skip: int) -> Any:
    cursor = coll.find(flt, sort=sort, limit=limit, skip=skip)
    if "_id" in dict(sort):
        return await _rows(cursor)
    # Ties have no order: the sort keys in order, and the documents as a set when all are read.
    docs = [bson.decode(doc.raw) async for doc in cursor]
    keys = [[_sort_key(doc.get(field)) for field, _ in sort] for doc in docs]
    return keys, sorted(bson.encode(doc) for doc in docs) if not limit and not skip else len(docs)


def _sorted_query(rng: random.Random, docs: list[Document]) -> tuple[Document, list[tuple[str, int]]]:
    """A filter and a sort shaped to walk an index: an equality prefix of its keys, then keys to
    sort by in its directions or reversed; sometimes bent so that no index fits."""
    keys = rng.choice(WALKED)
    prefix = rng.randrange(len(keys))
    flt: Document = {}
    for field, _ in keys[:prefix]:
        flt[field] = rng.choice(docs).get(field, rng.choice(KINDS.get(field, ["a"])))
    rest = keys[prefix:]
    flip = rng.choice([1, 1, -1])
    sort = [(field, direction * flip) for field, direction in rest[: rng.randint(1, len(rest))]]
    bend = rng.randrange(10)
    if bend == 0 and len(sort) > 1:
        sort[-1] = (sort[-1][0], -sort[-1][1])  # directions that no walk gives
    elif bend == 1:
        sort.insert(0, (rng.choice(["s", "t", "i", "o", "k", "x", "h", "f"]), rng.choice([1, -1])))
        sort = list(dict(reversed(sort)).items())[::-1]
    if "_id" not in dict(sort) and rng.random() < 0.6:
        sort.append(("_id", rng.choice([1, -1])))
    first, direction = sort[0]
    shape = rng.randrange(6)
    after = rng.choice(docs)
    if shape == 0 and first in KINDS:
        flt[first] = {rng.choice(["$gt", "$gte", "$lt", "$lte"]): _kind_value(rng, first)}
    elif shape == 1 and len(sort) > 1 and first != "_id":
        # The next page after a document, as delivery's page tokens ask for it.
        second, op = sort[1][0], "$lt" if direction < 0 else "$gt"
        here = after.get(first)
        flt["$or"] = [{first: {op: here}}, {first: here, second: {op: after.get(second)}}]
    elif shape == 2:
        field = rng.choice(["s", "t", "i", "k", "x", "_id"])
        flt[field] = _field_filter(rng, field)
    elif shape == 3:
        flt["$or"] = [{first: _kind_value(rng, first)}, {first: {"$gte": _kind_value(rng, first)}, "k": True}]
    return flt, sort


async def _sorted_step(pair: Pair, rng: random.Random, docs: list[Document], step: int, read: list[int]) -> None:
    """One sorted find (and every fifth, with a total order, a find_one_and_update); adds the
    documents each server read to `read`."""
    flt, sort = _sorted_query(rng, docs)
    limit, skip = rng.choice([0, 1, 3, 21]), rng.choice([0, 0, 0, 2, 7])
    what = f"step {step}: find({flt!r}, sort={sort!r}, limit={limit}, skip={skip})"
    before = await _scanned(pair.reference.database), await _scanned(pair.subject.database)
    await pair.same(what, lambda c: _sorted(c, flt, sort, limit, skip))
    read[0] += await _scanned(pair.reference.database) - before[0]
    read[1] += await _scanned(pair.subject.database) - before[1]
    if step % 5 == 0 and "_id" in dict(sort):
        await pair.same(
            f"find_one_and_update {what}",
            lambda c: c.find_one_and_update(
                flt, {"$inc": {"claims": 1}}, sort=sort, return_document=ReturnDocument.AFTER
            ),
        )


async def _exercise_sorted(pair: Pair, rng: random.Random, queries: int) -> tuple[int, int]:
    """Returns the documents the reference and the dev database read for the sorted finds."""
    for number, keys in enumerate(WALKED):
        await pair.both(lambda c, keys=keys, number=number: c.create_index(keys, name=f"w{number}"))
    docs = [_ordered_document(rng, i) for i in range(300)]
    await pair.both(lambda c: c.insert_many(docs))
    await pair.both(lambda c: c.create_index([("h", ASCENDING)], name="h"))
    read = [0, 0]
    for step in range(queries):
        await _sorted_step(pair, rng, docs, step, read)
        if step == queries // 2:
            # g turns mixed: its index's order no longer holds.
            await pair.both(lambda c: c.update_many({"_id": {"$gte": "b"}}, {"$set": {"g": "late"}}))
        if step % 50 == 49:
            extra = [_ordered_document(rng, 1000 + step * 10 + i) for i in range(5)]
            await pair.both(lambda c, extra=extra: c.insert_many(extra))
            await pair.both(lambda c: c.update_many({"k": False}, {"$unset": {"t": ""}, "$set": {"s": None}}))
    await pair.same_contents("the sorted run")
    return read[0], read[1]


# The differential tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def without_pushdown() -> AsyncIterator[AsyncMongoClient[Document]]:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("compares the dev database with itself, pushdown off")
    with DevDatabase(flags=["-disable-pushdown"]) as devdb:
        client = connect(devdb.uri, "reference")
        yield client
        await client.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_pushdown_answers_as_without_it(
    seed: int, without_pushdown: AsyncMongoClient[Document], database: AsyncDatabase[Document]
) -> None:
    reference = without_pushdown[database.name]
    try:
        pair = Pair(reference.items, database.items)
        await _exercise(pair, random.Random(seed), filters=160)
        assert pair.operations > 1000
    finally:
        await without_pushdown.drop_database(database.name)


@pytest.mark.parametrize("seed", [1, 2])
async def test_sorted_reads_answer_as_without_pushdown(
    seed: int, without_pushdown: AsyncMongoClient[Document], database: AsyncDatabase[Document]
) -> None:
    reference = without_pushdown[database.name]
    try:
        pair = Pair(reference.ordered, database.ordered)
        without, walked = await _exercise_sorted(pair, random.Random(seed), queries=400)
        assert pair.operations > 450
        # Walks did happen: the dev database read a fraction of what the reference read.
        assert walked < without / 2, f"sorted finds read {walked} documents with pushdown, {without} without"
    finally:
        await without_pushdown.drop_database(database.name)


async def test_pushdown_off_really_reads_whole_collections(without_pushdown: AsyncMongoClient[Document]) -> None:
    # Otherwise the differential test would compare pushdown with itself.
    coll = without_pushdown.scans.items
    await coll.drop()
    await coll.create_index("k")
    await coll.insert_many([{"_id": i, "k": i} for i in range(50)])
    assert await _scanned_by(coll.database, lambda: coll.find({"_id": 7}).to_list()) == 50
    assert await _scanned_by(coll.database, lambda: coll.find({"k": 7}).to_list()) == 50


# The index is used ----------------------------------------------------------------------------------


async def _scanned(db: AsyncDatabase[Document]) -> int:
    status = await db.client.admin.command("serverStatus")
    return int(status["metrics"]["queryExecutor"]["scannedObjects"])


async def _scanned_by(db: AsyncDatabase[Document], query: Callable[[], Any]) -> int:
    before = await _scanned(db)
    await query()
    return await _scanned(db) - before


async def _plan(coll: AsyncCollection[Document], flt: Document) -> str:
    explained = await coll.database.command("explain", {"find": coll.name, "filter": flt})
    return " ".join(explained["queryPlanner"]["Plan"])


async def _is_dev_database(db: AsyncDatabase[Document]) -> bool:
    return "ferretdbVersion" in await db.command("buildInfo")


async def test_lookups_by_indexed_fields_read_only_their_matches(database: AsyncDatabase[Document]) -> None:
    """Among 10,000 documents, each query reads O(matches) documents, not the collection."""
    coll = database.messages
    await coll.create_index([("client", ASCENDING), ("at", DESCENDING)])
    await coll.create_index("status")
    await coll.create_index("key", unique=True)
    await coll.insert_many(
        [
            {"_id": f"m{i:05d}", "client": f"c{i % 100}", "at": i, "status": ["queued", "sent"][i % 2], "key": f"k{i}"}
            for i in range(10_000)
        ]
    )
    queries: list[tuple[Document, int, str]] = [
        ({"client": "c7"}, 100, "client_1_at_-1"),
        ({"client": "c7", "at": {"$gte": 9_000}}, 10, "client_1_at_-1"),
        ({"client": {"$in": ["c1", "c2"]}, "at": {"$lt": 1_000}}, 20, "client_1_at_-1"),
        ({"key": "k4321"}, 1, "key_1"),
        ({"key": {"$in": ["k1", "k2", "k3"]}, "status": "sent"}, 2, "key_1"),
        ({"$and": [{"status": "queued"}, {"client": "c8"}]}, 100, "_1"),
        # The page after (5007, "m05007"), newest first: $or narrows by at <= 5007.
        (
            {"client": "c7", "$or": [{"at": {"$lt": 5007}}, {"at": 5007, "_id": {"$lt": "m05007"}}]},
            50,
            "client_1_at_-1",
        ),
        (
            {"$or": [{"client": "c70", "at": {"$gte": 9_000}}, {"client": "c71", "at": {"$gte": 9_500}}]},
            15,
            "client_1_at_-1",
        ),
        ({"_id": {"$in": ["m00005", "m00006"]}}, 2, "_id_"),
    ]
    dev = await _is_dev_database(database)
    for flt, matches, index in queries:
        assert len([d async for d in coll.find(flt)]) == matches, flt
        scanned = await _scanned_by(database, lambda flt=flt: coll.find(flt).to_list())
        assert matches <= scanned <= 2 * matches + 10, f"{flt} read {scanned} documents for {matches}"
        if dev:
            plan = await _plan(coll, flt)
            assert "USING INDEX" in plan and index in plan, f"{flt}: {plan}"
    # A shape that is not pushed down still reads everything (so the counter counts).
    assert await _scanned_by(database, lambda: coll.find({"$nor": [{"client": "c7"}]}).to_list()) >= 10_000


async def _sort_plan(coll: AsyncCollection[Document], flt: Document, sort: Document) -> str:
    explained = await coll.database.command("explain", {"find": coll.name, "filter": flt, "sort": sort, "limit": 5})
    return " ".join(explained["queryPlanner"]["Plan"])


async def test_sorted_pages_read_only_their_documents(database: AsyncDatabase[Document]) -> None:
    """Among 10,000 documents, a sorted page reads about its own documents, first and deep pages
    alike, in both directions; once a sort field holds a second kind of value, the answer is
    still MongoDB's (on the dev database: the handler sorts again)."""
    coll = database.messages
    await coll.create_index([("client", ASCENDING), ("at", DESCENDING), ("_id", DESCENDING)])
    await coll.create_index([("status", ASCENDING), ("due", ASCENDING)])
    start = _date(2026, 1, 1)
    docs: list[Document] = [
        {
            "_id": f"m{i:05d}",
            "client": f"c{i % 10}",
            "at": datetime.fromtimestamp(start.timestamp() + i // 30, UTC),  # ties of 3 a client
            "status": ["queued", "sent", "sent", "sent"][i // 10 % 4],
            "due": datetime.fromtimestamp(start.timestamp() + (i * 7919) % 10_000, UTC),
        }
        for i in range(10_000)
    ]
    await coll.insert_many([dict(doc) for doc in docs])
    mine = sorted((d for d in docs if d["client"] == "c3"), key=lambda d: (d["at"], d["_id"]), reverse=True)
    newest = [d["_id"] for d in mine]
    after = mine[499]
    page_after = {"$or": [{"at": {"$lt": after["at"]}}, {"at": after["at"], "_id": {"$lt": after["_id"]}}]}
    order = [("at", DESCENDING), ("_id", DESCENDING)]
    since = [d["_id"] for d in reversed(mine) if d["at"] >= after["at"]]
    pages: list[tuple[Document, list[tuple[str, int]], list[str]]] = [
        ({"client": "c3"}, order, newest[:50]),
        ({"client": "c3", **page_after}, order, newest[500:550]),
        ({"client": "c3", "at": {"$gte": after["at"]}}, [("at", ASCENDING), ("_id", ASCENDING)], since[:50]),
        ({"client": "c3", "status": "queued"}, order, [d["_id"] for d in mine if d["status"] == "queued"][:50]),
    ]
    dev = await _is_dev_database(database)
    for flt, sort, expected in pages:
        assert [d["_id"] async for d in coll.find(flt).sort(sort).limit(50)] == expected, flt
        scanned = await _scanned_by(database, lambda flt=flt, sort=sort: coll.find(flt).sort(sort).limit(50).to_list())
        assert scanned <= 2 * 50 + 10, f"{flt} read {scanned} documents for a page of 50"
        if dev:
            plan = await _sort_plan(coll, flt, dict(sort))
            assert "client_1_at_-1__id_-1" in plan and "TEMP B-TREE" not in plan, f"{flt}: {plan}"

    due = {"status": "queued", "due": {"$lte": datetime.fromtimestamp(start.timestamp() + 5_000, UTC)}}
    first = await coll.find(due).sort("due", ASCENDING).limit(20).to_list()
    assert [d["due"] for d in first] == sorted(d["due"] for d in await coll.find(due).to_list())[:20]
    assert await _scanned_by(database, lambda: coll.find(due).sort("due", ASCENDING).limit(20).to_list()) <= 50

    # A string among the dates: MongoDB sorts strings before dates, SQLite's values after them.
    await coll.insert_one({"_id": "m99999", "client": "c3", "at": "yesterday", "status": "sent"})
    ascending = [
        d["_id"] async for d in coll.find({"client": "c3"}).sort([("at", ASCENDING), ("_id", ASCENDING)]).limit(3)
    ]
    assert ascending == ["m99999", *newest[::-1][:2]]
    descending = [d["_id"] async for d in coll.find({"client": "c3"}).sort(order)]
    assert descending == [*newest, "m99999"]


# Multikey indexes ------------------------------------------------------------------------------------


async def _ids(coll: AsyncCollection[Document], flt: Document) -> set[Any]:
    return {d["_id"] async for d in coll.find(flt)}


async def test_queries_match_array_elements_once_an_indexed_field_holds_arrays(
    database: AsyncDatabase[Document],
) -> None:
    coll = database.tags
    await coll.create_index("tag")
    await coll.create_index([("owner", ASCENDING), ("rank", ASCENDING)])
    await coll.insert_many([{"_id": i, "tag": f"t{i % 3}", "owner": "o", "rank": i} for i in range(9)])
    assert await _ids(coll, {"tag": "t1"}) == {1, 4, 7}

    await coll.insert_one({"_id": "inserted", "tag": ["t1", "t9"], "owner": "o", "rank": [100, 2]})
    await coll.update_one({"_id": 0}, {"$set": {"tag": ["t9", "t1"]}})
    await coll.update_one({"_id": 2}, {"$set": {"rank": [70, 1]}})

    assert await _ids(coll, {"tag": "t1"}) == {0, 1, 4, 7, "inserted"}
    assert await _ids(coll, {"tag": {"$in": ["t9"]}}) == {0, "inserted"}
    assert await _ids(coll, {"tag": {"$gt": "t8"}}) == {0, "inserted"}
    assert await _ids(coll, {"owner": "o", "rank": {"$gte": 70}}) == {2, "inserted"}
    assert await _ids(coll, {"owner": "o", "rank": 2}) == {"inserted"}
    assert await _ids(coll, {"rank": {"$lt": 2}}) == {0, 1, 2}

    # An index created on a field that already holds arrays is multikey from the start.
    await coll.create_index("rank")
    assert await _ids(coll, {"rank": 100}) == {"inserted"}
    # $push makes an array where there was none.
    await coll.update_one({"_id": 5}, {"$push": {"stack": "s1"}})
    await coll.create_index("stack")
    await coll.update_one({"_id": 6}, {"$push": {"stack": "s1"}})
    assert await _ids(coll, {"stack": "s1"}) == {5, 6}


async def test_multikey_flags_survive_a_restart_and_old_data_directories_get_them(tmp_path: Path) -> None:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("a property of the dev database's files")
    data = tmp_path / "data"

    async def answers() -> tuple[set[Any], set[Any], str, set[str], str]:
        with DevDatabase(data_dir=data) as devdb:
            client = connect(devdb.uri, "restart")
            things = client.db.things
            try:
                await things.insert_one({"_id": "probe"})  # as a service would: the database is live
                await things.delete_one({"_id": "probe"})
                names = {index["name"] async for index in await things.list_indexes()}
                return (
                    await _ids(things, {"color": "c1"}),
                    await _ids(things, {"size": 5}),
                    await _plan(things, {"size": 5}),
                    names,
                    await _sort_plan(things, {}, {"size": -1}),
                )
            finally:
                await client.close()

    with DevDatabase(data_dir=data) as devdb:
        client = connect(devdb.uri, "restart")
        things = client.db.things
        await things.create_index("color")
        await things.create_index("size")
        await things.insert_many([{"_id": i, "color": f"c{i % 4}", "size": i} for i in range(40)])
        await things.insert_one({"_id": "many", "color": ["c1", "c2"], "size": 41})
        await client.close()

    expected_colors = {i for i in range(40) if i % 4 == 1} | {"many"}
    colors, sizes, plan, names, sorted_plan = await answers()
    assert (colors, sizes, names) == (expected_colors, {5}, {"_id_", "color_1", "size_1"})
    assert "USING INDEX" in plan and "size_1" in plan
    assert "size_1" in sorted_plan and "TEMP B-TREE" not in sorted_plan

    # A data directory written before multikey flags and kinds existed, when non-unique indexes
    # were not built in SQLite: opening it computes them and builds the indexes.
    with sqlite3.connect(data / "db.sqlite") as files:
        ((settings,),) = files.execute("SELECT settings FROM _ferretdb_collections WHERE name = 'things'")
        assert '"multikey":true' in settings and '"multikey":false' in settings
        assert '"kinds":{"size":"int"}' in settings and '"kinds":{"color":"mixed"}' in settings
        old = settings.replace(',"multikey":true', "").replace(',"multikey":false', "")
        old = re.sub(r',"kinds":\{[^}]*\}', "", old)
        files.execute("UPDATE _ferretdb_collections SET settings = ? WHERE name = 'things'", (old,))
        for (index,) in files.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '%->>%'"
        ).fetchall():
            files.execute(f'DROP INDEX "{index}"')
    colors, sizes, plan, names, sorted_plan = await answers()
    assert (colors, sizes, names) == (expected_colors, {5}, {"_id_", "color_1", "size_1"})
    assert "USING INDEX" in plan and "size_1" in plan
    assert "size_1" in sorted_plan and "TEMP B-TREE" not in sorted_plan

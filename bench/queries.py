"""The database alone: inserts into, and lookups in, a messages collection of 100,000 documents.

    python -m bench.queries [--uri URI] [--docs N] [--reps N]

Without --uri it starts a dev database (as the tests do). The collection has delivery's indexes
(services/delivery/store.py) and documents shaped like its messages (100 clients, 20,000 phones,
one message in a thousand due). Each query runs --reps times, or for 20 s if that comes first
(so a server that scans every time still finishes); the table gives p50 and p99 in milliseconds
and the documents the server read per query (serverStatus metrics.queryExecutor.scannedObjects,
where the server reports it). Not part of `make bench` or of the tests: run it to compare
servers, e.g. the dev database before and after a change to tools/devdb.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import SystemClock
from services.core.devdb import DevDatabase
from services.core.mongo import Document, connect
from services.delivery.store import Store

START = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = ["delivered"] * 90 + ["sent"] * 6 + ["held"] * 3 + ["failed"]
PER_QUERY_SECONDS = 20.0


def idem(i: int) -> str:
    return f"c{i % 100}:req-{i}"


def message(i: int) -> Document:
    created = START + timedelta(seconds=i)
    status = "queued" if i % 1000 == 7 else STATUSES[i % len(STATUSES)]
    return {
        "_id": f"01M{i:023d}",
        "idem": idem(i),
        "client_id": f"c{i % 100}",
        "created_at": created,
        "status": status,
        "next_attempt_at": created + timedelta(seconds=30),
        "expire_at": created + timedelta(minutes=10),
        "phone_index": f"{(i * 7919) % 20_000:064x}",
        "sms_poll_at": created + timedelta(minutes=1) if status == "sent" else None,
        "purge_at": created + timedelta(days=7),
        "lease_until": START,
        "text": "x" * 160,
        "attempts": 1,
    }


async def scanned(db: AsyncDatabase[Document]) -> int | None:
    status = await db.client.admin.command("serverStatus")
    value = status.get("metrics", {}).get("queryExecutor", {}).get("scannedObjects")
    return int(value) if value is not None else None


async def timed(reps: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + PER_QUERY_SECONDS
    for i in range(reps):
        began = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - began) * 1000)
        if time.perf_counter() > deadline:
            break
    return latencies


def row(name: str, latencies: list[float], read: float | None = None) -> str:
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
    docs = "-" if read is None else f"{read:,.0f}"
    return f"{name:44s} {len(latencies):5d} {p50:10.2f} {p99:10.2f} {docs:>12s}"


async def run(uri: str, docs: int, reps: int) -> None:
    client = connect(uri, "bench-queries", timeout_ms=60_000)
    db = client[f"bench_queries_{int(time.time())}"]
    try:
        await Store(db, SystemClock()).create_indexes()
        messages = db["messages"]
        print(f"{'':44s} {'runs':>5s} {'p50 ms':>10s} {'p99 ms':>10s} {'docs read':>12s}")

        began = time.perf_counter()
        for first in range(0, docs, 1000):
            await messages.insert_many([message(i) for i in range(first, min(first + 1000, docs))])
        seconds = time.perf_counter() - began
        print(f"{'insert_many, 1,000 a command':44s} {docs:5d} docs in {seconds:.1f} s = {docs / seconds:,.0f} docs/s")
        print(row("insert_one", await timed(reps, lambda i: messages.insert_one(message(docs + i)))))

        queries: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
            ("find_one by unique idem", lambda i: messages.find_one({"idem": idem(i * 37 % docs)})),
            (
                "find by phone_index (5 matches)",
                lambda i: messages.find({"phone_index": f"{(i * 7919) % 20_000:064x}"}).to_list(),
            ),
            (
                "due: status + next_attempt_at range (100)",
                lambda i: (
                    messages.find({"status": "queued", "next_attempt_at": {"$lte": START + timedelta(seconds=docs)}})
                    .sort("next_attempt_at", 1)
                    .limit(100)
                    .to_list()
                ),
            ),
            (
                "range: purge_at within a minute (60)",
                lambda i: messages.find(
                    {
                        "purge_at": {
                            "$gte": START + timedelta(days=7, seconds=i * 60 % docs),
                            "$lt": START + timedelta(days=7, seconds=i * 60 % docs + 60),
                        }
                    }
                ).to_list(),
            ),
            (
                "client page: 50 of 1,000, newest first",
                lambda i: (
                    messages.find({"client_id": f"c{i % 100}"})
                    .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
                    .limit(50)
                    .to_list()
                ),
            ),
        ]
        for name, call in queries:
            before = await scanned(db)
            latencies = await timed(reps, call)
            after = await scanned(db)
            read = None if before is None or after is None else (after - before) / len(latencies)
            print(row(name, latencies, read))
    finally:
        await client.drop_database(db.name)
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", help="the server to measure (default: a dev database started here)")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    if args.uri:
        asyncio.run(run(args.uri, args.docs, args.reps))
        return
    with DevDatabase() as devdb:
        asyncio.run(run(devdb.uri, args.docs, args.reps))


if __name__ == "__main__":
    main()

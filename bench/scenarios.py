"""The four measurements: send, floor, verify pairs, Telegram ceiling."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from bench.system import SHARED_BOTS, System, User, counts_delta, proc_sample


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU time (user + system) each process has used so far."""
    return {name: proc_sample(pid).cpu for name, pid in pids.items()}


@dataclass
class LoadResult:
    """One measured run of a closed-loop load at a fixed concurrency."""

    concurrency: int
    seconds: float
    done: int
    errors: dict[str, int]
    latencies: list[float]
    driver_cpu: float
    service_cpu: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "done": self.done,
            "rate": round(self.rate, 2),
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(self.latencies, 99) * 1000, 2),
            "errors": self.errors,
            "driver_cpu_pct": round(100 * self.driver_cpu / self.seconds, 1) if self.seconds else 0.0,
            "service_cpu_pct": {k: round(100 * v / self.seconds, 1) for k, v in self.service_cpu.items()},
            **self.extra,
        }


Op = Callable[[int, int], Awaitable[None]]  # (worker, sequence) -> one operation


async def closed_loop(
    op: Op,
    concurrency: int,
    warmup: float,
    duration: float,
    pids: Mapping[str, int] | None = None,
    on_window: Callable[[str], None] | None = None,
) -> tuple[LoadResult, list[tuple[int, float, float]]]:
    """`concurrency` workers call `op` back to back for `warmup` + `duration` seconds. Operations
    that complete inside the measured window (after the warm-up) are counted; CPU is sampled at
    the window's edges. Returns the result and (seq, start, end) wall times of the counted
    successful operations."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start = start + warmup
    window_end = window_start + duration
    counter = 0
    latencies: list[float] = []
    timings: list[tuple[int, float, float]] = []
    errors: dict[str, int] = {}
    marks: dict[str, Any] = {}

    async def worker(index: int) -> None:
        nonlocal counter
        while loop.time() < window_end:
            counter += 1
            seq = counter
            wall = time.time()
            try:
                await op(index, seq)
                failure = ""
            except grpc.aio.AioRpcError as err:
                failure = err.code().name
            except Exception as exc:  # the floor's database errors
                failure = type(exc).__name__
            now = loop.time()
            # Counted: what completes inside the window (a closed loop's throughput).
            if window_start <= now < window_end:
                if failure:
                    errors[failure] = errors.get(failure, 0) + 1
                else:
                    end = time.time()
                    latencies.append(end - wall)
                    timings.append((seq, wall, end))

    async def mark() -> None:
        await asyncio.sleep(max(0.0, window_start - loop.time()))
        marks["cpu0"] = time.process_time()
        marks["proc0"] = cpu_seconds(pids or {})
        if on_window:
            on_window("start")
        await asyncio.sleep(max(0.0, window_end - loop.time()))
        marks["cpu1"] = time.process_time()
        marks["proc1"] = cpu_seconds(pids or {})

    await asyncio.gather(mark(), *(worker(i) for i in range(concurrency)))
    driver_cpu = marks["cpu1"] - marks["cpu0"]
    service_cpu = {k: marks["proc1"][k] - marks["proc0"].get(k, 0.0) for k in marks["proc1"]}
    if on_window:
        on_window("end")
    seconds = duration
    result = LoadResult(concurrency, seconds, len(latencies), errors, latencies, driver_cpu, service_cpu)
    return result, timings


# Scenario 1: send ----------------------------------------------------------------------------


# Set from --no-request-id: send without an idempotency key (what clients that send none cost).
REQUEST_IDS = {"on": True}


def rid(value: str) -> str:
    return value if REQUEST_IDS["on"] else ""


def public_stub(system: System) -> tuple[edge_pb2_grpc.PublicServiceAsyncStub, tuple[tuple[str, str], ...]]:
    return edge_pb2_grpc.PublicServiceStub(system.channel("edge")), (("authorization", f"Bearer {system.api_key}"),)


async def send_run(
    system: System, users: Sequence[User], concurrency: int, warmup: float, duration: float, tag: str
) -> LoadResult:
    stub, metadata = public_stub(system)
    texts: dict[str, int] = {}

    async def op(worker: int, seq: int) -> None:
        user = users[(worker + seq * 7919) % len(users)]
        text = f"bench {tag} #{seq}: your code is {seq % 1_000_000:06d}"
        texts[text] = seq
        await stub.SendMessage(
            edge_pb2.SendMessageRequest(phone=user.phone, text=text, bot=user.bots[0], request_id=rid(f"{tag}-{seq}")),
            metadata=metadata,
            timeout=30,
        )

    await system.chat_messages()  # skip whatever arrived before
    result, timings = await closed_loop(op, concurrency, warmup, duration, system.pids())
    # Accept -> received in the sandbox chat (outside the timed part).
    wanted = {seq: start for seq, start, _ in timings}
    received: dict[int, float] = {}
    deadline = time.monotonic() + 30
    while len(received) < len(wanted) and time.monotonic() < deadline:
        for text, sent in await system.chat_messages():
            seq = texts.get(text, 0)
            if seq in wanted:
                received[seq] = sent - wanted[seq]
        if len(received) < len(wanted):
            await asyncio.sleep(0.5)
    delays = list(received.values())
    result.extra = {
        "received": len(received),
        "received_p50_ms": round(percentile(delays, 50) * 1000, 2),
        "received_p99_ms": round(percentile(delays, 99) * 1000, 2),
    }
    return result


async def command_mix(system: System, op: Op, operations: int, concurrency: int = 4) -> dict[str, Any]:
    """Database commands and calls between services one operation costs, counted on the code path:
    every service's database commands and the gRPC calls each service served during `operations`
    runs of `op` (`concurrency` at a time), less what the background loops send when idle."""

    def counts() -> dict[str, dict[str, int]]:
        return {**system.db_counts(), "rpc": system.rpc_counts()}

    async def idle_counts(seconds: float) -> dict[str, int]:
        await asyncio.sleep(0.6)
        before = counts()
        await asyncio.sleep(seconds)
        await asyncio.sleep(0.3)
        return counts_delta(counts(), before)

    idle_seconds = 3.0
    idle = await idle_counts(idle_seconds)
    await asyncio.sleep(0.6)
    before = counts()
    started = time.monotonic()

    async def worker(index: int) -> None:  # each worker one operation after the other, as in a run
        for seq in range(index, operations, concurrency):
            await op(index, seq)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    busy_seconds = time.monotonic() - started
    await asyncio.sleep(0.6)
    busy = counts_delta(counts(), before)
    scale = (busy_seconds + 0.6) / idle_seconds
    per_op: dict[str, float] = {}
    rpcs: dict[str, float] = {}
    server_ms: dict[str, float] = {}
    for key, count in busy.items():
        if key.endswith("#us"):
            continue
        value = (count - idle.get(key, 0) * scale) / operations
        if value <= 0.005:
            continue
        if key.startswith("rpc|"):
            rpcs[key.removeprefix("rpc|")] = round(value, 3)
            continue
        per_op[key] = round(value, 3)
        # Mean time per command as the driver saw it (round trip, under this load).
        server_ms[key] = round(busy.get(f"{key}#us", 0) / count / 1000, 2)
    return {
        "operations": operations,
        "seconds": round(busy_seconds, 2),
        "per_operation": dict(sorted(per_op.items())),
        "total_per_operation": round(sum(per_op.values()), 2),
        "rpc_per_operation": dict(sorted(rpcs.items())),
        "rpc_total_per_operation": round(sum(rpcs.values()), 2),
        "mean_ms": dict(sorted(server_ms.items())),
        "ms_per_operation": round(sum(per_op[k] * server_ms[k] for k in per_op), 1),
        "idle_per_second": {k: round(v / idle_seconds, 2) for k, v in sorted(idle.items()) if not k.endswith("#us")},
    }


async def op_mix(system: System, users: Sequence[User], messages: int = 200, concurrency: int = 4) -> dict[str, Any]:
    """The command mix of one accepted and sent message (edge SendMessage), keyed as the floor reads it."""
    stub, metadata = public_stub(system)
    tag = "mix" + os.urandom(2).hex()

    async def send(worker: int, i: int) -> None:
        user = users[i % len(users)]
        await stub.SendMessage(
            edge_pb2.SendMessageRequest(
                phone=user.phone, text=f"{tag} {i}", bot=user.bots[0], request_id=rid(f"{tag}{i}")
            ),
            metadata=metadata,
            timeout=30,
        )

    mix = await command_mix(system, send, messages, concurrency)
    return {
        **mix,
        "messages": messages,
        "per_message": mix["per_operation"],
        "total_per_message": mix["total_per_operation"],
        "ms_per_message": mix["ms_per_operation"],
    }


# Scenario 2: floor ---------------------------------------------------------------------------


class Floor:
    """The per-message command mix issued directly with AsyncMongoClient, one collection per
    collection of ours, each kept as large as ours (on the dev database a lookup by anything but
    _id reads the whole collection, so size matters): inserts of documents shaped like ours,
    lookups/updates/find-and-modify by _id or by another field as ours do, deletes of what it
    inserted, and counts over a field (none on today's send path)."""

    PAYLOAD = os.urandom(384)

    def __init__(self, uri: str, mix: Mapping[str, float]) -> None:
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, appname="bench-floor")
        self.db = self.client[f"bench_floor_{os.urandom(3).hex()}"]
        self.ops: list[tuple[str, str, str, float]] = []
        self.source: dict[str, str] = {}
        for key, per in mix.items():
            service_target, _, rest = key.partition(":")
            command, _, shape = rest.partition(":")
            target = service_target.split("|", 1)[1]
            name = target.replace(".", "__")
            self.source[name] = target
            self.ops.append((name, command, shape, per))
        self.sizes: dict[str, int] = {}
        self.templates: dict[str, list[dict[str, Any]]] = {}
        self.inserted: dict[tuple[int, str], list[str]] = {}
        self.carry: dict[tuple[int, str, str, str], float] = {}

    def _doc(self, doc_id: str, k: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "_id": doc_id,
            "k": k,
            "w": f"w|{int(time.time() // 60)}",
            "status": 1,
            "client_id": "bench",
            "blob": self.PAYLOAD,
            "created_at": now,
            "updated_at": now,
            "lease_until": now,
            "n": 0,
        }

    async def prepare(self) -> None:
        for name in self.source:
            await self.db[name].create_index([("w", 1)])
            await self.db[name].create_index([("k", 1)])
            self.sizes[name] = 0

    async def sync(self, source_client: AsyncMongoClient[dict[str, Any]]) -> dict[str, int]:
        """Grow every floor collection to the size of ours now, with copies of our documents
        (same shapes and sizes; _id and the lookup field "k" renumbered)."""
        for name, target in self.source.items():
            database, _, collection = target.partition(".")
            real = await source_client[database][collection].estimated_document_count() if collection else 0
            have = self.sizes[name]
            if have < real:
                samples = await source_client[database][collection].find({}, limit=200).to_list()
                while have < real:
                    batch = min(500, real - have)
                    docs = []
                    for i in range(have, have + batch):
                        doc = dict(samples[i % len(samples)]) if samples else self._doc("", "")
                        doc["_id"], doc["k"] = f"pre{i:07d}", f"k{i:07d}"
                        docs.append(doc)
                    await self.db[name].insert_many(docs)
                    have += batch
                self.templates[name] = samples[:20]
            self.sizes[name] = have
        return dict(self.sizes)

    async def close(self) -> None:
        await self.client.drop_database(self.db.name)
        await self.client.close()

    async def message(self, worker: int, seq: int) -> None:
        for name, command, shape, per in self.ops:
            key = (worker, name, command, shape)
            owed = self.carry.get(key, 0.0) + per
            times = int(owed)
            self.carry[key] = owed - times
            if command == "insert" and times:
                await self._insert(worker, seq, name, times)  # a message's documents: one command
                continue
            for _ in range(times):
                await self._one(worker, seq, name, command, shape)

    async def _insert(self, worker: int, seq: int, name: str, count: int) -> None:
        docs = []
        templates = self.templates.get(name)
        for _ in range(count):
            doc_id = f"{worker}-{seq}-{os.urandom(4).hex()}"
            doc = dict(templates[seq % len(templates)]) if templates else self._doc(doc_id, doc_id)
            doc["_id"], doc["k"] = doc_id, doc_id
            if "w" in doc or not templates:
                doc["w"] = f"w|{int(time.time() // 60)}"
            docs.append(doc)
        await self.db[name].insert_many(docs)
        self.inserted.setdefault((worker, name), []).extend(doc["_id"] for doc in docs)

    async def _one(self, worker: int, seq: int, name: str, command: str, shape: str) -> None:
        coll = self.db[name]
        size = max(1, self.sizes.get(name, 0))
        pick = (seq * 31 + worker * 7) % size
        by: dict[str, Any] = {"k": f"k{pick:07d}"} if shape == "scan" else {"_id": f"pre{pick:07d}"}
        now = datetime.now(UTC)
        if command == "update":
            await coll.update_one(by, {"$set": {"updated_at": now, "n": seq}})
        elif command == "findAndModify":
            if shape == "idplus":
                by["lease_until"] = {"$lte": now}
            await coll.find_one_and_update(by, {"$set": {"lease_until": now, "n": seq}})
        elif command == "delete":
            mine = self.inserted.get((worker, name))
            await coll.delete_one({"_id": mine.pop()} if mine else {"_id": "gone"})
        elif command in {"aggregate", "count"}:
            await coll.count_documents({"w": f"w|{int(time.time() // 60)}"})
        else:
            await coll.find_one(by)


async def floor_run(
    floor: Floor, concurrency: int, warmup: float, duration: float, pids: Mapping[str, int]
) -> LoadResult:
    result, _ = await closed_loop(floor.message, concurrency, warmup, duration, pids)
    return result


# Scenario 3: verify pairs --------------------------------------------------------------------


def verify_pair(system: System, users: Sequence[User], concurrency: int, tag: str) -> Op:
    """StartVerification with a client-supplied code (policy allow_custom_code), then
    CheckVerification with that code; one pair is one operation. Each worker owns its numbers
    (one pending verification per number)."""
    stub, metadata = public_stub(system)

    async def op(worker: int, seq: int) -> None:
        owned = users[worker :: max(1, concurrency)] or users
        user = owned[seq % len(owned)]
        code = f"{(seq * 7 + 123456) % 1_000_000:06d}"
        started = await stub.StartVerification(
            edge_pb2.StartVerificationRequest(
                phone=user.phone,
                channel=common_pb2.CHANNEL_TELEGRAM,
                bot=user.bots[0],
                custom_code=code,
                request_id=f"{tag}-{seq}",
            ),
            metadata=metadata,
            timeout=30,
        )
        checked = await stub.CheckVerification(
            edge_pb2.CheckVerificationRequest(id=started.verification.id, code=code), metadata=metadata, timeout=30
        )
        if not checked.approved:
            raise RuntimeError("verification not approved")

    return op


async def verify_run(
    system: System, users: Sequence[User], concurrency: int, warmup: float, duration: float, tag: str
) -> LoadResult:
    op = verify_pair(system, users, concurrency, tag)
    result, _ = await closed_loop(op, concurrency, warmup, duration, system.pids())
    return result


async def verify_mix(system: System, users: Sequence[User], pairs: int = 100, concurrency: int = 4) -> dict[str, Any]:
    """The command mix of one Verify pair (start with a client-supplied code, then check)."""
    op = verify_pair(system, users, concurrency, "vmix" + os.urandom(2).hex())
    return await command_mix(system, op, pairs, concurrency)


# Scenario 4: Telegram ceiling ----------------------------------------------------------------


@dataclass
class CeilingResult:
    messages: int
    received: int
    seconds: float
    rate: float
    limit: float
    flood_errors: float
    rate_limited: float
    errors: dict[str, int]
    per_bot: dict[str, int]
    cpu_pct: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "service_cpu_pct": self.cpu_pct,
            "messages": self.messages,
            "received": self.received,
            "seconds": round(self.seconds, 2),
            "rate": round(self.rate, 2),
            "limit": self.limit,
            "ratio": round(self.rate / self.limit, 3) if self.limit else 0.0,
            "flood_errors": int(self.flood_errors),
            "bot_rate_limited_retries": int(self.rate_limited),
            "errors": self.errors,
            "per_bot": self.per_bot,
        }


def ceiling_plans(count: int) -> list[list[str]]:
    """Every user on the first shared bot; even users also on the second, odd on the third.
    Contacts are shared with the second/third bot, so the first only says "linked" (one reply)."""
    first, second, third = SHARED_BOTS
    return [[second, first] if i % 2 == 0 else [third, first] for i in range(count)]


def ceiling_sends(users: Sequence[User], messages: int, pool: bool) -> list[tuple[User, str]]:
    first = SHARED_BOTS[0]
    if not pool:
        return [(users[i % len(users)], first) for i in range(messages)]
    # Each bot gets a third: in every three rounds over the users, each user once on the first
    # bot and twice on its own (half the users share the second, half the third); interleaved.
    rounds = max(1, -(-messages // max(1, len(users))))
    queues: dict[str, list[tuple[User, str]]] = {bot: [] for bot in SHARED_BOTS}
    for r in range(rounds):
        for user in users:
            bot = first if r % 3 == 0 else user.bots[0]
            queues[bot].append((user, bot))
    ordered: list[tuple[User, str]] = []
    longest = max(len(q) for q in queues.values())
    for i in range(longest):
        for bot in SHARED_BOTS:
            if i < len(queues[bot]):
                ordered.append(queues[bot][i])
    return ordered[:messages]


async def ceiling_run(system: System, messages: int, pool: bool, concurrency: int, tag: str) -> CeilingResult:
    stub, metadata = public_stub(system)
    sends = ceiling_sends(system.users, messages, pool)
    gate = asyncio.Semaphore(concurrency)
    errors: dict[str, int] = {}
    texts: dict[str, str] = {}
    await system.chat_messages()
    floods0 = system.metric("botgateway", "otpgate_bot_flood_waits_total")
    limited0 = system.metric("botgateway", "otpgate_bot_messages_total", {"outcome": "rate_limited"})

    async def one(i: int, user: User, bot: str) -> None:
        text = f"ceiling {tag} #{i}: code {i % 1_000_000:06d}"
        texts[text] = bot
        async with gate:
            try:
                await stub.SendMessage(
                    edge_pb2.SendMessageRequest(phone=user.phone, text=text, bot=bot, request_id=rid(f"{tag}-{i}")),
                    metadata=metadata,
                    timeout=60,
                )
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1

    pids = system.pids()
    cpu0 = cpu_seconds(pids)
    wall0 = time.monotonic()
    await asyncio.gather(*(one(i, u, b) for i, (u, b) in enumerate(sends)))
    # Messages refused for a moment by a bot's bucket are sent by the dispatcher: wait for all.
    arrivals: list[float] = []
    per_bot: dict[str, int] = {}
    progress = time.monotonic()
    while len(arrivals) < len(sends) and time.monotonic() - progress < 20:
        for text, sent in await system.chat_messages():
            bot = texts.get(text)
            if bot is not None:
                arrivals.append(sent)
                per_bot[bot] = per_bot.get(bot, 0) + 1
                progress = time.monotonic()
        if len(arrivals) < len(sends):
            await asyncio.sleep(1.0)
    # CPU over the sending (accepting and dispatching), in % of one core.
    wall = max(1e-9, time.monotonic() - wall0)
    cpu = {name: round(100 * (used - cpu0[name]) / wall, 1) for name, used in cpu_seconds(pids).items()}
    arrivals.sort()
    seconds = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    rate = (len(arrivals) - 1) / seconds if seconds > 0 else 0.0
    bots = len(SHARED_BOTS) if pool else 1
    floods = system.metric("botgateway", "otpgate_bot_flood_waits_total") - floods0
    limited = system.metric("botgateway", "otpgate_bot_messages_total", {"outcome": "rate_limited"}) - limited0
    return CeilingResult(len(sends), len(arrivals), seconds, rate, 30.0 * bots, floods, limited, errors, per_bot, cpu)


def median_of(results: Sequence[LoadResult]) -> dict[str, Any]:
    """The run with the median throughput, plus the spread of all runs."""
    ordered = sorted(results, key=lambda r: r.rate)
    middle = ordered[len(ordered) // 2]
    summary = middle.summary()
    summary["runs"] = [round(r.rate, 2) for r in results]
    summary["rate"] = round(statistics.median(r.rate for r in results), 2)
    return summary

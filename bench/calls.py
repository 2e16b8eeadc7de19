"""The request-path calls at 100,000 messages: p50/p99 of each, through the services' RPCs.

    python -m bench.calls [--messages N] [--users N] [--reps N] [--tiny]

Starts the stack as `make bench` does (dev database, simulated Telegram, the five services;
`MONGODB_URI` names another server), connects sandbox users and sends real messages, holds,
confirmations and verifications through the API, then grows the collections to size with
copies of those documents (see `fill`), and times, one call after another:

- edge ListMessages: the first page and a deep page (a page token 5,000 messages down), each
  without and with a status filter;
- delivery ReleaseHeldMessages for a number with three held messages;
- edge ListVerifications, the first page and one filtered by status;
- directory GetSubscriber by Telegram user;
- verification SubmitConfirmationCode of a person with a history of confirmations and none
  pending (the lookups by user the bot makes for every code a person types).

Ends with one line: `bench.calls: messages=N worst_p99_ms=X (call) target_p99_ms=50 over_target=K`.
`make bench` runs it after the other scenarios (`python -m bench` calls `run`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.edge.v1 import edge_pb2
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from bench.scenarios import percentile, public_stub
from bench.system import RAISED_OURS, RAISED_TELEGRAM, SHARED_BOTS, System, User, workdir
from services.core.crypto import Keyring
from services.core.ids import new_id

TARGET_P99_MS = 50.0
DEEP = 5_000  # messages above the deep page
HELD_PER_NUMBER = 3
CONFIRMATIONS_PER_USER = 20
Status: TypeAlias = common_pb2.MessageStatus.ValueType
ANY = common_pb2.MESSAGE_STATUS_UNSPECIFIED
DELIVERED = common_pb2.MESSAGE_STATUS_DELIVERED
FAILED = common_pb2.MESSAGE_STATUS_FAILED
HELD = common_pb2.MESSAGE_STATUS_HELD
# Finished statuses only: no background loop of delivery picks the copies up.
STATUS_MIX = [DELIVERED] * 96 + [FAILED] * 3 + [common_pb2.MESSAGE_STATUS_EXPIRED]


@dataclass(frozen=True)
class Sizes:
    messages: int
    users: int
    reps: int
    verifications: int
    subscribers: int
    confirmations: int


FULL = Sizes(messages=100_000, users=40, reps=200, verifications=300, subscribers=20_000, confirmations=20_000)
TINY = Sizes(messages=2_000, users=4, reps=8, verifications=10, subscribers=200, confirmations=200)


@dataclass
class Timing:
    name: str
    latencies_ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    def row(self) -> str:
        flag = "" if self.p99 <= TARGET_P99_MS else "  over target"
        return f"{self.name:52s} {len(self.latencies_ms):5d} {self.p50:8.1f} {self.p99:8.1f}{flag}"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


WARM_CALLS = 5  # untimed, before each row: channels, caches, SQLite's pages


async def timed(name: str, reps: int, call: Callable[[int], Awaitable[Any]], warm: bool = True) -> Timing:
    for i in range(WARM_CALLS if warm else 0):
        await call(i)
    latencies: list[float] = []
    for i in range(reps):
        began = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - began) * 1000)
    return Timing(name, latencies)


def service_db(system: System, service: str) -> str:
    assert system.stack is not None
    return system.stack.env[f"OTPGATE_{service.upper()}_DATABASE"]


async def holding(db: AsyncDatabase[dict[str, Any]], field: str, value: Any) -> str:
    """The collection of db with a document whose `field` is `value`."""
    for name in await db.list_collection_names():
        if await db[name].find_one({field: value}) is not None:
            return name
    raise RuntimeError(f"no collection of {db.name} holds {field}={value!r}")


async def insert_copies(db: AsyncDatabase[dict[str, Any]], name: str, docs: Sequence[dict[str, Any]]) -> None:
    for first in range(0, len(docs), 1000):
        await db[name].insert_many(list(docs[first : first + 1000]), ordered=False)


async def fill(system: System, sizes: Sizes, users: Sequence[User]) -> dict[str, Any]:
    """Real documents first, through the API: a message to every user, a phone confirmation of
    one of them, `sizes.verifications` verifications (approved but the last of each number). Then copies of them, inserted directly
    with only their keys renumbered: `sizes.messages` messages of the bench client, newest one
    a second ago and one a second before each (90% delivered), three held messages for each
    user's number, `sizes.subscribers` people in the directory and `sizes.confirmations` finished
    confirmations (`CONFIRMATIONS_PER_USER` of them for each user, the rest for others)."""
    stub, metadata = public_stub(system)
    for i, user in enumerate(users):
        await stub.SendMessage(
            edge_pb2.SendMessageRequest(phone=user.phone, text=f"calls {i}: code {i:06d}", bot=user.bots[0]),
            metadata=metadata,
            timeout=30,
        )
    for i in range(sizes.verifications):
        user, code = users[i % len(users)], f"{i:06d}"
        started = await stub.StartVerification(
            edge_pb2.StartVerificationRequest(
                phone=user.phone, channel=common_pb2.CHANNEL_TELEGRAM, bot=user.bots[0], custom_code=code
            ),
            metadata=metadata,
            timeout=30,
        )
        if i < sizes.verifications - len(users):  # approved; the last of each number stays pending
            await stub.CheckVerification(
                edge_pb2.CheckVerificationRequest(id=started.verification.id, code=code), metadata=metadata, timeout=30
            )
    verification = verification_pb2_grpc.VerificationServiceStub(system.channel("verification"))
    await verification.StartPhoneConfirmation(
        verification_pb2.StartPhoneConfirmationRequest(
            phone=users[0].phone,
            telegram_user_id=users[0].user_id,
            bot_id=users[0].bots[0],
            client_id=system.client_id,
            locale="en",
        ),
        timeout=30,
    )

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(system.uri, appname="bench-calls-fill")
    try:
        delivery_db = client[service_db(system, "delivery")]
        directory_db = client[service_db(system, "directory")]
        verification_db = client[service_db(system, "verification")]
        templates = await delivery_db.messages.find({"client_id": system.client_id}).to_list()
        if not templates:
            raise RuntimeError("the messages sent through the API are not in delivery's database")

        now = datetime.now(UTC)
        keyring = Keyring.parse(system.stack.env["OTPGATE_KEYS"]) if system.stack else None
        assert keyring is not None
        messages: list[dict[str, Any]] = []
        for i in range(sizes.messages):
            created = now - timedelta(seconds=1 + i)
            doc = dict(templates[i % len(templates)])
            doc.update(
                _id=new_id(int(created.timestamp() * 1000)),
                idem=f"\x1fcopy-{i}",
                created_at=created,
                updated_at=created,
                status=STATUS_MIX[i % len(STATUS_MIX)],
                sms_poll_at=None,
                purge_at=None,
                lease_until=created,
            )
            messages.append(doc)
        for user in users:
            template = next((t for t in templates if t.get("telegram_user_id") == user.user_id), templates[0])
            for j in range(HELD_PER_NUMBER):
                held = dict(template)
                held.update(
                    _id=new_id(),
                    idem=f"\x1fheld-{user.user_id}-{j}",
                    status=HELD,
                    phone_index=keyring.blind_index("phone", user.phone),
                    telegram_user_id=user.user_id,
                    confirmation_started=True,  # the confirmation is on its way: nothing to start
                    created_at=now,
                    updated_at=now,
                    expire_at=now + timedelta(minutes=10),
                    next_attempt_at=now + timedelta(minutes=10),
                    lease_until=now - timedelta(seconds=1),
                    sent_at=None,
                    delivered_at=None,
                )
                messages.append(held)
        await insert_copies(delivery_db, "messages", messages)

        people = await holding(directory_db, "telegram_user_id", users[0].user_id)
        person = await directory_db[people].find_one({"telegram_user_id": users[0].user_id})
        assert person is not None
        await insert_copies(
            directory_db,
            people,
            [
                {**person, "_id": new_id(), "telegram_user_id": 9_000_000_000 + i, "phone_index": f"{i:064x}"}
                for i in range(sizes.subscribers)
            ],
        )

        confirmation = await verification_db.confirmations.find_one({"telegram_user_id": users[0].user_id})
        if confirmation is None:
            raise RuntimeError("the phone confirmation started through the API is not in verification's database")
        finished = []
        for i in range(sizes.confirmations):
            mine = i < CONFIRMATIONS_PER_USER * len(users)
            at = now - timedelta(days=1, minutes=i)
            record_id = new_id(int(at.timestamp() * 1000))
            finished.append(
                {
                    **confirmation,
                    "_id": record_id,
                    "telegram_user_id": users[i % len(users)].user_id if mine else 9_000_000_000 + i,
                    "status": "EXPIRED",
                    "pending_key": record_id,  # as a finished record holds it (codes.py)
                    "created_at": at,
                    "final_at": at + timedelta(minutes=10),
                    "followup_pending": False,
                }
            )
        await insert_copies(verification_db, "confirmations", finished)
        return {
            "messages": await delivery_db.messages.count_documents({"client_id": system.client_id}),
            "subscribers": await directory_db[people].estimated_document_count(),
            "confirmations": await verification_db.confirmations.estimated_document_count(),
        }
    finally:
        await client.close()


async def page_token(system: System, status: Status, depth: int) -> str:
    """The token of the page `depth` messages down, walked to page by page."""
    stub, metadata = public_stub(system)
    token = ""
    for _ in range(depth // 100):
        reply = await stub.ListMessages(
            edge_pb2.ListMessagesRequest(page_size=100, page_token=token, status=status), metadata=metadata, timeout=60
        )
        token = reply.next_page_token
    return token


async def measure(system: System, sizes: Sizes, users: Sequence[User]) -> list[Timing]:
    stub, metadata = public_stub(system)
    delivery = delivery_pb2_grpc.DeliveryServiceStub(system.channel("delivery"))
    directory = directory_pb2_grpc.DirectoryServiceStub(system.channel("directory"))
    verification = verification_pb2_grpc.VerificationServiceStub(system.channel("verification"))
    depth = min(DEEP, sizes.messages // 2 // 100 * 100)
    deep = await page_token(system, ANY, depth)
    deep_delivered = await page_token(system, DELIVERED, depth)

    def list_messages(token: str, status: Status = ANY) -> Callable[[int], Awaitable[Any]]:
        request = edge_pb2.ListMessagesRequest(page_size=20, page_token=token, status=status)
        return lambda _: stub.ListMessages(request, metadata=metadata, timeout=30)

    timings = [
        await timed("ListMessages, first page of 20", sizes.reps, list_messages("")),
        await timed("ListMessages, first page, status DELIVERED", sizes.reps, list_messages("", DELIVERED)),
        await timed(f"ListMessages, page {depth:,} down", sizes.reps, list_messages(deep)),
        await timed(
            f"ListMessages, page {depth:,} down, status DELIVERED", sizes.reps, list_messages(deep_delivered, DELIVERED)
        ),
    ]
    released: list[int] = []

    async def release(user: User) -> None:
        reply = await delivery.ReleaseHeldMessages(
            delivery_pb2.ReleaseHeldMessagesRequest(telegram_user_id=user.user_id, phone=user.phone), timeout=30
        )
        released.append(reply.released_count)

    await release(users[0])  # warm
    timings.append(
        await timed(
            f"ReleaseHeldMessages, {HELD_PER_NUMBER} held", len(users) - 1, lambda i: release(users[i + 1]), warm=False
        )
    )
    if released != [HELD_PER_NUMBER] * len(users):
        raise RuntimeError(f"ReleaseHeldMessages released {released}, expected {HELD_PER_NUMBER} each")

    def list_verifications(flt: str) -> Callable[[int], Awaitable[Any]]:
        request = edge_pb2.ListVerificationsRequest(page_size=20, filter=flt)
        return lambda _: stub.ListVerifications(request, metadata=metadata, timeout=30)

    timings += [
        await timed("ListVerifications, first page of 20", sizes.reps, list_verifications("")),
        await timed("ListVerifications, status = APPROVED", sizes.reps, list_verifications("status = APPROVED")),
        await timed(
            "GetSubscriber by Telegram user",
            sizes.reps,
            lambda i: directory.GetSubscriber(
                directory_pb2.GetSubscriberRequest(telegram_user_id=users[i % len(users)].user_id), timeout=30
            ),
        ),
        await timed(
            "SubmitConfirmationCode, none pending",
            sizes.reps,
            lambda i: verification.SubmitConfirmationCode(
                verification_pb2.SubmitConfirmationCodeRequest(
                    telegram_user_id=users[i % len(users)].user_id, code="000000", bot_id=users[i % len(users)].bots[0]
                ),
                timeout=30,
            ),
        ),
    ]
    return timings


def summary_line(sizes: dict[str, Any], timings: Sequence[Timing]) -> str:
    worst = max(timings, key=lambda t: t.p99)
    over = sum(1 for t in timings if t.p99 > TARGET_P99_MS)
    return (
        f"bench.calls: messages={sizes['messages']} worst_p99_ms={worst.p99:.1f} ({worst.name}) "
        f"target_p99_ms={TARGET_P99_MS:.0f} over_target={over}"
    )


async def run(sizes: Sizes, uri: str = "") -> dict[str, Any]:
    """Runs the scenario on a stack of its own; prints the table and the summary line."""
    work = workdir(False)
    system = System(env={**RAISED_OURS, **RAISED_TELEGRAM}, work=work / "calls")
    try:
        say("bench.calls: starting the stack…")
        await system.start(uri)
        say(f"bench.calls: connecting {sizes.users} sandbox users…")
        plans = [[SHARED_BOTS[i % len(SHARED_BOTS)]] for i in range(sizes.users)]
        users = await system.connect_users(sizes.users, plans, first_id=820_000_001)
        began = time.monotonic()
        filled = await fill(system, sizes, users)
        say(f"bench.calls: filled {filled} in {time.monotonic() - began:.0f} s; timing…")
        timings = await measure(system, sizes, users)
        await system.close_channels()
    finally:
        system.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"Request-path calls at {filled['messages']:,} messages of one client (one call at a time; target p99 ≤ 50 ms)"
    )
    print(f"{'call':52s} {'runs':>5s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for timing in timings:
        print(timing.row())
    line = summary_line(filled, timings)
    print(line, flush=True)
    return {
        "sizes": {**sizes.__dict__, **filled},
        "calls": [{"name": t.name, "runs": len(t.latencies_ms), "p50_ms": t.p50, "p99_ms": t.p99} for t in timings],
        "summary": line,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help=f"messages of the bench client (default {FULL.messages:,})")
    parser.add_argument("--users", type=int, help=f"sandbox users, each with held messages (default {FULL.users})")
    parser.add_argument("--reps", type=int, help=f"calls timed per row (default {FULL.reps})")
    parser.add_argument("--tiny", action="store_true", help="smoke-test size: seconds, not minutes")
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    changes = {k: v for k, v in (("messages", args.messages), ("users", args.users), ("reps", args.reps)) if v}
    asyncio.run(run(Sizes(**{**sizes.__dict__, **changes}), os.environ.get("MONGODB_URI", "")))


if __name__ == "__main__":
    main()

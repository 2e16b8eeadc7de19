"""Key rotation of the directory's sealed phone and blind index: batched, resumable, dual index."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from otpgate.directory.v1 import directory_pb2 as pb
from otpgate.directory.v1 import directory_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring, SealContext
from services.core.mongo import Document
from services.core.phone import mask_phone, parse_phone
from services.core.rotation import SealedField
from services.core.rotation_runner import (
    PROGRESS_COLLECTION,
    CollectionRotation,
    load_declarations,
    plan_collections,
)
from services.directory.sealed import BLIND_INDEXES, SEALED_FIELDS
from services.directory.store import SubscriberStore
from services.directory.subscribers import INDEX_PURPOSE, Directory
from tests.integration.directory.conftest import new_phone, new_user_id
from tests.support.stack import running_stack

ROOT = Path(__file__).resolve().parents[3]
OLD, NEW = Keyring.generate_spec("k1"), Keyring.generate_spec("k2")
OLD_ONLY, BOTH, NEW_ONLY = OLD, f"{OLD},{NEW}", NEW  # the primary (and index) key is the last listed


def rotation(database: AsyncDatabase[Document], keyring: Keyring, batch_size: int = 5) -> CollectionRotation:
    fields, indexes = plan_collections(load_declarations(["directory"])[0])["subscribers"]
    return CollectionRotation(
        database,
        "subscribers",
        keyring,
        sealed_fields=fields,
        blind_indexes=indexes,
        service="directory",
        batch_size=batch_size,
    )


async def seed(database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, count: int) -> dict[int, str]:
    store = SubscriberStore(database)
    await store.ensure_indexes()
    directory = Directory(store, keyring, clock, ["smsccode_bot"])
    people = {new_user_id(): new_phone() for _ in range(count)}
    for user, phone in people.items():
        await directory.link_contact("smsccode_bot", user, parse_phone(phone))
        clock.advance(1)
    return people


async def key_ids(database: AsyncDatabase[Document], keyring: Keyring) -> tuple[set[str], set[str]]:
    sealed, indexed = set(), set()
    async for doc in database["subscribers"].find({}):
        sealed.add(keyring.key_id_of(doc["phone"]))
        indexed.add(doc["phone_index_key"])
    return sealed, indexed


def test_directory_declares_its_sealed_phone_and_index() -> None:
    declarations = {d.service: d for d in load_declarations(["directory", "edge", "no_such_service"])}
    assert declarations["directory"].sealed_fields == SEALED_FIELDS == [SealedField("subscribers", "phone")]
    assert declarations["directory"].blind_indexes == BLIND_INDEXES
    assert plan_collections(declarations["directory"]) == {"subscribers": (["phone"], BLIND_INDEXES)}


async def test_rotation_round_trip_killed_and_resumed(
    mongo_client: AsyncMongoClient[Document], clock: ManualClock
) -> None:
    name = f"t_directory_{uuid.uuid4().hex[:8]}"
    database = mongo_client[name]
    overrides = {"OTPGATE_DIRECTORY_DATABASE": name}
    old, both, new_only = Keyring.parse(OLD_ONLY), Keyring.parse(BOTH), Keyring.parse(NEW_ONLY)
    try:
        people = await seed(database, old, clock, 23)
        assert await key_ids(database, both) == ({"k1"}, {"k1"})

        # The operator adds k2 (now primary and index key) and starts the rotation; it dies after 2 batches.
        first = await rotation(database, both).run(max_batches=2)
        assert not first.finished and first.run.batches == 2
        assert (first.run.resealed, first.run.reindexed) == (10, 10)
        assert await key_ids(database, both) == ({"k1", "k2"}, {"k1", "k2"})
        checkpoint = await database[PROGRESS_COLLECTION].find_one({"_id": "subscribers"})
        assert checkpoint is not None and checkpoint["finished_at"] is None
        assert checkpoint["target"] == {"seal": "k2", "index": "k2"}

        async with running_stack(mongo_client, BOTH, ["directory"], overrides=overrides, clock=clock) as stack:
            directory = directory_pb2_grpc.DirectoryServiceStub(stack.channel("directory"))
            # Half-rotated: old key ids still decrypt, and both indexes are found (dual index).
            for user, phone in people.items():
                resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
                assert resolved.telegram_user_id == user
                got = await directory.GetSubscriber(pb.GetSubscriberRequest(telegram_user_id=user))
                assert got.subscriber.phone_masked == mask_phone(phone)
            # A number linked meanwhile is written with the new keys.
            late_user, late_phone = new_user_id(), new_phone()
            await directory.LinkContact(
                pb.LinkContactRequest(
                    bot_id="smsccode_bot", telegram_user_id=late_user, contact_user_id=late_user, phone=late_phone
                )
            )
            people[late_user] = late_phone

            resumed = await rotation(database, both).run()
            assert resumed.finished and resumed.resumed
            assert (resumed.total.resealed, resumed.total.reindexed) == (23, 23)  # each value once over both runs
            assert resumed.run.resealed == 13 and resumed.total.failed == 0
            assert resumed.remaining == {}
            assert await key_ids(database, both) == ({"k2"}, {"k2"})

            # Once finished, k1 can go: a replica with only k2 reads everything.
            async with running_stack(mongo_client, NEW_ONLY, ["directory"], overrides=overrides, clock=clock) as last:
                final = directory_pb2_grpc.DirectoryServiceStub(last.channel("directory"))
                for user, phone in people.items():
                    assert (await final.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))).telegram_user_id == user
                    got = await final.GetSubscriber(pb.GetSubscriberRequest(phone=phone))
                    assert got.subscriber.phone_masked == mask_phone(phone)
        async for doc in database["subscribers"].find({}):
            phone = new_only.open_str(doc["phone"], SealContext("subscribers", doc["_id"], "phone"))
            assert doc["phone_index"] == new_only.blind_index(INDEX_PURPOSE, phone)
            assert people[doc["telegram_user_id"]] == phone
        # Running again finds nothing to do.
        again = await rotation(database, both).run()
        assert again.finished and not again.resumed and again.run.resealed == again.run.reindexed == 0
    finally:
        await mongo_client.drop_database(name)


async def test_redoing_a_batch_after_a_crash_is_harmless(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    old, both = Keyring.parse(OLD_ONLY), Keyring.parse(BOTH)
    await seed(database, old, clock, 7)
    await rotation(database, both, batch_size=3).run(max_batches=1)
    # The process died after writing a batch but before saving its progress.
    await database[PROGRESS_COLLECTION].update_one({"_id": "subscribers"}, {"$set": {"last_id": None}})
    result = await rotation(database, both, batch_size=3).run()
    assert result.finished and result.resumed
    assert result.run.resealed == 4 and result.total.resealed == 7  # the redone batch found nothing to do
    assert await key_ids(database, both) == ({"k2"}, {"k2"})


async def test_dry_run_counts_and_writes_nothing(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    old, both = Keyring.parse(OLD_ONLY), Keyring.parse(BOTH)
    await seed(database, old, clock, 4)
    before = [doc async for doc in database["subscribers"].find({}).sort("_id", 1)]
    result = await rotation(database, both).run(dry_run=True)
    assert result.finished and (result.run.resealed, result.run.reindexed) == (4, 4)
    assert result.remaining == {"phone": {"k1": 4}, "phone_index": {"k1": 4}}
    assert [doc async for doc in database["subscribers"].find({}).sort("_id", 1)] == before
    assert await database[PROGRESS_COLLECTION].count_documents({}) == 0


async def test_unreadable_values_are_counted_and_left(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    old, both = Keyring.parse(OLD_ONLY), Keyring.parse(BOTH)
    people = await seed(database, old, clock, 5)
    victim = next(iter(people))
    doc = await database["subscribers"].find_one({"telegram_user_id": victim})
    assert doc is not None
    tampered = bytearray(doc["phone"])
    tampered[-1] ^= 0xFF
    await database["subscribers"].update_one({"_id": doc["_id"]}, {"$set": {"phone": bytes(tampered)}})
    result = await rotation(database, both).run()
    assert result.finished and result.total.failed == 1 and result.total.resealed == 4
    assert result.remaining == {"phone": {"k1": 1}, "phone_index": {"k1": 1}}


async def test_index_clash_keeps_the_newest_owner(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    """Two records for one number (replicas disagreed on the index key): the newer link keeps it."""
    old, both = Keyring.parse(OLD_ONLY), Keyring.parse(BOTH)
    phone = new_phone()
    older_user, newer_user = new_user_id(), new_user_id()
    store = SubscriberStore(database)
    await store.ensure_indexes()
    await Directory(store, old, clock, []).link_contact("smsccode_bot", older_user, parse_phone(phone))
    clock.advance(timedelta(minutes=5))
    # A replica already on k2 that did not see the k1 record (no dual lookup) links the number again.
    await Directory(store, Keyring.parse(NEW_ONLY), clock, []).link_contact(
        "smsccode_bot", newer_user, parse_phone(phone)
    )
    assert await database["subscribers"].count_documents({}) == 2
    result = await rotation(database, both).run()
    assert result.finished and result.total.clashes == 1
    docs = [doc async for doc in database["subscribers"].find({})]
    assert [doc["telegram_user_id"] for doc in docs] == [newer_user]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--json", "keys", "rotate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_rotates_resumes_and_counts(
    database: AsyncDatabase[Document], clock: ManualClock, mongo_uri: str
) -> None:
    people = await seed(database, Keyring.parse(OLD_ONLY), clock, 9)
    env = {
        **os.environ,
        "MONGODB_URI": mongo_uri,
        "OTPGATE_KEYS": BOTH,
        "OTPGATE_DIRECTORY_DATABASE": database.name,
        # Other services' databases: empty ones nobody uses.
        **{
            f"OTPGATE_{s}_DATABASE": f"{database.name}_{s.lower()}"
            for s in ("EDGE", "DELIVERY", "VERIFICATION", "BOTGATEWAY")
        },
    }
    stopped = await asyncio.to_thread(_cli, env, "--service", "directory", "--batch-size", "4", "--max-batches", "1")
    assert stopped.returncode == 4, stopped.stderr
    report = json.loads(stopped.stdout)
    assert [(r["collection"], r["finished"], r["run"]["resealed"]) for r in report["results"]] == [
        ("subscribers", False, 4)
    ]
    done = await asyncio.to_thread(_cli, env, "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    directory = next(r for r in report["results"] if r["service"] == "directory")
    assert directory["finished"] and directory["resumed"]
    assert directory["total"]["resealed"] == directory["total"]["reindexed"] == len(people)
    assert directory["remaining"] == {}
    assert await key_ids(database, Keyring.parse(BOTH)) == ({"k2"}, {"k2"})
    for phone in people.values():
        assert phone not in done.stdout + done.stderr + stopped.stdout + stopped.stderr


async def test_cli_progress_and_final_count_for_people(
    database: AsyncDatabase[Document], clock: ManualClock, mongo_uri: str
) -> None:
    await seed(database, Keyring.parse(OLD_ONLY), clock, 3)
    env = {**os.environ, "MONGODB_URI": mongo_uri, "OTPGATE_KEYS": BOTH, "OTPGATE_DIRECTORY_DATABASE": database.name}
    result = await asyncio.to_thread(
        lambda: subprocess.run(
            [sys.executable, "-m", "services.cli.main", "keys", "rotate", "--service", "directory"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    )
    assert result.returncode == 0, result.stderr
    assert "directory.subscribers" in result.stderr  # the progress bar
    assert "re-sealed 3 values" in result.stdout and "recomputed 3 blind indexes" in result.stdout
    assert "older key ids can be retired" in result.stdout


async def test_values_written_with_an_old_key_meanwhile_are_reported(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    old, both = Keyring.parse(OLD_ONLY), Keyring.parse(BOTH)
    people = await seed(database, old, clock, 6)
    lagging = Directory(SubscriberStore(database), old, clock, [])  # a replica still sealing with k1
    runner = rotation(database, both, batch_size=2)
    first_user = next(iter(people))
    writes: list[int] = []

    def on_batch(count: int) -> None:
        writes.append(count)

    partial = await runner.run(max_batches=1, on_batch=on_batch)
    assert not partial.finished and writes == [2]
    assert await runner.resumable_scanned() == 2
    # Behind the run's position, the lagging replica re-links a number with k1.
    await lagging.link_contact("smsccode_bot", first_user, parse_phone(new_phone()))
    result = await runner.run(on_batch=on_batch)
    assert result.finished and result.resumed and writes == [2, 2, 2]
    assert result.remaining == {"phone": {"k1": 1}, "phone_index": {"k1": 1}}
    assert await runner.resumable_scanned() == 0  # finished: the next run is a fresh scan
    fresh = await runner.run()
    assert not fresh.resumed and fresh.run.resealed == 1 and fresh.remaining == {}

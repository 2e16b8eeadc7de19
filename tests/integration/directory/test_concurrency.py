"""Concurrent LinkContact calls never leave two records for one person or one number."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from otpgate.directory.v1 import directory_pb2 as pb
from otpgate.directory.v1 import directory_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import parse_rpc_error
from services.core.mongo import Document
from tests.integration.directory.conftest import new_phone, new_user_id
from tests.support.stack import running_stack

Stub = directory_pb2_grpc.DirectoryServiceStub
PARALLEL = 50


def request(user: int, phone: str, bot: str = "smsccode_bot") -> pb.LinkContactRequest:
    return pb.LinkContactRequest(bot_id=bot, telegram_user_id=user, contact_user_id=user, phone=phone)


async def assert_one_record_per_user_and_number(subscribers: AsyncCollection[Document]) -> list[Document]:
    docs = [doc async for doc in subscribers.find({})]
    users = [doc["telegram_user_id"] for doc in docs]
    indexes = [doc["phone_index"] for doc in docs]
    assert len(users) == len(set(users))
    assert len(indexes) == len(set(indexes))
    return docs


async def test_same_person_same_number_fifty_times(directory: Stub, subscribers: AsyncCollection[Document]) -> None:
    user, phone = new_user_id(), new_phone()
    bots = ["smsccode_bot", "smsc_code_bot", "smscodes_bot"]
    replies = await asyncio.gather(*(directory.LinkContact(request(user, phone, bots[i % 3])) for i in range(PARALLEL)))
    assert all(r.subscriber.telegram_user_id == user for r in replies)
    assert not any(r.number_changed or r.number_moved for r in replies)
    docs = await assert_one_record_per_user_and_number(subscribers)
    assert len(docs) == 1 and set(docs[0]["links"]) == set(bots)
    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert resolved.telegram_user_id == user


async def test_fifty_accounts_share_one_number(directory: Stub, subscribers: AsyncCollection[Document]) -> None:
    phone = new_phone()
    users = [new_user_id() for _ in range(PARALLEL)]
    replies = await asyncio.gather(*(directory.LinkContact(request(user, phone)) for user in users))
    assert len(replies) == PARALLEL  # every call succeeded
    docs = await assert_one_record_per_user_and_number(subscribers)
    assert len(docs) == 1  # one owner left: the number moved to the newest one each time
    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert resolved.telegram_user_id == docs[0]["telegram_user_id"] in users
    assert sum(r.number_moved for r in replies) >= 1


async def test_one_person_shares_fifty_numbers(directory: Stub, subscribers: AsyncCollection[Document]) -> None:
    user = new_user_id()
    phones = [new_phone() for _ in range(PARALLEL)]
    await asyncio.gather(*(directory.LinkContact(request(user, phone)) for phone in phones))
    docs = await assert_one_record_per_user_and_number(subscribers)
    assert len(docs) == 1
    found = [phone for phone in phones if (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))).found]
    assert len(found) == 1  # exactly one number is linked, the others were replaced


async def test_crossing_people_and_numbers(directory: Stub, subscribers: AsyncCollection[Document]) -> None:
    users = [new_user_id() for _ in range(5)]
    phones = [new_phone() for _ in range(5)]
    calls = [directory.LinkContact(request(users[i % 5], phones[(i * 3) % 5])) for i in range(PARALLEL)]
    await asyncio.gather(*calls)
    docs = await assert_one_record_per_user_and_number(subscribers)
    assert 1 <= len(docs) <= 5
    holders = {}
    for phone in phones:
        resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
        if resolved.found:
            holders[phone] = resolved.telegram_user_id
    assert len(holders) == len(docs)
    assert len(set(holders.values())) == len(holders)


async def test_two_replicas_keep_one_record_per_user_and_number(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    """Across replicas only the unique indexes (and the retry on DuplicateKeyError) keep records single."""
    shared = {"OTPGATE_DIRECTORY_DATABASE": f"t_directory_{uuid.uuid4().hex[:8]}"}
    async with (
        running_stack(mongo_client, keyring, ["directory"], overrides=shared, clock=clock) as one,
        running_stack(mongo_client, keyring, ["directory"], overrides=shared, clock=clock) as two,
    ):
        stubs = [directory_pb2_grpc.DirectoryServiceStub(s.channel("directory")) for s in (one, two)]
        user, phone = new_user_id(), new_phone()
        same = [stubs[i % 2].LinkContact(request(user, phone)) for i in range(PARALLEL)]
        assert len(await asyncio.gather(*same)) == PARALLEL
        users = [new_user_id() for _ in range(10)]
        phones = [new_phone() for _ in range(10)]
        crossing = [stubs[i % 2].LinkContact(request(users[i % 10], phones[(i * 7) % 10])) for i in range(PARALLEL)]
        outcomes = await asyncio.gather(*crossing, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                # Heavy contention across replicas may exhaust the retries: a clean, retryable refusal.
                assert isinstance(outcome, grpc.aio.AioRpcError)
                assert parse_rpc_error(outcome).reason == "CONCURRENT_UPDATE"
        collection = mongo_client[shared["OTPGATE_DIRECTORY_DATABASE"]]["subscribers"]
        docs = await assert_one_record_per_user_and_number(collection)
        assert any(doc["telegram_user_id"] == user for doc in docs)

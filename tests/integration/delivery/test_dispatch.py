"""Reliable dispatch across replicas: no double sends, nothing lost when a dispatcher dies."""

from __future__ import annotations

import asyncio
from collections import Counter

from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.delivery.support import (
    QUIET,
    delivery_replica,
    engine_of,
    replica_engine,
    sms_request,
    stubs,
    ttl,
)
from tests.support.stack import running_stack

QUEUE_ONLY = {
    **QUIET,
    "OTPGATE_DELIVERY_INLINE_DISPATCH": "false",
    "OTPGATE_DELIVERY_BATCH": "7",
    "OTPGATE_FRAUD_MODE": "off",
}


def _phones(n: int) -> list[str]:
    return [f"+7999{i:03d}{i:04d}" for i in range(n)]


async def _receipts(mongo_client: AsyncMongoClient[Document], database: str) -> Counter[str]:
    coll = mongo_client[database]["sandbox_sms"]
    return Counter([str(doc["message_id"]) async for doc in coll.find({}, {"message_id": 1})])


async def test_two_dispatchers_never_send_the_same_message_twice(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUEUE_ONLY, clock=clock) as stack:
        delivery, _ = stubs(stack)
        ids = [(await delivery.SendMessage(sms_request(p))).message.id for p in _phones(24)]
        async with delivery_replica(mongo_client, stack, clock) as second:
            first_engine, second_engine = engine_of(stack), replica_engine(second)
            tried = [0, 0]
            for _ in range(6):
                a, b = await asyncio.gather(first_engine.dispatch_due_once(), second_engine.dispatch_due_once())
                tried[0] += a
                tried[1] += b
                if a == b == 0:
                    break
            receipts = await _receipts(mongo_client, stack.env["OTPGATE_DELIVERY_DATABASE"])
            assert sorted(receipts) == sorted(ids) and set(receipts.values()) == {1}
            assert sum(tried) == 24 and min(tried) > 0
        for message_id in ids[:3]:
            got = await delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message_id))
            assert got.message.status == common_pb2.MESSAGE_STATUS_DELIVERED and got.message.attempts == 1


async def test_replicas_claiming_at_the_same_moment_split_the_queue(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUEUE_ONLY, clock=clock) as stack:
        delivery, _ = stubs(stack)
        for phone in _phones(24):
            await delivery.SendMessage(sms_request(phone))
        async with delivery_replica(mongo_client, stack, clock) as second:
            # Both read the same seven oldest candidates; whichever loses some looks past them.
            first, other = await asyncio.gather(engine_of(stack).claim_due(), replica_engine(second).claim_due())
            mine, theirs = {r.id for r, _ in first}, {r.id for r, _ in other}
            assert mine and theirs and not mine & theirs
            assert len(mine | theirs) >= 7


async def test_a_dispatcher_killed_mid_dispatch_loses_nothing_and_the_survivor_finishes(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUEUE_ONLY, clock=clock) as stack:
        delivery, _ = stubs(stack)
        ids = [(await delivery.SendMessage(sms_request(p))).message.id for p in _phones(10)]
        survivor = engine_of(stack)
        async with delivery_replica(mongo_client, stack, clock) as doomed:
            claimed = await replica_engine(doomed).claim_due()
            assert len(claimed) == 7
            # The process dies here: it holds leases but never sends nor releases them.
        assert await survivor.dispatch_due_once() == 3
        receipts = await _receipts(mongo_client, stack.env["OTPGATE_DELIVERY_DATABASE"])
        assert len(receipts) == 3
        clock.advance(29)
        assert await survivor.dispatch_due_once() == 0  # leases still valid
        clock.advance(2)
        assert await survivor.dispatch_due_once() == 7
        receipts = await _receipts(mongo_client, stack.env["OTPGATE_DELIVERY_DATABASE"])
        assert sorted(receipts) == sorted(ids) and set(receipts.values()) == {1}


async def test_the_background_loop_sends_queued_messages_on_its_own(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {**QUEUE_ONLY, "OTPGATE_DELIVERY_DISPATCHER": "true", "OTPGATE_DELIVERY_POLL_INTERVAL": "0.02"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        sent = await delivery.SendMessage(sms_request("+79991234567"))
        assert sent.message.status == common_pb2.MESSAGE_STATUS_QUEUED
        request = delivery_pb2.GetMessageRequest(client_id="shop", id=sent.message.id)
        deadline = asyncio.get_running_loop().time() + 5
        while (await delivery.GetMessage(request)).message.status != common_pb2.MESSAGE_STATUS_DELIVERED:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)


async def test_queued_messages_expire_after_their_ttl_and_texts_are_purged(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUEUE_ONLY, clock=clock) as stack:
        delivery, _ = stubs(stack)
        engine = engine_of(stack)
        queued = await delivery.SendMessage(sms_request("+79991234567", ttl=ttl(60)))
        clock.advance(61)
        assert await engine.expire_due_once() == 1
        db = mongo_client[stack.env["OTPGATE_DELIVERY_DATABASE"]]
        doc = await db["messages"].find_one({"_id": queued.message.id})
        assert doc is not None and doc["status"] == common_pb2.MESSAGE_STATUS_EXPIRED
        assert doc["failure_reason"] == common_pb2.FAILURE_REASON_TTL_EXPIRED and doc["text"] is not None
        clock.advance(86401)
        await engine.purge_once()
        doc = await db["messages"].find_one({"_id": queued.message.id})
        assert doc is not None and doc["text"] is None and doc["phone"] is None
        assert not await _receipts(mongo_client, stack.env["OTPGATE_DELIVERY_DATABASE"])


async def test_usage_is_kept_for_its_retention_then_purged(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    kept = {**QUEUE_ONLY, "OTPGATE_DELIVERY_USAGE_RETENTION_DAYS": "30"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=kept, clock=clock) as stack:
        delivery, _ = stubs(stack)
        engine = engine_of(stack)
        sent = await delivery.SendMessage(sms_request("+79991234568"))
        await engine.dispatch_due_once()
        day = clock.now().date().isoformat()
        usage = delivery_pb2.GetUsageRequest(client_id="shop", start_day=day, end_day=day)
        assert sum(r.messages for r in (await delivery.GetUsage(usage)).records) == 1, sent.message.id
        clock.advance(29 * 86400)
        await engine.purge_once()
        assert sum(r.messages for r in (await delivery.GetUsage(usage)).records) == 1
        clock.advance(2 * 86400)
        await engine.purge_once()
        assert not (await delivery.GetUsage(usage)).records


async def test_limits_are_shared_by_two_delivery_processes(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    from otpgate.delivery.v1 import delivery_pb2_grpc

    from services.core.grpc_client import make_channel
    from tests.integration.delivery.support import refused

    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        first, _ = stubs(stack)
        async with delivery_replica(mongo_client, stack, clock) as other:
            channel = make_channel(other.address, [delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"]])
            try:
                second = delivery_pb2_grpc.DeliveryServiceStub(channel)
                replies = await asyncio.gather(
                    *[(first if i % 2 else second).SendMessage(sms_request("+79991234567", f"n{i}")) for i in range(5)]
                )
                assert len({r.message.id for r in replies}) == 5
                for stub in (first, second):
                    failure = await refused(stub.SendMessage(sms_request("+79991234567", "one too many")))
                    assert failure.reason == "RATE_LIMITED"
            finally:
                await channel.close()

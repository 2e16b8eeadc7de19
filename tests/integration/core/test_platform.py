"""Core platform against the real dev database and real gRPC."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.core.clock import ManualClock
from services.core.devdb import DevDatabase, free_port
from services.core.grpc_client import make_channel
from services.core.grpc_server import ServiceApp, start_service
from services.core.metrics import start_metrics_server
from services.core.mongo import Document, connect, ensure_index, purge_before

DIRECTORY = directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]


async def test_indexes_one_per_call_and_ttl_tolerated(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    assert await ensure_index(database.items, [("key", 1)], unique=True) is True
    ttl = await ensure_index(database.items, [("expire_at", 1)], expire_after_seconds=0)
    names = [index["name"] async for index in await database.items.list_indexes()]
    assert "key_1" in names
    assert ttl is False or "expire_at_1" in names
    now = clock.now()
    await database.items.insert_many(
        [{"key": 1, "expire_at": now - timedelta(seconds=1)}, {"key": 2, "expire_at": now + timedelta(hours=1)}]
    )
    assert await purge_before(database.items, "expire_at", now) == 1
    assert [d["key"] async for d in database.items.find({})] == [2]


async def test_indexes_keep_their_contract(database: AsyncDatabase[Document]) -> None:
    """Whatever the server builds underneath (the dev database builds unique indexes on JSON text
    and the others on SQL values), every index is listed and dropped as asked, unique ones are
    enforced and queries answer the same."""
    items = database.indexed
    await ensure_index(items, [("kind", 1), ("at", -1)])
    await ensure_index(items, [("code", 1)], unique=True)
    await items.insert_many([{"_id": f"i{n}", "kind": n % 2, "at": n, "code": f"c{n}"} for n in range(6)])
    with pytest.raises(DuplicateKeyError):
        await items.insert_one({"_id": "dup", "kind": 0, "at": 9, "code": "c3"})
    names = {index["name"] async for index in await items.list_indexes()}
    assert {"_id_", "kind_1_at_-1", "code_1"} <= names
    found = [d["_id"] async for d in items.find({"kind": 1, "at": {"$gte": 2}}).sort("at", -1)]
    assert found == ["i5", "i3"]
    await items.drop_index("kind_1_at_-1")
    names = {index["name"] async for index in await items.list_indexes()}
    assert "kind_1_at_-1" not in names and "code_1" in names
    assert await items.count_documents({"kind": 0}) == 3


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=DIRECTORY.full_name)
        )
        return int(reply.status)


async def _wait_for(address: str, status: int, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (current := await _health(address)) != status:
        assert asyncio.get_running_loop().time() < deadline, f"health stayed {current}"
        await asyncio.sleep(0.05)


async def test_health_follows_the_database() -> None:
    with DevDatabase() as devdb:
        client = connect(devdb.uri, "health-test", timeout_ms=500)
        app = ServiceApp(
            name="directory",
            servicers=[
                (
                    directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
                    directory_pb2_grpc.DirectoryServiceServicer(),
                    DIRECTORY.full_name,
                )
            ],
            database=client.health,
            health_interval=0.1,
        )
        running = await start_service(app, "127.0.0.1", 0)
        try:
            await _wait_for(running.address, health_pb2.HealthCheckResponse.SERVING)
            devdb.stop()
            await _wait_for(running.address, health_pb2.HealthCheckResponse.NOT_SERVING)
        finally:
            await running.stop(0)
            await client.close()


async def test_metrics_use_go_grpc_prometheus_names() -> None:
    app = ServiceApp(
        name="directory",
        servicers=[
            (
                directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
                directory_pb2_grpc.DirectoryServiceServicer(),
                DIRECTORY.full_name,
            )
        ],
    )
    running = await start_service(app, "127.0.0.1", 0)
    port = start_metrics_server(0)
    try:
        channel = make_channel(running.address, [DIRECTORY])
        try:
            await directory_pb2_grpc.DirectoryServiceStub(channel).ResolvePhone(
                directory_pb2.ResolvePhoneRequest(phone="+79991234567")
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        await channel.close()
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        )
    finally:
        await running.stop(0)
    labels = 'grpc_code="Unimplemented",grpc_method="ResolvePhone",grpc_service="otpgate.directory.v1.DirectoryService",grpc_type="unary"'
    assert f"grpc_server_handled_total{{{labels}}}" in body
    assert f"grpc_client_handled_total{{{labels}}}" in body
    assert "grpc_server_handling_seconds_bucket" in body
    assert "grpc_client_handling_seconds_bucket" in body


async def test_idempotent_calls_retry_through_a_restart_of_the_server() -> None:
    """UNAVAILABLE on an idempotent method is retried by the channel's retry policy."""
    port = free_port()
    calls = 0

    class Directory(directory_pb2_grpc.DirectoryServiceServicer):
        async def ResolvePhone(self, request, context):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            return directory_pb2.ResolvePhoneResponse(found=True, telegram_user_id=7)

    app = ServiceApp(
        name="directory",
        servicers=[(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Directory(), DIRECTORY.full_name)],
    )
    running = await start_service(app, "127.0.0.1", port)
    try:
        channel = make_channel(running.address, [DIRECTORY])
        reply = await directory_pb2_grpc.DirectoryServiceStub(channel).ResolvePhone(
            directory_pb2.ResolvePhoneRequest(phone="+79991234567")
        )
        await channel.close()
    finally:
        await running.stop(0)
    assert reply.telegram_user_id == 7
    assert calls == 2


async def test_a_request_deadline_is_carried_to_the_calls_it_makes() -> None:
    """B is called by A with a 30 s timeout, but A's own caller gave A 1 s: B sees what is left."""
    seen: list[float] = []

    class Inner(directory_pb2_grpc.DirectoryServiceServicer):
        async def ResolvePhone(self, request, context):  # type: ignore[no-untyped-def]
            seen.append(context.time_remaining())
            return directory_pb2.ResolvePhoneResponse(found=True, telegram_user_id=1)

    inner = await start_service(
        ServiceApp(
            name="inner",
            servicers=[(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Inner(), DIRECTORY.full_name)],
        ),
        "127.0.0.1",
        0,
    )
    channel = make_channel(inner.address, [DIRECTORY], timeout=30.0)

    class Outer(directory_pb2_grpc.DirectoryServiceServicer):
        async def ResolvePhone(self, request, context):  # type: ignore[no-untyped-def]
            stub = directory_pb2_grpc.DirectoryServiceStub(channel)
            await stub.ResolvePhone(request)  # the channel's own 30 s
            return await stub.ResolvePhone(request, timeout=20.0)  # an explicit, longer one

    outer = await start_service(
        ServiceApp(
            name="outer",
            servicers=[(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Outer(), DIRECTORY.full_name)],
        ),
        "127.0.0.1",
        0,
    )
    try:
        async with grpc.aio.insecure_channel(outer.address) as caller:
            await directory_pb2_grpc.DirectoryServiceStub(caller).ResolvePhone(
                directory_pb2.ResolvePhoneRequest(phone="+79991234567"), timeout=1.0
            )
            # Without a deadline of its own, A's calls keep their own timeouts.
            await directory_pb2_grpc.DirectoryServiceStub(caller).ResolvePhone(
                directory_pb2.ResolvePhoneRequest(phone="+79991234567")
            )
    finally:
        await channel.close()
        await outer.stop(0)
        await inner.stop(0)
    assert len(seen) == 4
    assert all(0 < left < 1.0 for left in seen[:2])
    assert 25 < seen[2] <= 30.5 and 15 < seen[3] <= 20.5

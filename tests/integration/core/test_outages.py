"""A database outage is UNAVAILABLE with RetryInfo, fast, logged once; a body that is not a
protobuf is INVALID_ARGUMENT. A real gRPC server on a real dev database that is paused
(SIGSTOP, as a hung server) and killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.devdb import DevDatabase
from services.core.errors import parse_rpc_error
from services.core.grpc_server import RunningService, ServiceApp, start_service
from services.core.health import health_status
from services.core.mongo import Document, connect
from tests.conftest import LogCapture

DIRECTORY = directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]
REQUEST_TIMEOUT = 1.0


class ReadsTheDatabase(directory_pb2_grpc.DirectoryServiceServicer):
    """A method whose answer needs one database read, as every real one does."""

    def __init__(self, client: AsyncMongoClient[Document]) -> None:
        self._people = client.outage_test.people

    async def GetSubscriber(  # type: ignore[override]
        self, request: directory_pb2.GetSubscriberRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> directory_pb2.GetSubscriberResponse:
        found = await self._people.find_one({"_id": request.telegram_user_id})
        return directory_pb2.GetSubscriberResponse(
            subscriber=directory_pb2.Subscriber(telegram_user_id=found["_id"] if found else 0)
        )


@dataclass
class Stack:
    devdb: DevDatabase
    service: RunningService
    channel: grpc.aio.Channel

    async def call(self, timeout: float | None = 5.0) -> directory_pb2.GetSubscriberResponse:
        stub = directory_pb2_grpc.DirectoryServiceStub(self.channel)
        return await stub.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=7), timeout=timeout)

    async def health(self) -> int:
        return await health_status(self.channel, DIRECTORY.full_name)

    async def wait_health(self, status: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := await self.health()) != status:
            assert time.monotonic() < deadline, f"health stayed {current}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    devdb = DevDatabase()
    devdb.start()
    client = connect(devdb.uri, "outage-test")
    await client.outage_test.people.insert_one({"_id": 7})
    app = ServiceApp(
        name="directory",
        servicers=[
            (directory_pb2_grpc.add_DirectoryServiceServicer_to_server, ReadsTheDatabase(client), DIRECTORY.full_name)
        ],
        database=client.outage_test,
        health_interval=0.1,
    )
    service = await start_service(app, "127.0.0.1", 0, request_timeout=REQUEST_TIMEOUT)
    channel = grpc.aio.insecure_channel(service.address)
    try:
        yield Stack(devdb, service, channel)
    finally:
        assert devdb.process is not None
        if devdb.process.poll() is None:
            os.kill(devdb.process.pid, signal.SIGCONT)
        await channel.close()
        await service.stop(0)
        await client.close()
        devdb.stop()


def events(logs: LogCapture) -> list[dict[str, object]]:
    return [json.loads(line) for line in logs.text().splitlines() if line.startswith("{")]


async def expect_unavailable(stack: Stack, timeout: float | None) -> float:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.call(timeout)
    failure = parse_rpc_error(refused.value)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert failure.reason == "DATABASE_UNAVAILABLE"
    assert failure.retry_after == 1.0
    return time.monotonic() - started


async def test_a_paused_database_answers_unavailable_before_the_deadline(
    stack: Stack, captured_logs: LogCapture
) -> None:
    assert (await stack.call()).subscriber.telegram_user_id == 7
    await stack.wait_health(health_pb2.HealthCheckResponse.SERVING)
    assert stack.devdb.process is not None
    os.kill(stack.devdb.process.pid, signal.SIGSTOP)

    # A caller with a 3 s deadline learns of the outage with time to spare; one without a
    # deadline within the service's own request timeout.
    assert await expect_unavailable(stack, timeout=3.0) < 2.5
    assert await expect_unavailable(stack, timeout=None) < REQUEST_TIMEOUT + 0.5
    for _ in range(3):
        await expect_unavailable(stack, timeout=3.0)
    await stack.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    os.kill(stack.devdb.process.pid, signal.SIGCONT)
    await stack.wait_health(health_pb2.HealthCheckResponse.SERVING)
    assert (await stack.call()).subscriber.telegram_user_id == 7

    logged = events(captured_logs)
    names = [event["msg"] for event in logged]
    assert names.count("database_unavailable") == 1
    assert names.count("database_available") == 1
    assert "rpc_failed" not in names
    assert not any("exception" in event for event in logged)


async def test_a_killed_database_answers_unavailable_at_once(stack: Stack, captured_logs: LogCapture) -> None:
    assert (await stack.call()).subscriber.telegram_user_id == 7
    assert stack.devdb.process is not None
    stack.devdb.process.kill()
    stack.devdb.process.wait()
    for _ in range(3):
        assert (
            await expect_unavailable(stack, timeout=10.0) < REQUEST_TIMEOUT + 1.0
        )  # "within a second or two", not the driver's 30 s
    await stack.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert [event["msg"] for event in events(captured_logs)].count("database_unavailable") == 1


async def test_a_body_that_is_not_a_protobuf_is_invalid_argument(stack: Stack, captured_logs: LogCapture) -> None:
    raw = stack.channel.unary_unary(
        f"/{DIRECTORY.full_name}/GetSubscriber",
        request_serializer=lambda body: body,
        response_deserializer=lambda body: body,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw(b"\xff\xff\xff\xff", timeout=5)
    failure = parse_rpc_error(refused.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "MALFORMED_REQUEST"
    assert failure.field_violations == [
        ("", "the request body is not a valid otpgate.directory.v1.GetSubscriberRequest")
    ]
    assert "Traceback" not in captured_logs.text()
    # The server is fine afterwards.
    assert (await stack.call()).subscriber.telegram_user_id == 7

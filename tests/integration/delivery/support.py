"""Helpers for delivery's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import Clock
from services.core.config import Env, load_common
from services.core.errors import RpcFailure, parse_rpc_error
from services.core.grpc_server import RunningService, start_service
from services.core.mongo import Document
from services.delivery.app import build_app
from services.delivery.config import load_config
from services.delivery.engine import Engine
from tests.support.stack import Stack

T = TypeVar("T")

# Quiet stacks: no background loops (tests run dispatcher passes themselves), and a fraud guard that
# decides and logs but lets through, so tests of other things may send many SMS into one range
# (tests/integration/delivery/test_fraud_guard.py runs it in block mode).
QUIET = {"OTPGATE_DELIVERY_DISPATCHER": "false", "OTPGATE_FRAUD_MODE": "monitor"}


async def refused(call: Awaitable[Any]) -> RpcFailure:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return parse_rpc_error(error)
    raise AssertionError("the call succeeded but a refusal was expected")


def engine_of(stack: Stack) -> Engine:
    engine: Engine = stack.app("delivery").runtime.engine
    return engine


def stubs(
    stack: Stack,
) -> tuple[delivery_pb2_grpc.DeliveryServiceAsyncStub, delivery_pb2_grpc.SmsSandboxServiceAsyncStub]:
    channel = stack.channel("delivery")
    return delivery_pb2_grpc.DeliveryServiceStub(channel), delivery_pb2_grpc.SmsSandboxServiceStub(channel)  # type: ignore[return-value]


def sms_request(phone: str, text: str = "Your code is 123456", **fields: Any) -> delivery_pb2.SendMessageRequest:
    request = delivery_pb2.SendMessageRequest(
        client_id=fields.pop("client_id", "shop"),
        phone=phone,
        text=text,
        channel=fields.pop("channel", common_pb2.CHANNEL_SMS),
        **fields,
    )
    return request


def ttl(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


@asynccontextmanager
async def delivery_replica(
    client: AsyncMongoClient[Document], stack: Stack, clock: Clock, **overrides: str
) -> AsyncIterator[RunningService]:
    """A second delivery process on the same database as `stack` (its own port, its own claims owner)."""
    env = {**stack.env, "OTPGATE_DELIVERY_PORT": "0", **overrides}
    reader = Env(env, service="delivery")
    common = load_common("delivery", reader)
    config = load_config(reader)
    reader.check()
    app = await build_app(common, config, client, clock)
    running = await start_service(app, common.host, common.port)
    try:
        yield running
    finally:
        await running.stop(0)


def replica_engine(running: RunningService) -> Engine:
    engine: Engine = running.app.runtime.engine  # type: ignore[attr-defined]
    return engine

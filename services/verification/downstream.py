"""Calls to other otpgate services: one place that turns their failures into ours."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.core.errors import RpcFailure, ServiceError, parse_rpc_error, service_error_from

R = TypeVar("R")


class DownstreamError(Exception):
    """A failed call to another service, parsed; `.service_error()` passes it on unchanged."""

    def __init__(self, failure: RpcFailure) -> None:
        super().__init__(failure.reason or failure.code.name)
        self.failure = failure

    @property
    def reason(self) -> str:
        return self.failure.reason or self.failure.code.name

    @property
    def code(self) -> grpc.StatusCode:
        return self.failure.code

    def service_error(self) -> ServiceError:
        return service_error_from(self.failure)


async def call(rpc: Callable[[], Awaitable[R]]) -> R:
    try:
        return await rpc()
    except grpc.aio.AioRpcError as err:
        raise DownstreamError(parse_rpc_error(err)) from None


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=round((seconds - int(seconds)) * 1e9))

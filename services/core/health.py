"""Client side of grpc.health.v1: is a service SERVING?"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> int:
    """The status code of `service` ("" = the whole server); raises grpc.aio.AioRpcError when unreachable."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the published stubs omit the stub's methods
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return int(reply.status)


async def is_serving(address: str, service: str = "", timeout: float = 1.0) -> bool:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            return await health_status(channel, service, timeout) == SERVING
    except grpc.aio.AioRpcError:
        return False

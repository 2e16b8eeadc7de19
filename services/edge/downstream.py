"""Calls from the edge to the services behind it: who is calling, and one call with a deadline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from services.core.errors import ServiceError, parse_rpc_error, retry_info, service_error_from
from services.core.logging import get_logger
from services.core.outage import RETRY_AFTER

R = TypeVar("R")
log = get_logger(__name__)
_TRANSPORT_CODES = {
    grpc.StatusCode.UNAVAILABLE: ("SERVICE_UNAVAILABLE", "a service is temporarily unavailable; retry"),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("DEADLINE_EXCEEDED", "the request took too long; retry"),
    grpc.StatusCode.UNKNOWN: ("INTERNAL", "internal error"),
    grpc.StatusCode.INTERNAL: ("INTERNAL", "internal error"),
    grpc.StatusCode.CANCELLED: ("CANCELLED", "the request was cancelled"),
}
# Transport failures worth retrying carry RetryInfo (HTTP: Retry-After).
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class Caller:
    """What the transport knows about a request before it is authenticated."""

    authorization: str
    ip: str
    # Seconds left for downstream calls (the caller's deadline, capped by the service default).
    timeout: float


async def forward(call: Callable[..., Awaitable[R]], request: Message, timeout: float) -> R:
    """One downstream call with a deadline; its error passes on unchanged."""
    try:
        return await call(request, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        failure = parse_rpc_error(error)
    if failure.status is None and failure.code in _TRANSPORT_CODES:
        # Raised by gRPC itself (no otpgate status): its text names internal addresses; keep it in the logs.
        log.warning("downstream_failed", status=failure.code.name, detail=failure.message[:200])
        details = [retry_info(RETRY_AFTER)] if failure.code in _RETRYABLE else []
        raise ServiceError(failure.code, *_TRANSPORT_CODES[failure.code], details)
    raise service_error_from(failure)

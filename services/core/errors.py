"""The rich gRPC error model: google.rpc.Status with typed details and ErrorInfo.

Domain code raises ServiceError (or uses the helpers below); the server wrapping (grpc_server.py)
turns it into a status. Callers read statuses back with parse_rpc_error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "otpgate"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ServiceError(Exception):
    """An expected failure with a gRPC code, an UPPER_SNAKE reason and typed details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        details: Sequence[Message] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = list(details)
        self.metadata = metadata or {}

    def to_status_proto(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        for detail in [info, *self.details]:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return status

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


def invalid_argument(violations: Iterable[tuple[str, str]], reason: str = "INVALID_ARGUMENT") -> ServiceError:
    pairs = list(violations)
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in pairs]
    )
    summary = "; ".join(f"{f}: {d}" for f, d in pairs) or "invalid request"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, summary, [bad])


def not_found(what: str, reason: str = "NOT_FOUND") -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, f"{what} not found")


def already_exists(message: str, reason: str = "ALREADY_EXISTS") -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, reason, message)


def aborted(message: str, reason: str = "CONFLICT", retry_after: float | None = None) -> ServiceError:
    details = [retry_info(retry_after)] if retry_after is not None else []
    return ServiceError(grpc.StatusCode.ABORTED, reason, message, details)


def permission_denied(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, reason, message)


def unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def unavailable(reason: str, message: str, retry_after: float | None = None) -> ServiceError:
    details = [retry_info(retry_after)] if retry_after is not None else []
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, details)


def failed_precondition(reason: str, message: str, violations: Iterable[tuple[str, str, str]] = ()) -> ServiceError:
    """violations: (type, subject, description), e.g. ("CAPTCHA", "captcha_token", "required")."""
    pairs = list(violations) or [(reason, "", message)]
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(type=t, subject=s, description=d) for t, s, d in pairs
        ]
    )
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, [failure])


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = max(0, math.ceil(seconds))
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=whole))


def resource_exhausted(
    reason: str, message: str, retry_after: float, violations: Iterable[tuple[str, str]] = ()
) -> ServiceError:
    """violations: (subject, description), e.g. ("phone", "5 per 10 minutes")."""
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=s, description=d) for s, d in violations]
    )
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, [quota, retry_info(retry_after)])


@dataclass
class RpcFailure:
    """A status read back from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    status: status_pb2.Status | None = None


def parse_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> RpcFailure:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    failure = RpcFailure(code=code, message=(error.details() if hasattr(error, "details") else str(error)) or "")
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else _status_from_aio(error)
    if status is None:
        return failure
    failure.status = status
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            failure.reason, failure.metadata = info.reason, dict(info.metadata)
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            failure.retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            failure.field_violations = [(v.field, v.description) for v in bad.field_violations]
    return failure


def _status_from_aio(error: object) -> status_pb2.Status | None:
    trailing = getattr(error, "trailing_metadata", lambda: None)()
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def service_error_from(failure: RpcFailure) -> ServiceError:
    """Pass a downstream failure on unchanged (same code, reason and details)."""
    if failure.status is not None:
        details: list[Message] = []
        for packed in failure.status.details:
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                continue
            for kind in (
                error_details_pb2.BadRequest,
                error_details_pb2.QuotaFailure,
                error_details_pb2.RetryInfo,
                error_details_pb2.PreconditionFailure,
            ):
                if packed.Is(kind.DESCRIPTOR):
                    detail = kind()
                    packed.Unpack(detail)
                    details.append(detail)
        return ServiceError(
            failure.code, failure.reason or failure.code.name, failure.message, details, failure.metadata
        )
    return ServiceError(failure.code, failure.reason or failure.code.name, failure.message)


GRPC_TO_HTTP = {
    code_pb2.OK: 200,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.FAILED_PRECONDITION: 412,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.ABORTED: 409,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.CANCELLED: 499,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DEADLINE_EXCEEDED: 504,
}


def http_status_for(code: grpc.StatusCode) -> int:
    return GRPC_TO_HTTP.get(code.value[0], 500)


class Violations:
    """Collects field violations, then raises one INVALID_ARGUMENT with all of them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field_path: str, description: str) -> None:
        self.items.append((field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> bool:
        if not ok:
            self.add(field_path, description)
        return ok

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from services.core import errors


def _unpack(status, kind):  # type: ignore[no-untyped-def]
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            return detail
    raise AssertionError(f"no {kind.__name__}")


def test_every_error_carries_error_info_with_domain() -> None:
    err = errors.permission_denied("CONTACT_NOT_OWN", "share your own contact")
    info = _unpack(err.to_status_proto(), error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("CONTACT_NOT_OWN", "otpgate")
    assert err.code == grpc.StatusCode.PERMISSION_DENIED


def test_resource_exhausted_has_quota_and_retry_info() -> None:
    status = errors.resource_exhausted(
        "RATE_LIMITED", "slow down", 12.2, [("phone", "5 per 10 minutes")]
    ).to_status_proto()
    assert _unpack(status, error_details_pb2.RetryInfo).retry_delay.seconds == 13
    quota = _unpack(status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [("phone", "5 per 10 minutes")]


def test_precondition_and_bad_request_details() -> None:
    status = errors.failed_precondition(
        "CAPTCHA_REQUIRED", "solve a captcha", [("CAPTCHA", "captcha_token", "required")]
    ).to_status_proto()
    violation = _unpack(status, error_details_pb2.PreconditionFailure).violations[0]
    assert (violation.type, violation.subject) == ("CAPTCHA", "captcha_token")
    violations = errors.Violations()
    violations.check(False, "phone", "must be E.164")
    violations.check(True, "text", "never added")
    try:
        violations.raise_if_any()
        raise AssertionError("expected an error")
    except errors.ServiceError as err:
        bad = _unpack(err.to_status_proto(), error_details_pb2.BadRequest)
        assert [(v.field, v.description) for v in bad.field_violations] == [("phone", "must be E.164")]


def test_http_mapping() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.FAILED_PRECONDITION: 412,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.INTERNAL: 500,
    }
    assert {code: errors.http_status_for(code) for code in expected} == expected

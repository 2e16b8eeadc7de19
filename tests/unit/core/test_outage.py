from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WriteError,
)

from services.core.outage import OutageLog, is_database_outage, request_budget
from tests.conftest import LogCapture


@pytest.mark.parametrize(
    "error",
    [
        ServerSelectionTimeoutError("no server"),
        AutoReconnect("connection closed"),
        NetworkTimeout("timed out"),
        NotPrimaryError("not primary"),
        WaitQueueTimeoutError("pool full"),
        ExecutionTimeout("operation exceeded time limit", 50),
        OperationFailure("interrupted at shutdown", 11600),
        OperationFailure("primary stepped down", 189),
    ],
)
def test_outages_are_recognised(error: Exception) -> None:
    assert is_database_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        DuplicateKeyError("E11000", 11000),
        WriteError("document failed validation", 121),
        OperationFailure("bad value", 2),
        ValueError("not a database error"),
    ],
)
def test_other_errors_are_not_outages(error: Exception) -> None:
    assert not is_database_outage(error)


def test_the_budget_leaves_time_to_answer_and_is_capped() -> None:
    assert request_budget(None, 5.0) == 5.0
    assert request_budget(30.0, 5.0) == 5.0
    assert request_budget(2.0, 5.0) == pytest.approx(1.75)
    assert request_budget(0.1, 5.0) == pytest.approx(0.05)


def test_an_outage_is_answered_unavailable_and_logged_once(captured_logs: LogCapture) -> None:
    outages = OutageLog()
    assert outages.answer(DuplicateKeyError("E11000", 11000)) is None
    answers = [outages.answer(AutoReconnect("down")) for _ in range(5)]
    assert outages.ongoing
    outages.reachable()
    outages.reachable()
    assert not outages.ongoing
    for answer in answers:
        assert answer is not None
        assert (answer.code, answer.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        [retry] = [d for d in answer.details if isinstance(d, error_details_pb2.RetryInfo)]
        assert retry.retry_delay.seconds == 1
    text = captured_logs.text()
    assert text.count('"database_unavailable"') == 1
    assert text.count('"database_available"') == 1

"""Which failed bot sends may still have reached the person (and so pin the message to their bot)."""

from __future__ import annotations

import grpc
import pytest

from services.core.errors import RpcFailure
from services.delivery.legs import outcome_unknown

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("failure", "unknown"),
    [
        (RpcFailure(S.DEADLINE_EXCEEDED, "Deadline Exceeded"), True),
        (RpcFailure(S.UNAVAILABLE, "the message may be sent", reason="SEND_OUTCOME_UNKNOWN"), True),
        (RpcFailure(S.UNAVAILABLE, "Socket closed"), True),  # botgateway died with the call out
        (RpcFailure(S.UNKNOWN, "Exception calling application"), True),
        (RpcFailure(S.INTERNAL, "internal error"), True),
        (RpcFailure(S.CANCELLED, "Cancelled"), True),
        # Nothing went out: the channel never connected, or botgateway refused before sending.
        (RpcFailure(S.UNAVAILABLE, "failed to connect to all addresses; last error: ..."), False),
        (RpcFailure(S.UNAVAILABLE, "no live session", reason="BOT_UNAVAILABLE"), False),
        (RpcFailure(S.UNAVAILABLE, "database unavailable", reason="DATABASE_UNAVAILABLE"), False),
        (RpcFailure(S.RESOURCE_EXHAUSTED, "rate", reason="BOT_RATE_LIMITED"), False),
        (RpcFailure(S.FAILED_PRECONDITION, "blocked", reason="BLOCKED_BY_USER"), False),
        (RpcFailure(S.NOT_FOUND, "no such bot", reason="BOT_NOT_FOUND"), False),
        (RpcFailure(S.INVALID_ARGUMENT, "text", reason="INVALID_ARGUMENT"), False),
    ],
)
def test_outcome_unknown(failure: RpcFailure, unknown: bool) -> None:
    assert outcome_unknown(failure) is unknown

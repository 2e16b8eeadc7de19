"""The deadline of the request being served, carried to the calls it makes.

A caller's deadline covers everything its request causes: when edge gives delivery 5 s and
delivery has used 2 of them, delivery's call to directory gets the 3 s that are left, not a fresh
OTPGATE_RPC_TIMEOUT. The server side (grpc_server.py) records the moment a request must be
answered by; the channel (grpc_client.py) gives each outgoing call the smaller of its
own timeout and what is left, less a moment to answer in. Work started in a fresh context
(background loops, batched inserts, releases after an answer) has no such deadline.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

# time.monotonic() by which the request being served must be answered; None: no deadline.
_answer_by: ContextVar[float | None] = ContextVar("answer_by", default=None)
# Kept back from what is left, for the caller to read the answer and reply itself.
ANSWER_MARGIN = 0.05


def serve_until(time_remaining: float | None) -> Token[float | None]:
    """Record the deadline of the request about to be served (reset with the returned token)."""
    return _answer_by.set(None if time_remaining is None else time.monotonic() + time_remaining)


def reset(token: Token[float | None]) -> None:
    _answer_by.reset(token)


def call_timeout(timeout: float) -> float:
    """The timeout for an outgoing call: `timeout`, shortened to what the request being served has left."""
    answer_by = _answer_by.get()
    if answer_by is None:
        return timeout
    return max(0.001, min(timeout, answer_by - time.monotonic() - ANSWER_MARGIN))

"""A database outage is UNAVAILABLE with retry guidance, in every service, on every path.

When MongoDB cannot be reached, PyMongo raises its connection errors: ServerSelectionTimeoutError
(no server found in time), AutoReconnect and its kin NetworkTimeout and NotPrimaryError (a
connection broke, a read timed out, the primary stepped down), WaitQueueTimeoutError (no free
connection), and OperationFailure with a shutdown or step-down code. None of them is a bug of the
request: the same request succeeds once the database is back. So every service maps them here,
in one place, to UNAVAILABLE + RetryInfo (the edge serves that as HTTP 503 with Retry-After),
never INTERNAL, and without a traceback per request: one warning when an outage begins, one
line when it ends (the health watcher in services/core/grpc_server.py notices the end and turns
health back to SERVING).

A request must learn of an outage before its caller gives up, so each one runs its database
operations under a PyMongo timeout taken from its own deadline (`database_deadline`): server
selection and every read give up a little before the caller would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pymongo
from pymongo.errors import ConnectionFailure, ExecutionTimeout, OperationFailure, PyMongoError

from services.core import metrics
from services.core.errors import ServiceError, unavailable
from services.core.logging import get_logger

log = get_logger(__name__)

RETRY_AFTER = 1.0
# Server codes of a node that is shutting down, stepping down or not (yet) primary: retryable.
_UNAVAILABLE_CODES = frozenset({91, 189, 10107, 11600, 11602, 13435, 13436})
# Time kept back from a request's deadline to answer it after the database gave up.
_ANSWER_MARGIN = 0.25
_MIN_BUDGET = 0.05


def is_database_outage(error: BaseException) -> bool:
    """The database could not be reached or did not answer in time: retry later."""
    if isinstance(error, ConnectionFailure | ExecutionTimeout):
        return True
    if isinstance(error, OperationFailure):
        return error.code in _UNAVAILABLE_CODES
    return isinstance(error, PyMongoError) and error.timeout


def database_unavailable() -> ServiceError:
    return unavailable("DATABASE_UNAVAILABLE", "the service's database is unavailable; retry", RETRY_AFTER)


class OutageLog:
    """A service's view of its database's outages: each is logged once when it begins and once
    when it ends, with how long it lasted. One per service (ServiceApp.outages)."""

    def __init__(self) -> None:
        self._since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def answer(self, error: BaseException) -> ServiceError | None:
        """The UNAVAILABLE answer if `error` is a database outage (noted), else None."""
        if not is_database_outage(error):
            return None
        metrics.database_unavailable_total.inc()
        if self._since is None:
            self._since = time.monotonic()
            log.warning("database_unavailable", error=type(error).__name__)
        return database_unavailable()

    def reachable(self) -> None:
        """The database answered."""
        if self._since is not None:
            log.warning("database_available", outage_seconds=round(time.monotonic() - self._since, 1))
            self._since = None


def request_budget(time_remaining: float | None, cap: float) -> float:
    """Seconds a request's database operations may take: its deadline less a margin to answer in,
    at most `cap` (a request without a deadline gets `cap`)."""
    if time_remaining is None:
        return cap
    return max(_MIN_BUDGET, min(cap, time_remaining - _ANSWER_MARGIN))


@contextlib.contextmanager
def database_deadline(time_remaining: float | None, cap: float) -> Iterator[None]:
    """Run the block's database operations under the request's budget (PyMongo's client-side
    timeout: server selection, connection checkout, every read and write)."""
    with pymongo.timeout(request_budget(time_remaining, cap)):
        yield

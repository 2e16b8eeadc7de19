"""Shared fixtures: the real dev database, keys, clocks, log capture."""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.devdb import DevDatabase
from services.core.logging import configure_logging
from services.core.mongo import Document, connect

_LOG_STREAM = io.StringIO()


def pytest_configure(config: pytest.Config) -> None:
    # Every test's logs go through the production pipeline (JSON + redaction) into one buffer,
    # so suites can assert that nothing sensitive was ever logged.
    configure_logging("tests", "debug", stream=_LOG_STREAM)


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """MONGODB_URI if set, else a dev database started for this test session."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    with DevDatabase() as database:
        yield database.uri


@pytest.fixture(scope="session")
async def mongo_client(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[Document]]:
    client = connect(mongo_uri, "tests")
    yield client
    await client.close()


@pytest.fixture
async def database(mongo_client: AsyncMongoClient[Document]) -> AsyncIterator[AsyncDatabase[Document]]:
    """A fresh database per test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    await mongo_client.drop_database(name)


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.parse(",".join(Keyring.generate_spec(k) for k in ("k1", "k2")), primary_id="k2")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


class LogCapture:
    """What was logged since the capture began (JSON lines)."""

    def __init__(self) -> None:
        self._start = len(_LOG_STREAM.getvalue())

    def text(self) -> str:
        return _LOG_STREAM.getvalue()[self._start :]


@pytest.fixture
def captured_logs() -> LogCapture:
    return LogCapture()


@pytest.fixture(autouse=True)
def _session_log_capture() -> Iterator[None]:
    """Code under test (the CLI's main(), for one) may reconfigure logging; put the capture back."""
    yield
    handlers = logging.getLogger().handlers
    if not handlers or getattr(handlers[0], "stream", None) is not _LOG_STREAM:
        configure_logging("tests", "debug", stream=_LOG_STREAM)


@pytest.fixture
def own_logging() -> Iterator[None]:
    """For tests that configure logging themselves: the session capture is restored afterwards."""
    yield
    configure_logging("tests", "debug", stream=_LOG_STREAM)


def all_logs() -> str:
    """Everything logged so far in this test session."""
    return _LOG_STREAM.getvalue()

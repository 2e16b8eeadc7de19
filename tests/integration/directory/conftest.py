"""A running directory service (real gRPC, real dev database) and helpers for its tests."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator

import pytest
from otpgate.directory.v1 import directory_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.core.phone import parse_phone
from tests.support.stack import Stack, running_stack

_user_ids = itertools.count(random.randrange(10**9, 2 * 10**9), 7)


def new_user_id() -> int:
    return next(_user_ids)


# Every number the directory suite used, so the last test can prove none of them was ever logged.
USED_PHONES: list[str] = []


def new_phone() -> str:
    """A random valid Russian mobile number in E.164."""
    while True:
        e164 = f"+79{random.randrange(10**9):09d}"
        try:
            parse_phone(e164)
        except ValueError:
            continue
        USED_PHONES.append(e164)
        return e164


@pytest.fixture
async def stack(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[Stack]:
    async with running_stack(mongo_client, keyring, services=["directory"], clock=clock) as running:
        yield running


@pytest.fixture
async def directory(stack: Stack) -> directory_pb2_grpc.DirectoryServiceStub:
    # Async, so the channel is made inside the test's event loop whatever ran before.
    return directory_pb2_grpc.DirectoryServiceStub(stack.channel("directory"))


@pytest.fixture
def subscribers(stack: Stack, mongo_client: AsyncMongoClient[Document]) -> AsyncCollection[Document]:
    """The raw collection, to check what is really stored."""
    return mongo_client[stack.commons["directory"].database]["subscribers"]

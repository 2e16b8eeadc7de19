"""Fixtures for the verification domain against the real dev database.

The flows are built exactly as the service builds them; their channels to delivery and the
directory point at an address nobody serves, and these tests only use the parts that do not
call out (issuing, checking, cancelling, expiring). Anything that sends is tested in
tests/integration/verification with the real services.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.devdb import free_port
from services.core.grpc_client import make_channel
from services.core.mongo import Document
from services.verification.config import ConfirmationPolicy, VerifyPolicy
from services.verification.confirm import Confirmer
from services.verification.store import Store
from services.verification.verify import Verifier

PHONE = "+79991234567"


@pytest.fixture
async def store(database: AsyncDatabase[Document]) -> Store:
    store = Store(database)
    await store.ensure_indexes()
    return store


@pytest.fixture
async def flows(store: Store, keyring: Keyring, clock: ManualClock) -> AsyncIterator[tuple[Verifier, Confirmer]]:
    target = f"127.0.0.1:{free_port()}"
    delivery_channel = make_channel(target, [delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"]], timeout=0.2)
    directory_channel = make_channel(
        target, [directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]], timeout=0.2
    )
    delivery = delivery_pb2_grpc.DeliveryServiceStub(delivery_channel)
    directory = directory_pb2_grpc.DirectoryServiceStub(directory_channel)
    verifier = Verifier(store, keyring, clock, VerifyPolicy(), delivery)
    confirmer = Confirmer(store, keyring, clock, ConfirmationPolicy(), delivery, directory)
    yield verifier, confirmer
    await delivery_channel.close()
    await directory_channel.close()


@pytest.fixture
def verifier(flows: tuple[Verifier, Confirmer]) -> Verifier:
    return flows[0]


@pytest.fixture
def confirmer(flows: tuple[Verifier, Confirmer]) -> Confirmer:
    return flows[1]


def start_request(**fields: object) -> verification_pb2.StartVerificationRequest:
    values: dict[str, object] = {"client_id": "client-a", "phone": PHONE}
    values.update(fields)
    return verification_pb2.StartVerificationRequest(**values)  # type: ignore[arg-type]

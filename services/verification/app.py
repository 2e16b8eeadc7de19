"""Builds the verification service (used by `python -m services.verification` and tests)."""

from __future__ import annotations

from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import Clock, SystemClock
from services.core.config import CommonConfig
from services.core.grpc_client import make_channel
from services.core.grpc_server import ServiceApp
from services.core.mongo import Document
from services.verification.config import VerificationConfig, load_config
from services.verification.confirm import Confirmer
from services.verification.service import VerificationServicer
from services.verification.store import Store
from services.verification.sweeper import Sweeper
from services.verification.verify import Verifier

__all__ = ["build_app", "load_config"]

SERVICE_NAME = verification_pb2.DESCRIPTOR.services_by_name["VerificationService"].full_name


async def build_app(
    common: CommonConfig,
    config: VerificationConfig,
    client: AsyncMongoClient[Document],
    clock: Clock | None = None,
) -> ServiceApp:
    clock = clock or SystemClock()
    database = client[common.database]
    store = Store(database)
    await store.ensure_indexes()
    tls = common.tls if common.tls.enabled else None
    delivery_channel = make_channel(
        common.addresses["delivery"],
        [delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"]],
        timeout=common.rpc_timeout,
        tls=tls,
    )
    directory_channel = make_channel(
        common.addresses["directory"],
        [directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]],
        timeout=common.rpc_timeout,
        tls=tls,
    )
    delivery = delivery_pb2_grpc.DeliveryServiceStub(delivery_channel)
    directory = directory_pb2_grpc.DirectoryServiceStub(directory_channel)
    verifier = Verifier(store, common.keyring, clock, config.verify, delivery)
    confirmer = Confirmer(
        store,
        common.keyring,
        clock,
        config.confirmation,
        delivery,
        directory,
        failed_checks_per_hour=config.verify.failed_checks_per_hour,
    )
    for engine in (verifier.engine, confirmer.engine):
        await engine.adopt_slots()
    sweeper = Sweeper(store, verifier, confirmer, config.retention_days, config.sweep_interval)
    servicer = VerificationServicer(verifier, confirmer)

    async def close_channels() -> None:
        await delivery_channel.close()
        await directory_channel.close()

    app = ServiceApp(
        name="verification",
        servicers=[(verification_pb2_grpc.add_VerificationServiceServicer_to_server, servicer, SERVICE_NAME)],
        database=database,
        background=[sweeper.run],
        on_stop=[confirmer.drain, close_channels],
    )
    app.verifier = verifier  # type: ignore[attr-defined]
    app.confirmer = confirmer  # type: ignore[attr-defined]
    app.sweeper = sweeper  # type: ignore[attr-defined]
    return app

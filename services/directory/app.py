"""Wiring of the directory service: configuration, database, servicer, background jobs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from services.core.clock import Clock, SystemClock
from services.core.config import CommonConfig, Env
from services.core.grpc_server import ServiceApp
from services.core.logging import get_logger
from services.core.mongo import Document
from services.directory import metrics
from services.directory.service import DirectoryServicer
from services.directory.store import SubscriberStore
from services.directory.subscribers import Directory

log = get_logger(__name__)
SERVICE_NAME = directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name


@dataclass(frozen=True)
class DirectoryConfig:
    # Attempts of one LinkContact when the same person or number changes concurrently.
    link_attempts: int
    # How often the subscriber gauge is sampled, seconds (0: never).
    stats_interval: float


def load_config(env: Env) -> DirectoryConfig:
    return DirectoryConfig(
        link_attempts=env.integer(
            "OTPGATE_DIRECTORY_LINK_ATTEMPTS",
            25,
            "attempts of one LinkContact racing concurrent changes of the same person or number",
            min=1,
            max=1000,
        ),
        stats_interval=env.number(
            "OTPGATE_DIRECTORY_STATS_INTERVAL", 60.0, "seconds between samples of the subscriber count gauge", min=0
        ),
    )


async def build_app(
    common: CommonConfig,
    config: DirectoryConfig,
    client: AsyncMongoClient[Document],
    clock: Clock | None = None,
) -> ServiceApp:
    database = client[common.database]
    store = SubscriberStore(database)
    await store.ensure_indexes()
    directory = Directory(
        store, common.keyring, clock or SystemClock(), common.shared_bots, max_attempts=config.link_attempts
    )
    background = []
    if config.stats_interval > 0:

        async def sample_subscribers() -> None:
            while True:
                try:
                    metrics.subscribers.set(await store.count())
                except PyMongoError as exc:
                    log.warning("subscriber_count_failed", error=type(exc).__name__)
                await asyncio.sleep(config.stats_interval)

        background.append(sample_subscribers)
    return ServiceApp(
        name="directory",
        servicers=[
            (directory_pb2_grpc.add_DirectoryServiceServicer_to_server, DirectoryServicer(directory), SERVICE_NAME)
        ],
        database=database,
        background=background,
    )

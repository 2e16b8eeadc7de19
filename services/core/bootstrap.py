"""`python -m services.<name>`: configuration, logging, database, then the gRPC server."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pymongo import AsyncMongoClient

from services.core.clock import Clock, SystemClock
from services.core.config import CommonConfig, ConfigError, Env, load_common
from services.core.grpc_server import ServiceApp, run_service
from services.core.logging import configure_logging, get_logger
from services.core.mongo import Document, connect

C = TypeVar("C")
Build = Callable[[CommonConfig, C, AsyncMongoClient[Document], Clock], Awaitable[ServiceApp]]


def freeze_startup() -> None:
    """What start-up made (modules, protobuf descriptors, number metadata: some 60k objects) lives
    as long as the process: kept out of the collector's full passes, which would otherwise walk it
    all each time (about 25 ms on two cores, a pause every request in flight waits out)."""
    gc.collect()
    gc.freeze()


def service_main(name: str, load: Callable[[Env], C], build: Build[C]) -> None:
    env = Env(service=name)
    common = load_common(name, env)
    specific = load(env)
    try:
        env.check()
        if common.keyring is None:
            raise ConfigError("configuration is invalid:\n  - OTPGATE_KEYS is required")
    except ConfigError as exc:
        print(f"otpgate {name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(name, common.log_level)
    asyncio.run(_run(name, common, specific, build))


async def _run(name: str, common: CommonConfig, specific: C, build: Build[C]) -> None:
    client = connect(common.mongodb_uri, name)
    try:
        app = await build(common, specific, client, SystemClock())
        freeze_startup()
        await run_service(app, common)
    except Exception:
        get_logger(__name__).exception("service_crashed", service=name)
        raise
    finally:
        await client.close()

"""Start otpgate services in this process, on free ports, talking real gRPC to each other.

Every service package exposes the same two functions in services/<name>/app.py:

    def load_config(env: Env) -> <Name>Config
    async def build_app(common: CommonConfig, config: <Name>Config, client: AsyncMongoClient,
                        clock: Clock) -> ServiceApp

so tests build them exactly as `python -m services.<name>` does, only in-process.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from pymongo import AsyncMongoClient

from services.core.clock import Clock, SystemClock
from services.core.config import DEFAULT_PORTS, SIMULATOR, CommonConfig, Env, load_common
from services.core.crypto import Keyring
from services.core.devdb import free_port
from services.core.grpc_client import make_channel
from services.core.grpc_server import RunningService, start_service
from services.core.mongo import Document

# The simulated Telegram first: the gateway connects its bots to it at start.
ALL_SERVICES = ("telegramsim", "directory", "verification", "delivery", "botgateway", "edge")
PORTED = (*DEFAULT_PORTS, SIMULATOR)


@dataclass
class Stack:
    addresses: dict[str, str]
    running: dict[str, RunningService]
    configs: dict[str, Any]
    commons: dict[str, CommonConfig]
    env: dict[str, str]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, service: str) -> grpc.aio.Channel:
        """A client channel to one of the running services (closed with the stack)."""
        module = importlib.import_module(f"otpgate.{service}.v1.{service}_pb2")
        channel = make_channel(self.addresses[service], list(module.DESCRIPTOR.services_by_name.values()))
        self.channels.append(channel)
        return channel

    def app(self, service: str) -> Any:
        return self.running[service].app


def stack_env(mongo_uri: str, keyring_spec: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a whole stack: one fresh database per service, free ports."""
    suffix = uuid.uuid4().hex[:8]
    env = {
        "MONGODB_URI": mongo_uri,
        "OTPGATE_KEYS": keyring_spec,
        "OTPGATE_ENV": "dev",
        "OTPGATE_SANDBOX": "true",
        "OTPGATE_LOG_LEVEL": "debug",
    }
    for name in PORTED:
        port = free_port()
        env[f"OTPGATE_{name.upper()}_PORT"] = str(port)
        env[f"OTPGATE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"OTPGATE_{name.upper()}_METRICS_PORT"] = "0"
        env[f"OTPGATE_{name.upper()}_DATABASE"] = f"t_{name}_{suffix}"
    env["OTPGATE_EDGE_HTTP_PORT"] = str(free_port())
    env["OTPGATE_TELEGRAMSIM_GATEWAY_PORT"] = str(free_port())
    env.update(overrides or {})
    return env


@asynccontextmanager
async def running_stack(
    client: AsyncMongoClient[Document],
    keyring: Keyring | str,
    services: Sequence[str] = ALL_SERVICES,
    *,
    overrides: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    mongo_uri: str = "",
) -> AsyncIterator[Stack]:
    """Start `services` in-process; the others' addresses point at free ports nobody serves. A bot
    gateway in sandbox mode brings its Telegram: the simulated one starts first, as `make run` does."""
    spec = keyring if isinstance(keyring, str) else ",".join(_spec_of(keyring))
    uri = mongo_uri or _uri_of(client)
    env = stack_env(uri, spec, overrides)
    if "botgateway" in services and SIMULATOR not in services and env["OTPGATE_SANDBOX"] == "true":
        services = [SIMULATOR, *services]
    stack = Stack(addresses={}, running={}, configs={}, commons={}, env=env)
    for name in PORTED:
        stack.addresses[name] = env[f"OTPGATE_{name.upper()}_ADDR"]
    try:
        for name in services:
            module = importlib.import_module(f"services.{name}.app")
            reader = Env(env, service=name)
            common = load_common(name, reader)
            config = module.load_config(reader)
            reader.check()
            app = await module.build_app(common, config, client, clock or SystemClock())
            stack.commons[name], stack.configs[name] = common, config
            stack.running[name] = await start_service(app, common.host, common.port)
        yield stack
    finally:
        for channel in stack.channels:
            await channel.close()
        for running in reversed(list(stack.running.values())):
            await running.stop(0)
        for name in services:
            await client.drop_database(env[f"OTPGATE_{name.upper()}_DATABASE"])


def _spec_of(keyring: Keyring) -> list[str]:
    import base64

    roots = keyring._roots  # test-only access to rebuild the same keyring in another config
    ordered = [k for k in roots if k != keyring.primary_id] + [keyring.primary_id]
    return [f"{k}:{base64.b64encode(roots[k]).decode()}" for k in ordered]


def _uri_of(client: AsyncMongoClient[Document]) -> str:
    host, port = next(iter(client._topology_settings.seeds))
    return f"mongodb://{host}:{port}/"

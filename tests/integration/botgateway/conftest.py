"""A running bot gateway (sandbox mode) with the real directory and the simulated Telegram, over real
gRPC and the dev database."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from otpgate.botgateway.v1 import botgateway_pb2_grpc
from otpgate.directory.v1 import directory_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from pymongo import AsyncMongoClient

from services.botgateway.app import BotGatewayApp
from services.botgateway.telethon_transport import TelethonTransport
from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.core.phone import parse_phone
from services.telegramsim.app import TelegramSimApp
from services.telegramsim.telegram import SimulatedTelegram
from tests.support.stack import Stack, running_stack

SHARED = ["smsccode_bot", "smsc_code_bot", "smscodes_bot"]
_user_ids = itertools.count(random.randrange(10**8, 9 * 10**8), 13)


def new_user_id() -> int:
    return next(_user_ids)


def new_phone() -> str:
    while True:
        e164 = f"+79{random.randrange(10**9):09d}"
        try:
            parse_phone(e164)
        except ValueError:
            continue
        return e164


@dataclass
class Gw:
    stack: Stack
    bots: botgateway_pb2_grpc.BotGatewayServiceStub
    sandbox: telegramsim_pb2_grpc.SandboxServiceStub
    directory: directory_pb2_grpc.DirectoryServiceStub

    @property
    def app(self) -> BotGatewayApp:
        app = self.stack.app("botgateway")
        assert isinstance(app, BotGatewayApp)
        return app

    @property
    def telegram(self) -> SimulatedTelegram:
        app = self.stack.app("telegramsim")
        assert isinstance(app, TelegramSimApp) and app.telegram is not None
        return app.telegram

    @property
    def transport(self) -> TelethonTransport:
        assert self.app.gateway is not None and isinstance(self.app.gateway.transport, TelethonTransport)
        return self.app.gateway.transport

    async def user(self, language: str = "en", phone: str = "") -> telegramsim_pb2.SandboxUser:
        reply = await self.sandbox.CreateSandboxUser(
            telegramsim_pb2.CreateSandboxUserRequest(
                user=telegramsim_pb2.SandboxUser(
                    user_id=new_user_id(), first_name="Test", language_code=language, phone=phone or new_phone()
                )
            )
        )
        return reply.user

    async def connect(self, user: telegramsim_pb2.SandboxUser, bot: str = "smscodes_bot") -> None:
        await self.sandbox.StartBot(telegramsim_pb2.StartBotRequest(user_id=user.user_id, bot_id=bot))
        await self.sandbox.ShareContact(telegramsim_pb2.ShareContactRequest(user_id=user.user_id, bot_id=bot))


def gateway_overrides(**extra: str) -> dict[str, str]:
    return {"OTPGATE_SHARED_BOTS": ",".join(SHARED), **extra}


@pytest.fixture
async def gw(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[Gw]:
    async with running_stack(
        mongo_client,
        keyring,
        services=["telegramsim", "directory", "botgateway"],
        clock=clock,
        overrides=gateway_overrides(),
    ) as stack:
        yield Gw(
            stack,
            botgateway_pb2_grpc.BotGatewayServiceStub(stack.channel("botgateway")),
            telegramsim_pb2_grpc.SandboxServiceStub(stack.channel("telegramsim")),
            directory_pb2_grpc.DirectoryServiceStub(stack.channel("directory")),
        )

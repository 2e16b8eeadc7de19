"""The verification service with the real delivery, directory and bot gateway (sandbox Telegram
and sandbox SMS inbox), over real gRPC and the dev database, on one ManualClock."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from otpgate.verification.v1 import verification_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import RpcFailure, parse_rpc_error
from services.core.logging import configure_logging
from services.core.mongo import Document
from services.core.phone import parse_phone
from tests.conftest import _LOG_STREAM
from tests.support.stack import Stack, running_stack

SHARED = ["smsccode_bot", "smsc_code_bot", "smscodes_bot"]
_user_ids = itertools.count(random.randrange(10**8, 9 * 10**8), 17)
CODE_RE = re.compile(r"(?<!\d)(\d{4,10})(?!\d)")


def new_phone() -> str:
    while True:
        e164 = f"+79{random.randrange(10**9):09d}"
        try:
            parse_phone(e164)
        except ValueError:
            continue
        return e164


async def refused(call: Any) -> RpcFailure:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return parse_rpc_error(error)
    raise AssertionError("the call succeeded but a refusal was expected")


@dataclass
class Env:
    stack: Stack
    clock: ManualClock
    verification: verification_pb2_grpc.VerificationServiceAsyncStub
    delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub
    sms: delivery_pb2_grpc.SmsSandboxServiceAsyncStub
    sandbox: telegramsim_pb2_grpc.SandboxServiceAsyncStub
    directory: directory_pb2_grpc.DirectoryServiceAsyncStub
    database: AsyncDatabase[Document]

    async def inbox(self, phone: str) -> list[str]:
        """SMS texts the sandbox provider delivered to a number, newest first."""
        reply = await self.sms.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone=phone, page_size=100))
        return [m.text for m in reply.messages]

    async def codes_by_sms(self, phone: str) -> list[str]:
        return [m.group(1) for text in await self.inbox(phone) if (m := CODE_RE.search(text))]

    async def user(self, language: str = "en", phone: str = "") -> telegramsim_pb2.SandboxUser:
        reply = await self.sandbox.CreateSandboxUser(
            telegramsim_pb2.CreateSandboxUserRequest(
                user=telegramsim_pb2.SandboxUser(
                    user_id=next(_user_ids), first_name="Test", language_code=language, phone=phone or new_phone()
                )
            )
        )
        return reply.user

    async def connect(self, user: telegramsim_pb2.SandboxUser, bot: str = "smscodes_bot") -> None:
        await self.sandbox.StartBot(telegramsim_pb2.StartBotRequest(user_id=user.user_id, bot_id=bot))
        await self.sandbox.ShareContact(telegramsim_pb2.ShareContactRequest(user_id=user.user_id, bot_id=bot))
        self.clock.advance(5)  # let the per-chat limiter of the sandbox bot refill

    async def chat(self, user: telegramsim_pb2.SandboxUser, bot: str = "smscodes_bot") -> list[str]:
        reply = await self.sandbox.ListChatMessages(
            telegramsim_pb2.ListChatMessagesRequest(user_id=user.user_id, bot_id=bot)
        )
        return [m.text for m in reply.messages if m.from_bot]

    async def type(self, user: telegramsim_pb2.SandboxUser, text: str, bot: str = "smscodes_bot") -> str:
        reply = await self.sandbox.SendText(
            telegramsim_pb2.SendTextRequest(user_id=user.user_id, bot_id=bot, text=text)
        )
        self.clock.advance(2)
        return "\n".join(m.text for m in reply.replies)


@pytest.fixture(autouse=True)
def session_log_capture() -> None:
    """Route logs to the session capture even if an earlier test reconfigured logging (the CLI's
    main() sends them to stderr), so the no-code-in-logs assertions below see every line."""
    configure_logging("tests", "debug", stream=_LOG_STREAM)


@pytest.fixture
async def env(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[Env]:
    overrides = {"OTPGATE_SHARED_BOTS": ",".join(SHARED), "OTPGATE_VERIFICATION_SWEEP_INTERVAL": "3600"}
    async with running_stack(
        mongo_client,
        keyring,
        services=["directory", "botgateway", "delivery", "verification"],
        clock=clock,
        overrides=overrides,
    ) as stack:
        delivery_channel = stack.channel("delivery")
        yield Env(
            stack=stack,
            clock=clock,
            verification=verification_pb2_grpc.VerificationServiceStub(stack.channel("verification")),  # type: ignore[arg-type]
            delivery=delivery_pb2_grpc.DeliveryServiceStub(delivery_channel),  # type: ignore[arg-type]
            sms=delivery_pb2_grpc.SmsSandboxServiceStub(delivery_channel),  # type: ignore[arg-type]
            sandbox=telegramsim_pb2_grpc.SandboxServiceStub(stack.channel("telegramsim")),  # type: ignore[arg-type]
            directory=directory_pb2_grpc.DirectoryServiceStub(stack.channel("directory")),  # type: ignore[arg-type]
            database=mongo_client[stack.env["OTPGATE_VERIFICATION_DATABASE"]],
        )

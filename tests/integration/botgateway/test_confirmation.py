"""A typed confirmation code, end to end: verification sends the SMS code and the bot prompt through
delivery; the person types the code to the bot; the gateway submits it to verification."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from otpgate.botgateway.v1 import botgateway_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.core.phone import mask_phone
from tests.integration.botgateway.conftest import gateway_overrides, new_phone, new_user_id
from tests.support.stack import Stack, running_stack

B = botgateway_pb2
S = telegramsim_pb2
CODE_RE = re.compile(r"(?<!\d)(\d{4,10})(?!\d)")


@pytest.fixture
async def stack(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> AsyncIterator[Stack]:
    async with running_stack(
        mongo_client,
        keyring,
        services=["directory", "botgateway", "delivery", "verification"],
        clock=clock,
        overrides=gateway_overrides(OTPGATE_VERIFICATION_SWEEP_INTERVAL="3600"),
    ) as running:
        yield running


async def test_typed_code_wrong_then_right(stack: Stack) -> None:
    sandbox = telegramsim_pb2_grpc.SandboxServiceStub(stack.channel("telegramsim"))
    sms = delivery_pb2_grpc.SmsSandboxServiceStub(stack.channel("delivery"))
    verification = verification_pb2_grpc.VerificationServiceStub(stack.channel("verification"))
    directory = directory_pb2_grpc.DirectoryServiceStub(stack.channel("directory"))
    phone = new_phone()
    user = (
        await sandbox.CreateSandboxUser(
            S.CreateSandboxUserRequest(user=S.SandboxUser(user_id=new_user_id(), language_code="en", phone=phone))
        )
    ).user
    await sandbox.StartBot(S.StartBotRequest(user_id=user.user_id, bot_id="smscodes_bot"))
    await sandbox.ShareContact(S.ShareContactRequest(user_id=user.user_id, bot_id="smscodes_bot"))

    # Nothing pending yet: a typed number is answered as such.
    early = await sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text="1234"))
    assert early.replies[0].text == "There is no code to confirm right now."

    await verification.StartPhoneConfirmation(
        verification_pb2.StartPhoneConfirmationRequest(
            phone=phone, telegram_user_id=user.user_id, bot_id="smscodes_bot", client_id="client-c", locale="en"
        )
    )
    chat = await sandbox.ListChatMessages(
        S.ListChatMessagesRequest(
            user_id=user.user_id, bot_id="smscodes_bot", after_message_id=early.replies[0].message_id
        )
    )
    assert [m for m in chat.messages if m.from_bot], "the bot asked the person to type the SMS code"
    inbox = await sms.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone=phone))
    codes = [m.group(1) for message in inbox.messages if (m := CODE_RE.search(message.text))]
    assert codes, "the confirmation SMS carries a code"
    code = codes[0]
    wrong = "0" * len(code) if code != "0" * len(code) else "1" * len(code)

    typed_wrong = await sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text=wrong))
    assert typed_wrong.replies[0].text.startswith("Wrong code. Tries left:")
    # Spaces and dashes in a typed code are ignored.
    spaced = f"{code[:3]} {code[3:]}" if len(code) > 3 else code
    typed_right = await sandbox.SendText(S.SendTextRequest(user_id=user.user_id, bot_id="smscodes_bot", text=spaced))
    assert typed_right.replies[0].text.startswith(f"Number {mask_phone(phone)} confirmed")
    subscriber = await directory.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=user.user_id))
    assert subscriber.subscriber.HasField("confirm_time")

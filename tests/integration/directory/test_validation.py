"""Bad input: INVALID_ARGUMENT with a field violation per problem, and nothing written."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from otpgate.directory.v1 import directory_pb2 as pb
from otpgate.directory.v1 import directory_pb2_grpc
from pymongo.asynchronous.collection import AsyncCollection

from services.core.errors import parse_rpc_error
from services.core.mongo import Document
from tests.integration.directory.conftest import new_phone, new_user_id

Stub = directory_pb2_grpc.DirectoryServiceStub
USER = 424242


async def violations_of(call: Awaitable[Any]) -> set[str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    failure = parse_rpc_error(info.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_ARGUMENT"
    assert all(description for _, description in failure.field_violations)
    return {field for field, _ in failure.field_violations}


@pytest.mark.parametrize(
    ("bot_id", "user", "phone", "fields"),
    [
        ("smsccode_bot", USER, "+7999", {"phone"}),
        ("smsccode_bot", USER, "not a number", {"phone"}),
        ("smsccode_bot", USER, "", {"phone"}),
        ("smsccode_bot", USER, "+7" + "9" * 60, {"phone"}),
        ("smsccode_bot", USER, "+1 000 000 0000", {"phone"}),
        ("", USER, "+79991234567", {"bot_id"}),
        ("", 0, "", {"bot_id", "telegram_user_id", "phone"}),
        ("smsccode_bot", 0, "+79991234567", {"telegram_user_id"}),
        ("smsccode_bot", -5, "+79991234567", {"telegram_user_id"}),
        ("b" * 65, USER, "+79991234567", {"bot_id"}),
        ("links.$x", USER, "+79991234567", {"bot_id"}),
        ("a.b", USER, "+79991234567", {"bot_id"}),
        ("ab", USER, "+79991234567", {"bot_id"}),
    ],
)
async def test_link_contact_refuses_bad_input_and_writes_nothing(
    directory: Stub, subscribers: AsyncCollection[Document], bot_id: str, user: int, phone: str, fields: set[str]
) -> None:
    request = pb.LinkContactRequest(bot_id=bot_id, telegram_user_id=user, contact_user_id=user, phone=phone)
    assert await violations_of(directory.LinkContact(request)) == fields
    assert await subscribers.count_documents({}) == 0


async def test_other_rpcs_validate_too(directory: Stub, subscribers: AsyncCollection[Document]) -> None:
    user, phone = new_user_id(), new_phone()
    await directory.LinkContact(
        pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=user, contact_user_id=user, phone=phone)
    )
    before = await subscribers.find_one({})
    # Callers other than the contact button must send E.164 with "+".
    assert await violations_of(directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone.lstrip("+")))) == {"phone"}
    assert await violations_of(directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone, bot_id="a.b"))) == {"bot_id"}
    assert await violations_of(directory.GetSubscriber(pb.GetSubscriberRequest())) == {"selector"}
    assert await violations_of(directory.GetSubscriber(pb.GetSubscriberRequest(phone="+0"))) == {"phone"}
    assert await violations_of(directory.ForgetSubscriber(pb.ForgetSubscriberRequest())) == {"selector"}
    assert await violations_of(directory.ForgetSubscriber(pb.ForgetSubscriberRequest(telegram_user_id=-1))) == {
        "telegram_user_id"
    }
    assert await violations_of(directory.ForgetSubscriber(pb.ForgetSubscriberRequest(phone="x" * 100))) == {"phone"}
    assert await violations_of(directory.MarkConfirmed(pb.MarkConfirmedRequest(phone=phone))) == {"telegram_user_id"}
    assert await violations_of(directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=user))) == {"phone"}
    assert await violations_of(directory.ConnectKnownUser(pb.ConnectKnownUserRequest(telegram_user_id=user))) == {
        "bot_id"
    }
    assert await violations_of(
        directory.SetBotStatus(pb.SetBotStatusRequest(bot_id="x" * 70, telegram_user_id=user, status=2))
    ) == {"bot_id"}
    after = await subscribers.find_one({})
    assert before == after and await subscribers.count_documents({}) == 1

"""Logs carry masked numbers only (this module runs last in the directory suite)."""

from __future__ import annotations

import grpc
import pytest
from otpgate.directory.v1 import directory_pb2 as pb
from otpgate.directory.v1 import directory_pb2_grpc

from services.core.phone import mask_phone
from tests.conftest import LogCapture, all_logs
from tests.integration.directory.conftest import USED_PHONES, new_phone, new_user_id

Stub = directory_pb2_grpc.DirectoryServiceStub


def leaked(text: str, phones: list[str]) -> list[str]:
    return [mask_phone(p) for p in phones if p in text or p.lstrip("+") in text or p[2:] in text]


async def test_a_whole_conversation_logs_no_full_number(directory: Stub, captured_logs: LogCapture) -> None:
    user, other, phone, second = new_user_id(), new_user_id(), new_phone(), new_phone()
    link = pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=user, contact_user_id=user, phone=phone)
    await directory.LinkContact(link)
    await directory.LinkContact(
        pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=other, contact_user_id=other, phone=phone)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await directory.LinkContact(
            pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=user, contact_user_id=other, phone=second)
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await directory.LinkContact(
            pb.LinkContactRequest(bot_id="a.b", telegram_user_id=user, contact_user_id=user, phone=second[:-3])
        )
    await directory.LinkContact(
        pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=other, contact_user_id=other, phone=second)
    )
    await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=second))
    with pytest.raises(grpc.aio.AioRpcError):
        await directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=other, phone=phone))
    await directory.GetSubscriber(pb.GetSubscriberRequest(phone=second))
    await directory.ForgetSubscriber(pb.ForgetSubscriberRequest(phone=second))

    text = captured_logs.text()
    assert "subscriber_linked" in text and "number_moved" in text and "rpc_refused" in text
    assert mask_phone(phone) in text  # masked numbers are what the logs show
    assert leaked(text, [phone, second]) == []


def test_the_whole_directory_suite_logged_no_full_number() -> None:
    assert len(USED_PHONES) > 50
    assert leaked(all_logs(), USED_PHONES) == []

"""SMS pumping: bursts into one prefix and low-conversion prefixes are stopped, ordinary traffic passes."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.delivery.support import QUIET, refused, sms_request, stubs
from tests.support.stack import running_stack

VERIFY = delivery_pb2.MESSAGE_PURPOSE_VERIFICATION


async def test_a_burst_into_one_prefix_is_blocked_while_other_prefixes_pass(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: object
) -> None:
    overrides = {**QUIET, "OTPGATE_FRAUD_VELOCITY_MIN": "5", "OTPGATE_FRAUD_SAFE_PREFIXES": "+7999777"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        blocked = passed = 0
        ordinary = 0
        for i in range(10):
            try:
                await delivery.SendMessage(sms_request(f"+7999123{i:04d}", purpose=VERIFY))
                passed += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                blocked += 1
            # Ordinary traffic: numbers spread over many prefixes.
            reply = await delivery.SendMessage(sms_request(f"+7916{i:03d}{i:04d}", purpose=VERIFY))
            ordinary += reply.message.status == common_pb2.MESSAGE_STATUS_DELIVERED
        assert passed == 5 and blocked == 5 and ordinary == 10
        failure = await refused(delivery.SendMessage(sms_request("+79991239999", purpose=VERIFY)))
        assert failure.reason == "FRAUD_SUSPECTED" and "PREFIX_VELOCITY" in failure.message
        # The safe list bypasses the guard.
        for i in range(7):
            await delivery.SendMessage(sms_request(f"+7999777{i:04d}", purpose=VERIFY))
        # The burst is over after the window and its baseline grew.
        clock.advance(3600)
        await delivery.SendMessage(sms_request("+79991230500", purpose=VERIFY))
        logs = captured_logs.text()  # type: ignore[attr-defined]
        assert '"reason": "PREFIX_VELOCITY"' in logs and "+79991239999" not in logs


async def test_low_conversion_demands_captcha_or_blocks_and_monitor_mode_lets_through(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {**QUIET, "OTPGATE_FRAUD_PREFIX_MIN_VOLUME": "10", "OTPGATE_FRAUD_VELOCITY_MIN": "1000"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        # Prefix A: 10 codes sent, 1 entered (10 %): CAPTCHA. Prefix B: none entered: blocked.
        for i in range(10):
            a = await delivery.SendMessage(sms_request(f"+7926100{i:04d}", purpose=VERIFY))
            await delivery.SendMessage(sms_request(f"+7926200{i:04d}", purpose=VERIFY))
            if i == 0:
                await delivery.RecordConversion(
                    delivery_pb2.RecordConversionRequest(client_id="shop", message_id=a.message.id)
                )
        clock.advance(600)  # past the grace period codes get to be entered
        failure = await refused(delivery.SendMessage(sms_request("+79261000500", purpose=VERIFY)))
        assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPTCHA_REQUIRED")
        solved = await delivery.SendMessage(
            sms_request("+79261000500", purpose=VERIFY, origin=common_pb2.Origin(captcha_verified=True))
        )
        assert solved.message.status == common_pb2.MESSAGE_STATUS_DELIVERED
        failure = await refused(delivery.SendMessage(sms_request("+79262000500", purpose=VERIFY)))
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FRAUD_SUSPECTED")
        assert "LOW_CONVERSION_PREFIX" in failure.message
        # Ordinary prefixes are untouched.
        await delivery.SendMessage(sms_request("+79263000500", purpose=VERIFY))
        # Another client in monitor mode is let through (decision logged and counted).
        await delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id="bank", fraud_mode=common_pb2.FRAUD_MODE_MONITOR),
                update_mask=field_mask_pb2.FieldMask(paths=["fraud_mode"]),
            )
        )
        monitored = await delivery.SendMessage(sms_request("+79262000501", purpose=VERIFY, client_id="bank"))
        assert monitored.message.status == common_pb2.MESSAGE_STATUS_DELIVERED
        # Unknown message ids are not conversions.
        unknown = await refused(
            delivery.RecordConversion(
                delivery_pb2.RecordConversionRequest(client_id="bank", message_id=monitored.message.id + "X")
            )
        )
        assert unknown.reason == "MESSAGE_NOT_FOUND"

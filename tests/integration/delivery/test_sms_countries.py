"""SMS countries mean what they say: a list replaces "any", the default is shown as a default
(any in sandbox mode, none in production) and follows the service, and the service's own list
narrows every client's."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.config import ConfigError
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.delivery.support import QUIET, refused, sms_request, stubs
from tests.support.stack import running_stack


async def _update(delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub, **fields: object) -> common_pb2.ClientPolicy:
    reply = await delivery.UpdateClientPolicy(
        delivery_pb2.UpdateClientPolicyRequest(
            policy=common_pb2.ClientPolicy(client_id="shop", **fields),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        )
    )
    return reply.policy


async def _get(delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub) -> common_pb2.ClientPolicy:
    return (await delivery.GetClientPolicy(delivery_pb2.GetClientPolicyRequest(client_id="shop"))).policy


async def test_a_list_replaces_any_and_the_sandbox_default_says_so(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)
        policy = await _get(delivery)
        assert (
            policy.sms_countries_any and policy.sms_countries_source == common_pb2.SMS_COUNTRIES_SOURCE_SANDBOX_DEFAULT
        )
        # Changing something else keeps the default a default.
        policy = await _update(delivery, captcha_rule=common_pb2.CAPTCHA_RULE_SMS)
        assert policy.sms_countries_source == common_pb2.SMS_COUNTRIES_SOURCE_SANDBOX_DEFAULT
        await _update(delivery, captcha_rule=common_pb2.CAPTCHA_RULE_ON_RISK)

        policy = await _update(delivery, sms_countries=["fr"])
        assert (list(policy.sms_countries), policy.sms_countries_any) == (["FR"], False)
        assert policy.sms_countries_source == common_pb2.SMS_COUNTRIES_SOURCE_POLICY
        assert (await delivery.SendMessage(sms_request("+33612345678"))).message.status == (
            common_pb2.MESSAGE_STATUS_DELIVERED
        )
        for number in ("+393123456789", "+12025550143"):  # Italy, the US
            failure = await refused(delivery.SendMessage(sms_request(number)))
            assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SMS_NOT_ALLOWED")

        # Both at once contradict each other; "any" alone replaces the list.
        both = await refused(
            delivery.UpdateClientPolicy(
                delivery_pb2.UpdateClientPolicyRequest(
                    policy=common_pb2.ClientPolicy(client_id="shop", sms_countries=["DE"], sms_countries_any=True),
                    update_mask=field_mask_pb2.FieldMask(paths=["sms_countries", "sms_countries_any"]),
                )
            )
        )
        assert both.field_violations == [
            ("policy.sms_countries_any", "cannot be true while sms_countries names countries")
        ]
        policy = await _update(delivery, sms_countries_any=True)
        assert (list(policy.sms_countries), policy.sms_countries_any) == ([], True)
        assert (await delivery.SendMessage(sms_request("+393123456789"))).message.status == (
            common_pb2.MESSAGE_STATUS_DELIVERED
        )


async def test_production_clients_start_with_no_sms_and_the_service_list_narrows_them(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    env = {**QUIET, "OTPGATE_SANDBOX": "false", "OTPGATE_DELIVERY_SMS_COUNTRIES": "DE,FR"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=env, clock=clock) as stack:
        delivery, _ = stubs(stack)
        policy = await _get(delivery)
        assert (policy.sms_countries_any, list(policy.sms_countries)) == (False, [])
        assert policy.sms_countries_source == common_pb2.SMS_COUNTRIES_SOURCE_SERVICE_DEFAULT
        assert list(policy.service_sms_countries) == ["DE", "FR"]
        failure = await refused(delivery.SendMessage(sms_request("+4915112345678")))
        assert failure.reason == "SMS_NOT_ALLOWED"
        await _update(delivery, sms_countries=["FR", "IT"])
        assert (await delivery.SendMessage(sms_request("+33612345678"))).message.status == (
            common_pb2.MESSAGE_STATUS_DELIVERED
        )
        failure = await refused(delivery.SendMessage(sms_request("+393123456789")))  # not offered by the service
        assert (failure.reason, failure.message) == ("SMS_NOT_ALLOWED", "SMS to this country is not offered")


async def test_any_by_default_is_refused_in_production(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    env = {"OTPGATE_ENV": "production", "OTPGATE_SANDBOX": "false", "OTPGATE_DELIVERY_DEFAULT_SMS_ANY": "true"}
    with pytest.raises(ConfigError, match="OTPGATE_DELIVERY_DEFAULT_SMS_ANY=true is refused in production"):
        async with running_stack(mongo_client, keyring, ["delivery"], overrides=env, clock=clock):
            pass

"""Send limits at their edge under concurrent requests through two delivery replicas: exactly the
limit is accepted, whichever replica each request reaches."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import parse_rpc_error
from services.core.grpc_client import make_channel
from services.core.mongo import Document
from tests.integration.delivery.support import QUIET, delivery_replica, sms_request, stubs
from tests.support.stack import running_stack

DELIVERY = delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"]


async def _outcomes(
    stubs_: list[delivery_pb2_grpc.DeliveryServiceAsyncStub], requests: list[delivery_pb2.SendMessageRequest]
) -> list[str]:
    async def one(n: int, request: delivery_pb2.SendMessageRequest) -> str:
        try:
            await stubs_[n % len(stubs_)].SendMessage(request)
        except grpc.aio.AioRpcError as error:
            return parse_rpc_error(error).reason
        return "ACCEPTED"

    return list(await asyncio.gather(*(one(n, r) for n, r in enumerate(requests))))


async def test_phone_limit_and_daily_cap_hold_at_their_edge_across_replicas(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        first, _ = stubs(stack)
        await first.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(
                    client_id="shop",
                    sms_countries_any=True,
                    daily_sms_cap=7,
                    fraud_mode=common_pb2.FRAUD_MODE_OFF,
                    rate_limits=common_pb2.RateLimits(
                        phone_short=common_pb2.RateLimit(limit=5, window=duration_pb2.Duration(seconds=600))
                    ),
                ),
                update_mask=field_mask_pb2.FieldMask(
                    paths=["sms_countries_any", "daily_sms_cap", "fraud_mode", "rate_limits.phone_short"]
                ),
            )
        )
        async with delivery_replica(mongo_client, stack, clock, OTPGATE_DELIVERY_POLICY_CACHE_TTL="0") as replica:
            channel = make_channel(replica.address, [DELIVERY])
            try:
                both = [first, delivery_pb2_grpc.DeliveryServiceStub(channel)]
                # 40 messages to one number at once (Telegram only: no SMS cap involved): 5 pass.
                to_one = [
                    delivery_pb2.SendMessageRequest(
                        client_id="shop", phone="+79991234567", text=f"m{n}", channel=common_pb2.CHANNEL_TELEGRAM
                    )
                    for n in range(40)
                ]
                outcomes = await _outcomes(both, to_one)  # type: ignore[arg-type]
                assert outcomes.count("ACCEPTED") == 5 and outcomes.count("RATE_LIMITED") == 35
                # 30 SMS to 30 numbers at once against a daily cap of 7: 7 pass.
                spread = [sms_request(f"+7916{n:03d}{n:04d}") for n in range(30)]
                outcomes = await _outcomes(both, spread)  # type: ignore[arg-type]
                assert outcomes.count("ACCEPTED") == 7 and outcomes.count("SMS_CAP_REACHED") == 23
            finally:
                await channel.close()

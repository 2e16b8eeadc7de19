"""Client policies kept in memory: a change through this replica applies at once, through another within the TTL."""

from __future__ import annotations

from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.delivery.policy import PolicyStore


def cap(value: int) -> tuple[common_pb2.ClientPolicy, field_mask_pb2.FieldMask]:
    return common_pb2.ClientPolicy(client_id="shop", daily_sms_cap=value), field_mask_pb2.FieldMask(
        paths=["daily_sms_cap"]
    )


async def test_changes_apply_at_once_here_and_within_the_ttl_elsewhere(
    database: AsyncDatabase[Document], clock: ManualClock, keyring: Keyring
) -> None:
    here = PolicyStore(database["policies"], clock, sms_any_default=False, cache_ttl=2.0)
    elsewhere = PolicyStore(database["policies"], clock, sms_any_default=False, cache_ttl=2.0)
    assert (await here.get("shop")).daily_sms_cap == 0
    assert (await elsewhere.get("shop")).daily_sms_cap == 0
    await here.update(*cap(5), keyring)
    assert (await here.get("shop")).daily_sms_cap == 5
    assert (await elsewhere.get("shop")).daily_sms_cap == 0  # still the copy it read
    clock.advance(2.5)
    assert (await elsewhere.get("shop")).daily_sms_cap == 5


async def test_a_zero_ttl_reads_every_time(
    database: AsyncDatabase[Document], clock: ManualClock, keyring: Keyring
) -> None:
    reader = PolicyStore(database["policies"], clock, sms_any_default=False)
    writer = PolicyStore(database["policies"], clock, sms_any_default=False)
    assert (await reader.get("shop")).daily_sms_cap == 0
    await writer.update(*cap(7), keyring)
    assert (await reader.get("shop")).daily_sms_cap == 7

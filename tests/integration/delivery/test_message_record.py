"""The message record keeps the outbox's document shape: stored documents read, new ones are written alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from otpgate.common.v1 import common_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.mongo import Document
from services.delivery.record import EPOCH, MessageChanges, MessageRecord
from services.delivery.store import Store

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def stored_document(message_id: str) -> Document:
    """A message as SendMessage stores it at acceptance, key for key."""
    return {
        "_id": message_id,
        "idem": "shop\x1forder-7",
        "fingerprint": "f" * 64,
        "client_id": "shop",
        "request_id": "order-7",
        "purpose": 1,
        "phone": b"\x01sealed-phone",
        "phone_index": "a" * 64,
        "phone_masked": "+7******4567",
        "region": "RU",
        "text": b"\x01sealed-text",
        "requested_channel": 0,
        "channel": 0,
        "requested_bot": "smscodes_bot",
        "bot_owner": "",
        "bot_id": "",
        "status": common_pb2.MESSAGE_STATUS_QUEUED,
        "failure_reason": 0,
        "confirm_days": 30,
        "sms_fallback": True,
        "sms_admitted": False,
        "billed": True,
        "protect_content": False,
        "delete_after": 0,
        "callback_url": "",
        "captcha_verified": False,
        "created_at": NOW,
        "updated_at": NOW,
        "expire_at": NOW + timedelta(minutes=10),
        "next_attempt_at": NOW,
        "lease_until": NOW + timedelta(seconds=30),
        "claim_seq": 1,
        "attempts": 0,
        "telegram_user_id": 0,
        "confirmation_started": False,
        "released_at": None,
        "sms_poll_at": None,
        "purge_at": None,
    }


async def test_a_stored_message_reads_and_a_new_one_is_stored_with_the_same_keys(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    store = Store(database, clock)
    old = stored_document("01OLD")
    await database["messages"].insert_one(dict(old))
    record = await store.get("01OLD")
    assert record is not None
    assert (record.phone_sealed, record.text_sealed, record.confirm_days) == (
        b"\x01sealed-phone",
        b"\x01sealed-text",
        30,
    )
    assert record.created_at == NOW and record.sent_at is None and record.provider_id is None

    new = MessageRecord.from_doc({**old, "_id": "01NEW", "idem": "shop\x1forder-8"})
    assert await store.insert(new) is None
    raw = await database["messages"].find_one({"_id": "01NEW"})
    assert raw is not None
    assert raw == {**old, "_id": "01NEW", "idem": "shop\x1forder-8"}


async def test_updated_is_what_the_store_reads_after_the_write(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    store = Store(database, clock)
    record = MessageRecord.from_doc(stored_document("01SENT"))
    await store.insert(record)
    changes: MessageChanges = {
        "status": common_pb2.MESSAGE_STATUS_SENT,
        "channel": common_pb2.CHANNEL_SMS,
        "attempts": 1,
        "sent_at": NOW + timedelta(seconds=1),
        "sms_provider": "sandbox",
        "provider_id": "p-1",
        "sms_poll_at": NOW + timedelta(seconds=31),
        "sms_poll_until": NOW + timedelta(days=1),
        "lease_until": EPOCH,
        "claim_seq": 1,
        "updated_at": NOW + timedelta(seconds=1),
    }
    await store.write(record.id, changes)
    assert await store.get(record.id) == record.updated(changes)
    raw = await database["messages"].find_one({"_id": record.id})
    assert raw is not None and raw["provider_id"] == "p-1" and "delivered_at" not in raw and "sms_error" not in raw


def test_an_open_message_past_its_ttl_reads_as_expired() -> None:
    held = MessageRecord.from_doc({**stored_document("01HELD"), "status": common_pb2.MESSAGE_STATUS_HELD})
    later = NOW + timedelta(minutes=11)
    assert held.status_at(NOW) == (common_pb2.MESSAGE_STATUS_HELD, 0)
    assert held.status_at(later) == (common_pb2.MESSAGE_STATUS_EXPIRED, common_pb2.FAILURE_REASON_CONFIRMATION_TIMEOUT)
    message = held.to_proto(later)
    assert message.status == common_pb2.MESSAGE_STATUS_EXPIRED
    assert message.update_time.ToDatetime(tzinfo=UTC) == held.expire_at

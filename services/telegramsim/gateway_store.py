"""The simulated Gateway's own collections (in the simulated Telegram's database).

- `gateway_accounts`: `_id` = keyed hash of the API token (the token itself is never stored);
  the balance in micro-credits, so charges and refunds add up exactly.
- `gateway_requests`: `_id` = request_id; one per checkSendAbility or sendVerificationMessage
  that charged. The number, the code and the text of the message are sealed. The message in the
  person's "Verification Codes" chat is the request's `message_id` (the person's own numbering).
- `gateway_reports`: the outbox of delivery reports to a request's callback_url, one document per
  report still to post (`next_at`), retried with growing delays.
- `gateway_devices`: `_id` = Telegram user id of a person whose device is offline (nothing is
  delivered to them until it is back online).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson.int64 import Int64
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import as_utc
from services.core.crypto import Keyring, SealContext
from services.core.ids import new_id
from services.core.mongo import Document, ensure_index

ACCOUNTS = "gateway_accounts"
REQUESTS = "gateway_requests"
REPORTS = "gateway_reports"
DEVICES = "gateway_devices"


@dataclass(frozen=True)
class GatewayRequest:
    request_id: str
    account: str
    phone: str
    user_id: int
    cost_micros: int
    created_at: datetime
    sent: bool = False  # a verification message went out (else only checkSendAbility ran)
    code: str = ""
    text: str = ""
    message_id: int = 0
    delivery_status: str = ""
    delivery_updated_at: datetime | None = None
    verification_status: str = ""
    verification_updated_at: datetime | None = None
    code_entered: str = ""
    attempts: int = 0
    is_refunded: bool = False
    removed: bool = False  # the message left the person's chat (revoked or expired)
    callback_url: str = ""
    payload: str = ""
    expire_at: datetime | None = None
    sent_at: datetime | None = None


class GatewayStore:
    def __init__(self, database: AsyncDatabase[Document], keyring: Keyring) -> None:
        self.keyring = keyring
        self.accounts = database[ACCOUNTS]
        self.requests = database[REQUESTS]
        self.reports = database[REPORTS]
        self.devices = database[DEVICES]

    async def create_indexes(self) -> None:
        await ensure_index(self.requests, [("open", 1), ("expire_at", 1)])
        await ensure_index(self.requests, [("user_id", 1), ("message_id", 1)])
        await ensure_index(self.reports, "next_at")

    # Accounts ---------------------------------------------------------------------------------

    def account_id(self, token: str) -> str:
        return self.keyring.secret_hash("telegramsim/gateway-token", token)

    async def open_account(self, token: str, balance_micros: int) -> int:
        """The account of `token`, made with `balance_micros` if it is new; returns its balance."""
        doc = await self.accounts.find_one_and_update(
            {"_id": self.account_id(token)},
            {"$setOnInsert": {"balance": Int64(balance_micros)}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None
        return int(doc["balance"])

    async def balance(self, account: str) -> int | None:
        doc = await self.accounts.find_one({"_id": account})
        return int(doc["balance"]) if doc else None

    async def charge(self, account: str, micros: int) -> int | None:
        """Takes `micros` if the balance holds them (one conditional write); the balance left, else None."""
        doc = await self.accounts.find_one_and_update(
            {"_id": account, "balance": {"$gte": micros}},
            {"$inc": {"balance": -micros}},
            return_document=ReturnDocument.AFTER,
        )
        return int(doc["balance"]) if doc else None

    async def credit(self, account: str, micros: int) -> None:
        await self.accounts.update_one({"_id": account}, {"$inc": {"balance": micros}})

    # Requests ---------------------------------------------------------------------------------

    def _seal(self, request_id: str, field: str, value: str) -> bytes:
        return self.keyring.seal(value, SealContext(REQUESTS, request_id, field))

    def _open(self, doc: Document, field: str) -> str:
        sealed = doc.get(field)
        return self.keyring.open_str(sealed, SealContext(REQUESTS, str(doc["_id"]), field)) if sealed else ""

    async def insert(self, request: GatewayRequest) -> None:
        await self.requests.insert_one(self._doc(request))

    async def replace(self, request: GatewayRequest, expected: Mapping[str, Any]) -> bool:
        """Writes `request` if its stored form still matches `expected` (the fields read)."""
        doc = self._doc(request)
        doc.pop("_id")
        result = await self.requests.replace_one({"_id": request.request_id, **expected}, doc)
        return result.modified_count == 1

    async def get(self, request_id: str) -> GatewayRequest | None:
        doc = await self.requests.find_one({"_id": request_id})
        return self._request(doc) if doc else None

    async def due_for_expiry(self, now: datetime, limit: int = 100) -> list[GatewayRequest]:
        cursor = self.requests.find({"open": True, "expire_at": {"$lte": now}}).limit(limit)
        return [self._request(doc) async for doc in cursor]

    async def of_user(self, user_id: int, after_message_id: int = 0) -> list[GatewayRequest]:
        cursor = self.requests.find({"user_id": Int64(user_id), "message_id": {"$gt": after_message_id}})
        found = [self._request(doc) async for doc in cursor]
        return sorted(found, key=lambda r: r.message_id)

    async def undelivered_of_user(self, user_id: int) -> list[GatewayRequest]:
        cursor = self.requests.find({"user_id": Int64(user_id), "message_id": {"$gt": 0}, "delivery_status": "sent"})
        return [self._request(doc) async for doc in cursor]

    async def highest_message_ids(self) -> dict[int, int]:
        highest: dict[int, int] = {}
        async for doc in self.requests.find({"message_id": {"$gt": 0}}, {"user_id": 1, "message_id": 1}):
            user = int(doc["user_id"])
            highest[user] = max(highest.get(user, 0), int(doc["message_id"]))
        return highest

    def _doc(self, r: GatewayRequest) -> Document:
        doc: Document = {
            "_id": r.request_id,
            "account": r.account,
            "phone_sealed": self._seal(r.request_id, "phone_sealed", r.phone),
            "user_id": Int64(r.user_id),
            "cost": Int64(r.cost_micros),
            "created_at": r.created_at,
            "sent": r.sent,
            "message_id": r.message_id,
            "delivery_status": r.delivery_status,
            "delivery_updated_at": r.delivery_updated_at,
            "verification_status": r.verification_status,
            "verification_updated_at": r.verification_updated_at,
            "attempts": r.attempts,
            "is_refunded": r.is_refunded,
            "removed": r.removed,
            "callback_url": r.callback_url,
            "payload": r.payload,
            "expire_at": r.expire_at,
            "sent_at": r.sent_at,
            # Still waiting for its ttl: sent, neither read nor refunded nor out of the chat.
            "open": bool(r.expire_at) and r.sent and r.delivery_status in ("sent", "delivered") and not r.removed,
        }
        for field, value in (("code_sealed", r.code), ("text_sealed", r.text), ("entered_sealed", r.code_entered)):
            if value:
                doc[field] = self._seal(r.request_id, field, value)
        return doc

    def _request(self, doc: Document) -> GatewayRequest:
        def moment(name: str) -> datetime | None:
            value = doc.get(name)
            return as_utc(value) if isinstance(value, datetime) else None

        return GatewayRequest(
            request_id=str(doc["_id"]),
            account=str(doc["account"]),
            phone=self._open(doc, "phone_sealed"),
            user_id=int(doc["user_id"]),
            cost_micros=int(doc["cost"]),
            created_at=as_utc(doc["created_at"]),
            sent=bool(doc.get("sent")),
            code=self._open(doc, "code_sealed"),
            text=self._open(doc, "text_sealed"),
            message_id=int(doc.get("message_id") or 0),
            delivery_status=str(doc.get("delivery_status") or ""),
            delivery_updated_at=moment("delivery_updated_at"),
            verification_status=str(doc.get("verification_status") or ""),
            verification_updated_at=moment("verification_updated_at"),
            code_entered=self._open(doc, "entered_sealed"),
            attempts=int(doc.get("attempts") or 0),
            is_refunded=bool(doc.get("is_refunded")),
            removed=bool(doc.get("removed")),
            callback_url=str(doc.get("callback_url") or ""),
            payload=str(doc.get("payload") or ""),
            expire_at=moment("expire_at"),
            sent_at=moment("sent_at"),
        )

    # Reports and devices ------------------------------------------------------------------------

    async def enqueue_report(self, request_id: str, delivery: Document, now: datetime) -> None:
        """A report of the request as it is now; `delivery` is its DeliveryStatus at this change."""
        await self.reports.insert_one(
            {"_id": new_id(), "request_id": request_id, "delivery": delivery, "attempt": 0, "next_at": now}
        )

    async def due_reports(self, now: datetime, limit: int = 100) -> list[Document]:
        return [doc async for doc in self.reports.find({"next_at": {"$lte": now}}).sort("next_at", 1).limit(limit)]

    async def report_failed(self, report_id: str, attempt: int, next_at: datetime) -> None:
        await self.reports.update_one({"_id": report_id}, {"$set": {"attempt": attempt, "next_at": next_at}})

    async def report_done(self, report_id: str) -> None:
        await self.reports.delete_one({"_id": report_id})

    async def offline(self, user_id: int) -> bool:
        return await self.devices.find_one({"_id": Int64(user_id)}) is not None

    async def set_offline(self, user_id: int, offline: bool) -> None:
        if offline:
            await self.devices.replace_one({"_id": Int64(user_id)}, {"offline": True}, upsert=True)
        else:
            await self.devices.delete_one({"_id": Int64(user_id)})

    async def reset(self) -> None:
        """A sandbox reset erases the people's side; accounts and their balances stay."""
        await self.requests.delete_many({})
        await self.reports.delete_many({})
        await self.devices.delete_many({})

"""The edge's own database: clients, API keys (hashed) and used CAPTCHA tokens (hashed)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.core.clock import as_utc
from services.core.mongo import Document, ensure_index, purge_before


@dataclass(frozen=True)
class ClientRecord:
    id: str
    display_name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    client_id: str
    scopes: tuple[str, ...]
    secret_hash: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _client(doc: Document) -> ClientRecord:
    return ClientRecord(id=str(doc["_id"]), display_name=str(doc["display_name"]), created_at=as_utc(doc["created_at"]))


def _key(doc: Document) -> ApiKeyRecord:
    def when(name: str) -> datetime | None:
        value = doc.get(name)
        return as_utc(value) if isinstance(value, datetime) else None

    return ApiKeyRecord(
        id=str(doc["_id"]),
        client_id=str(doc["client_id"]),
        scopes=tuple(str(s) for s in doc.get("scopes", [])),
        secret_hash=str(doc["secret_hash"]),
        created_at=as_utc(doc["created_at"]),
        last_used_at=when("last_used_at"),
        revoked_at=when("revoked_at"),
    )


class EdgeStore:
    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.database = database
        self.clients: AsyncCollection[Document] = database["clients"]
        self.api_keys: AsyncCollection[Document] = database["api_keys"]
        # Last-use times live apart from the keys: a busy key's usage writes never contend with
        # its revocation, and a key's document changes only when the key itself does.
        self.key_usage: AsyncCollection[Document] = database["api_key_usage"]
        self.captcha_tokens: AsyncCollection[Document] = database["captcha_tokens"]

    async def create_indexes(self) -> None:
        await ensure_index(self.clients, "display_name", unique=True)
        await ensure_index(self.api_keys, [("client_id", 1), ("_id", 1)])
        await ensure_index(self.captcha_tokens, "expire_at", expire_after_seconds=0)

    # Clients -------------------------------------------------------------------

    async def insert_client(self, client_id: str, display_name: str, now: datetime) -> ClientRecord | None:
        """None when the display name is taken."""
        doc: Document = {"_id": client_id, "display_name": display_name, "created_at": now}
        try:
            await self.clients.insert_one(doc)
        except DuplicateKeyError:
            return None
        return _client(doc)

    async def get_client(self, client_id: str) -> ClientRecord | None:
        doc = await self.clients.find_one({"_id": client_id})
        return _client(doc) if doc else None

    async def find_client_by_name(self, display_name: str) -> ClientRecord | None:
        doc = await self.clients.find_one({"display_name": display_name})
        return _client(doc) if doc else None

    async def list_clients(self, after_id: str, limit: int) -> list[ClientRecord]:
        query: dict[str, Any] = {"_id": {"$gt": after_id}} if after_id else {}
        cursor = self.clients.find(query).sort("_id", 1).limit(limit)
        return [_client(doc) async for doc in cursor]

    # API keys ------------------------------------------------------------------

    async def insert_key(
        self, key_id: str, client_id: str, scopes: list[str], secret_hash: str, now: datetime
    ) -> ApiKeyRecord:
        doc: Document = {
            "_id": key_id,
            "client_id": client_id,
            "scopes": scopes,
            "secret_hash": secret_hash,
            "created_at": now,
            "revoked_at": None,
        }
        await self.api_keys.insert_one(doc)
        return _key(doc)

    async def _with_usage(self, docs: list[Document]) -> list[ApiKeyRecord]:
        if not docs:
            return []
        cursor = self.key_usage.find({"_id": {"$in": [doc["_id"] for doc in docs]}})
        used = {usage["_id"]: usage.get("last_used_at") async for usage in cursor}
        return [_key({**doc, "last_used_at": used.get(doc["_id"])}) for doc in docs]

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        doc = await self.api_keys.find_one({"_id": key_id})
        return (await self._with_usage([doc]))[0] if doc else None

    async def list_keys(self, client_id: str) -> list[ApiKeyRecord]:
        cursor = self.api_keys.find({"client_id": client_id}).sort("_id", 1).limit(1000)
        return await self._with_usage([doc async for doc in cursor])

    async def revoke_key(self, key_id: str, now: datetime) -> ApiKeyRecord | None:
        """Revokes once; a second call returns the key as it is (revoke time unchanged)."""
        doc = await self.api_keys.find_one_and_update(
            {"_id": key_id, "revoked_at": None},
            {"$set": {"revoked_at": now}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            doc = await self.api_keys.find_one({"_id": key_id})
        return (await self._with_usage([doc]))[0] if doc else None

    async def touch_key(self, key_id: str, now: datetime, not_after: datetime) -> None:
        """Sets last_used_at unless another replica already did so after not_after."""
        try:
            await self.key_usage.insert_one({"_id": key_id, "last_used_at": now})
        except DuplicateKeyError:
            await self.key_usage.update_one(
                {"_id": key_id, "last_used_at": {"$lt": not_after}}, {"$set": {"last_used_at": now}}
            )

    # CAPTCHA tokens ------------------------------------------------------------

    async def claim_captcha_token(self, token_hash: str, expire_at: datetime) -> bool:
        """False when the token was presented before (and has not expired)."""
        try:
            await self.captcha_tokens.insert_one({"_id": token_hash, "expire_at": expire_at})
        except DuplicateKeyError:
            return False
        return True

    async def purge_captcha_tokens(self, now: datetime) -> int:
        return await purge_before(self.captcha_tokens, "expire_at", now)

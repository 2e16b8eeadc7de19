"""MongoDB access on pymongo's AsyncMongoClient, within what MongoDB and the dev database both answer alike
(docs/decisions.md: FerretDB on SQLite as the dev database)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from services.core.logging import get_logger

NOT_IMPLEMENTED = 238
Document = dict[str, Any]
log = get_logger(__name__)


def connect(uri: str, app_name: str, *, timeout_ms: int = 5000, max_pool_size: int = 100) -> AsyncMongoClient[Document]:
    """One client per process, shared by everything in it (it pools connections)."""
    return AsyncMongoClient(
        uri,
        appname=f"otpgate-{app_name}",
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        maxPoolSize=max_pool_size,
        # A write that met a failover or a dropped connection is retried once, with no risk of
        # applying twice (the server dedupes it); standalone servers and the dev database do not
        # retry, which the driver detects on its own.
        retryWrites=True,
    )


async def ensure_index(
    collection: AsyncCollection[Document],
    keys: str | Sequence[tuple[str, int]],
    *,
    name: str | None = None,
    unique: bool = False,
    expire_after_seconds: int | None = None,
) -> bool:
    """Create one index per call. A TTL index the server does not implement is skipped
    (returns False): expiry is always checked at read time, and a periodic purge cleans up."""
    options: dict[str, Any] = {"unique": unique}
    if name:
        options["name"] = name
    if expire_after_seconds is not None:
        options["expireAfterSeconds"] = expire_after_seconds
    try:
        await collection.create_index(keys, **options)
    except OperationFailure as exc:
        if exc.code == NOT_IMPLEMENTED and expire_after_seconds is not None:
            log.info("ttl_index_unsupported", collection=collection.name, keys=str(keys))
            return False
        raise
    return True


async def purge_before(
    collection: AsyncCollection[Document], field: str, cutoff: datetime, extra: Mapping[str, Any] | None = None
) -> int:
    """Delete documents whose `field` is older than cutoff: the stand-in for TTL indexes."""
    query: dict[str, Any] = {field: {"$lt": cutoff}, **(extra or {})}
    result = await collection.delete_many(query)
    return int(result.deleted_count)


async def put_by_id(collection: AsyncCollection[Document], doc_id: str, fields: Mapping[str, Any]) -> None:
    """Write the document `doc_id` whole, creating it if needed; the last writer wins. Two writers
    that upsert the same new `_id` at once can have one refused with a duplicate key (MongoDB
    too): the document exists by then, so it is written over."""
    try:
        await collection.replace_one({"_id": doc_id}, dict(fields), upsert=True)
    except DuplicateKeyError:
        await collection.replace_one({"_id": doc_id}, dict(fields))


async def ping(database: AsyncDatabase[Document], timeout: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(database.command("ping"), timeout)
    except (PyMongoError, TimeoutError, OSError):
        return False
    return True

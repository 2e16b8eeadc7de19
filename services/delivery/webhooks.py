"""Status webhooks: a persisted outbox, signed POSTs, retries with backoff, SSRF guard.

Each final status of a message with a callback_url becomes one outbox document
(`<message id>:<status>`, so it is queued once). Dispatchers claim due documents like
messages (claims.py), so restarts keep retrying and replicas never post twice at once.
Signature: X-Otpgate-Signature = hex(HMAC-SHA256(secret, timestamp + "\\n" + body)).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock, as_utc
from services.core.logging import get_logger
from services.core.mongo import Document, ensure_index
from services.delivery import metrics
from services.delivery.claims import Claims
from services.delivery.sms import signature
from services.delivery.wakeup import Wakeup

log = get_logger(__name__)
MAX_URL = 2048


class UnsafeTarget(ValueError):
    pass


def address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def check_url_shape(url: str, *, dev: bool) -> str:
    """Static checks; returns the host. Raises UnsafeTarget with a safe message."""
    if len(url) > MAX_URL:
        raise UnsafeTarget("must be at most 2048 characters")
    parts = urlsplit(url)
    allowed = ("https", "http") if dev else ("https",)
    if parts.scheme not in allowed:
        raise UnsafeTarget("must be an https URL" if not dev else "must be an http(s) URL")
    if not parts.hostname:
        raise UnsafeTarget("must name a host")
    if parts.username or parts.password:
        raise UnsafeTarget("must not carry credentials")
    return parts.hostname


async def resolve_checked(host: str, *, allow_private: bool) -> list[str]:
    """Resolve a host and refuse it if any address is private, loopback, link-local..."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeTarget("host does not resolve") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise UnsafeTarget("host does not resolve")
    if not allow_private and not all(address_allowed(a) for a in addresses):
        raise UnsafeTarget("must not point to a private, loopback or link-local address")
    return addresses


async def check_url(url: str, *, dev: bool) -> None:
    host = check_url_shape(url, dev=dev)
    await resolve_checked(host, allow_private=dev)


class GuardedResolver(AbstractResolver):
    """Checks every address at connection time too (DNS may change after validation)."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private and not all(address_allowed(r["host"]) for r in results):
            raise OSError(f"refused to connect to a private address for {host}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(allow_private: bool) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private), limit=100)
    return aiohttp.ClientSession(connector=connector)


# Outbox -------------------------------------------------------------------------------------


class WebhookOutbox:
    def __init__(
        self,
        collection: AsyncCollection[Document],
        claims: Claims,
        session: aiohttp.ClientSession,
        clock: Clock,
        secret_for: Callable[[str], Awaitable[str]],
        *,
        max_attempts: int = 10,
        timeout: float = 5.0,
        backoff_base: float = 5.0,
        backoff_max: float = 3600.0,
        dev: bool = False,
        wakeup: Wakeup | None = None,
    ) -> None:
        self._dev = dev
        self._wakeup = wakeup or Wakeup(clock)
        self._coll = collection
        self._claims = claims
        self._session = session
        self._clock = clock
        self._secret_for = secret_for
        self.max_attempts = max_attempts
        self._timeout = timeout
        self._base = backoff_base
        self._max = backoff_max

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("state", 1), ("next_at", 1)])
        await ensure_index(self._coll, [("created_at", 1)])

    async def enqueue(self, client_id: str, url: str, event_id: str, payload: dict[str, Any]) -> None:
        now = self._clock.now()
        with contextlib.suppress(DuplicateKeyError):
            await self._coll.insert_one(
                {
                    "_id": event_id,
                    "client_id": client_id,
                    "url": url,
                    "body": json.dumps(payload, separators=(",", ":"), sort_keys=True),
                    "state": "pending",
                    "attempts": 0,
                    "next_at": now,
                    "lease_until": now,
                    "claim_seq": 0,
                    "created_at": now,
                }
            )
        self._wakeup.at(now)

    async def deliver_due_once(self, limit: int = 50) -> int:
        """Post every due webhook once; returns how many were attempted."""
        now = self._clock.now()
        query = {"state": "pending", "next_at": {"$lte": now}, "lease_until": {"$lte": now}}
        docs = [doc async for doc in self._coll.find(query).sort("next_at", 1).limit(limit)]
        attempted = 0
        for doc in docs:
            claim = await self._claims.acquire("webhook", str(doc["_id"]), int(doc.get("claim_seq", 0)))
            if claim is None:
                continue
            fresh = await self._coll.find_one({"_id": doc["_id"]})
            if fresh is None or fresh["state"] != "pending":
                await self._claims.release(claim)
                continue
            await self._coll.update_one(
                {"_id": doc["_id"]}, {"$set": {"lease_until": claim.lease_until, "claim_seq": claim.seq}}
            )
            attempted += 1
            try:
                await self._attempt(fresh, claim.seq)
            finally:
                await self._claims.release(claim)
        return attempted

    async def _attempt(self, doc: Document, seq: int) -> None:
        body = doc["body"].encode()
        attempts = int(doc["attempts"]) + 1
        outcome = "failed"
        try:
            # Checked again at every attempt: DNS may have changed since SendMessage (the guarded
            # resolver checks the addresses actually connected to; IP literals are checked here).
            await check_url(doc["url"], dev=self._dev)
        except UnsafeTarget:
            now = self._clock.now()
            metrics.webhooks_total.labels("unsafe_target").inc()
            log.warning("webhook_target_refused", event_id=doc["_id"])
            await self._coll.update_one(
                {"_id": doc["_id"]},
                {"$set": {"state": "failed", "last_outcome": "unsafe_target", "lease_until": now, "claim_seq": seq}},
            )
            return
        try:
            secret = await self._secret_for(str(doc["client_id"]))
            timestamp = str(int(self._clock.now().timestamp()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "otpgate-webhooks/1",
                "X-Otpgate-Timestamp": timestamp,
                "X-Otpgate-Signature": signature(secret, timestamp, body),
                "X-Otpgate-Event-Id": str(doc["_id"]),
            }
            async with self._session.post(
                doc["url"],
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
                outcome = "delivered" if 200 <= response.status < 300 else f"http_{response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome = type(exc).__name__
        now = self._clock.now()
        changes: dict[str, Any] = {"attempts": attempts, "lease_until": now, "last_outcome": outcome, "claim_seq": seq}
        if outcome == "delivered":
            changes.update(state="delivered", delivered_at=now)
            metrics.webhooks_total.labels("delivered").inc()
        elif attempts > self.max_attempts:
            changes.update(state="failed")
            metrics.webhooks_total.labels("gave_up").inc()
            log.warning("webhook_gave_up", event_id=doc["_id"], attempts=attempts, outcome=outcome)
        else:
            delay = min(self._max, self._base * (2 ** (attempts - 1)))
            changes.update(next_at=now + timedelta(seconds=delay))
            metrics.webhooks_total.labels("retry").inc()
            log.info("webhook_retry", event_id=doc["_id"], attempts=attempts, outcome=outcome, retry_in=delay)
        await self._coll.update_one({"_id": doc["_id"]}, {"$set": changes})
        if "next_at" in changes:
            self._wakeup.at(changes["next_at"])

    async def get(self, event_id: str) -> Document | None:
        return await self._coll.find_one({"_id": event_id})

    async def purge(self, before: datetime) -> None:
        await self._coll.delete_many({"created_at": {"$lt": before}, "state": {"$ne": "pending"}})


def event_payload(message: Any, client_id: str, now: datetime) -> dict[str, Any]:
    """The JSON body of a status webhook (no phone beyond its masked form, no text)."""
    from google.protobuf.json_format import MessageToDict

    return {
        "type": "message.status",
        "client_id": client_id,
        "event_time": as_utc(now).isoformat().replace("+00:00", "Z"),
        "message": MessageToDict(message, preserving_proto_field_name=True),
    }

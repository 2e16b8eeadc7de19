"""API keys: format, issuing, and checking them on the hot path.

A key looks like ``otpg_<key id>_<secret>``: the key id (16 base62 characters) is public
and is the key's database id; the secret is 43 base62 characters (256 bits). Only a keyed
hash of id + secret is stored. A check looks the key up by id (through a short in-process
cache that also remembers unknown ids briefly) and compares hashes in constant time, so
revocation reaches every replica within the cache lifetime.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from otpgate.edge.v1 import edge_pb2

from services.core.clock import Clock
from services.core.crypto import Keyring, UnknownKeyError, constant_time_equals
from services.core.errors import ServiceError, permission_denied, unauthenticated
from services.core.logging import get_logger
from services.edge import metrics
from services.edge.store import ApiKeyRecord, EdgeStore

log = get_logger(__name__)

PREFIX = "otpg"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_ID_LENGTH = 16
SECRET_LENGTH = 43  # 43 * log2(62) > 256 bits
_KEY_RE = re.compile(rf"^{PREFIX}_([0-9A-Za-z]{{{KEY_ID_LENGTH}}})_([0-9A-Za-z]{{{SECRET_LENGTH}}})$")
HASH_PURPOSE = "api-key"

SCOPE_SEND = "messages:send"
SCOPE_READ = "messages:read"
SCOPE_VERIFY = "verify"
SCOPE_ADMIN = "admin"
ALL_SCOPES = (SCOPE_SEND, SCOPE_READ, SCOPE_VERIFY, SCOPE_ADMIN)
DEFAULT_SCOPES = (SCOPE_SEND, SCOPE_READ, SCOPE_VERIFY)

SCOPE_TO_ENUM = {
    SCOPE_SEND: edge_pb2.API_KEY_SCOPE_MESSAGES_SEND,
    SCOPE_READ: edge_pb2.API_KEY_SCOPE_MESSAGES_READ,
    SCOPE_VERIFY: edge_pb2.API_KEY_SCOPE_VERIFY,
    SCOPE_ADMIN: edge_pb2.API_KEY_SCOPE_ADMIN,
}
ENUM_TO_SCOPE = {v: k for k, v in SCOPE_TO_ENUM.items()}


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def new_key() -> tuple[str, str, str]:
    """(key id, secret, full key)."""
    key_id = _random_base62(KEY_ID_LENGTH)
    secret = _random_base62(SECRET_LENGTH)
    return key_id, secret, f"{PREFIX}_{key_id}_{secret}"


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = _KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else None


def hash_secret(keyring: Keyring, key_id: str, secret: str, hash_key_id: str = "") -> str:
    """Keyed hash of a key, stored as "<keyring key id>:<hex>" so it survives a change of the index key
    (Keyring.secret_hash, with the key id kept beside it)."""
    kid = hash_key_id or keyring.index_key_id
    digest = keyring.blind_index(f"secret/{HASH_PURPOSE}", f"{key_id}\x1f{secret}", key_id=kid)
    return f"{kid}:{digest}"


def secret_matches(keyring: Keyring, stored: str, key_id: str, secret: str) -> bool:
    """Constant-time comparison of a presented key with its stored hash."""
    kid, sep, _ = stored.partition(":")
    if not sep:
        return False
    try:
        expected = hash_secret(keyring, key_id, secret, kid)
    except UnknownKeyError:
        return False
    return constant_time_equals(expected, stored)


def normalize_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    """Known scopes in canonical order; empty means the default set. Raises ValueError on unknown."""
    unknown = [s for s in scopes if s not in ALL_SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; expected one of {', '.join(ALL_SCOPES)}")
    chosen = set(scopes) or set(DEFAULT_SCOPES)
    return [s for s in ALL_SCOPES if s in chosen]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the client behind an API key."""

    client_id: str
    key_id: str
    scopes: frozenset[str]


def key_id_of(authorization: str) -> str:
    """The public key id of a well-formed `Authorization: Bearer <key>` ("" otherwise); nothing looked up."""
    parts = split_key(bearer_key(authorization))
    return parts[0] if parts else ""


def bearer_key(authorization: str) -> str:
    """The key of an `Authorization: Bearer <key>` value ("" when absent or not Bearer)."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return value.strip()


class _Cache:
    """A small LRU of key id -> (record or None, fetched at)."""

    def __init__(self, max_entries: int) -> None:
        self._items: OrderedDict[str, tuple[ApiKeyRecord | None, datetime]] = OrderedDict()
        self._max = max_entries

    def get(self, key_id: str) -> tuple[ApiKeyRecord | None, datetime] | None:
        item = self._items.get(key_id)
        if item is not None:
            self._items.move_to_end(key_id)
        return item

    def put(self, key_id: str, record: ApiKeyRecord | None, at: datetime) -> None:
        self._items[key_id] = (record, at)
        self._items.move_to_end(key_id)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def drop(self, key_id: str) -> None:
        self._items.pop(key_id, None)


class Authenticator:
    def __init__(
        self,
        store: EdgeStore,
        keyring: Keyring,
        clock: Clock,
        *,
        cache_seconds: float = 5.0,
        miss_cache_seconds: float = 2.0,
        touch_interval_seconds: float = 60.0,
        max_entries: int = 10_000,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._ttl = timedelta(seconds=cache_seconds)
        self._miss_ttl = timedelta(seconds=miss_cache_seconds)
        self._touch_interval = timedelta(seconds=touch_interval_seconds)
        self._cache = _Cache(max_entries)
        self._decoy_hash = hash_secret(keyring, "0" * KEY_ID_LENGTH, "0" * SECRET_LENGTH)
        self._touched: dict[str, datetime] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def _record(self, key_id: str) -> ApiKeyRecord | None:
        now = self._clock.now()
        cached = self._cache.get(key_id)
        if cached is not None:
            record, at = cached
            if now - at < (self._ttl if record is not None else self._miss_ttl):
                return record
        record = await self._store.get_key(key_id)
        self._cache.put(key_id, record, now)
        return record

    def forget(self, key_id: str) -> None:
        """Drop a key from this replica's cache (after revoking it here)."""
        self._cache.drop(key_id)

    async def authenticate(self, authorization: str, required: frozenset[str]) -> Principal:
        """Checks `Authorization: Bearer <key>` and that the key holds one of `required` (any, if empty)."""
        key = bearer_key(authorization)
        if not key:
            raise self._refuse(
                "missing", unauthenticated("API_KEY_MISSING", "an API key is required (Authorization: Bearer <key>)")
            )
        parts = split_key(key)
        if parts is None:
            raise self._refuse("malformed", unauthenticated("API_KEY_INVALID", "the API key is invalid"))
        key_id, secret = parts
        record = await self._record(key_id)
        # An unknown, a wrong and a revoked key get one answer, after the same work (a hash
        # compared in constant time), so an answer never tells whether a key id exists.
        invalid = unauthenticated("API_KEY_INVALID", "the API key is invalid")
        if record is None:
            secret_matches(self._keyring, self._decoy_hash, key_id, secret)
            raise self._refuse("unknown", invalid)
        if not secret_matches(self._keyring, record.secret_hash, key_id, secret):
            raise self._refuse("wrong_secret", invalid)
        if record.revoked:
            raise self._refuse("revoked", invalid)
        if required and not (required & set(record.scopes)):
            raise self._refuse(
                "scope",
                permission_denied("SCOPE_MISSING", f"the API key lacks the scope {' or '.join(sorted(required))}"),
            )
        self._touch(key_id)
        return Principal(client_id=record.client_id, key_id=key_id, scopes=frozenset(record.scopes))

    @staticmethod
    def _refuse(reason: str, error: ServiceError) -> ServiceError:
        metrics.auth_failures_total.labels(reason).inc()
        return error

    def _touch(self, key_id: str) -> None:
        """Records the last use at most once per interval per key and replica, off the request path."""
        now = self._clock.now()
        last = self._touched.get(key_id)
        if last is not None and now - last < self._touch_interval:
            return
        self._touched[key_id] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        task = asyncio.create_task(self._write_touch(key_id, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_touch(self, key_id: str, now: datetime) -> None:
        try:
            await self._store.touch_key(key_id, now, now - self._touch_interval)
        except Exception as exc:  # last-use bookkeeping must never fail a request
            log.warning("api_key_touch_failed", key_id=key_id, error=type(exc).__name__)

    async def drain(self) -> None:
        """Wait for pending last-use writes (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

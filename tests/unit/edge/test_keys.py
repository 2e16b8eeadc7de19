"""API key format, hashing and the authenticator's cache, revocation and last-use bookkeeping."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from services.edge.admin import ClientAdmin
from services.edge.keys import (
    DEFAULT_SCOPES,
    SCOPE_ADMIN,
    SCOPE_READ,
    SCOPE_SEND,
    Authenticator,
    bearer_key,
    hash_secret,
    new_key,
    normalize_scopes,
    secret_matches,
    split_key,
)
from services.edge.store import EdgeStore


def test_key_format_has_public_id_and_256_bit_secret() -> None:
    key_id, secret, full = new_key()
    assert re.fullmatch(r"otpg_[0-9A-Za-z]{16}_[0-9A-Za-z]{43}", full)
    assert full == f"otpg_{key_id}_{secret}"
    assert split_key(full) == (key_id, secret)
    assert len({new_key()[2] for _ in range(200)}) == 200


@pytest.mark.parametrize(
    "text",
    [
        "",
        "otpg_",
        "otpg_short_secret",
        "sk_" + "a" * 60,
        "otpg_" + "a" * 16 + "_" + "b" * 42,
        "otpg_" + "a" * 16 + "_" + "b" * 43 + "!",
    ],
)
def test_malformed_keys_are_rejected(text: str) -> None:
    assert split_key(text) is None


def test_bearer_parsing() -> None:
    assert bearer_key("Bearer abc") == "abc"
    assert bearer_key("bearer   abc  ") == "abc"
    assert bearer_key("Basic abc") == ""
    assert bearer_key("") == ""


def test_hash_binds_key_id_and_survives_index_key_change(keyring: Keyring) -> None:
    key_id, secret, _ = new_key()
    stored = hash_secret(keyring, key_id, secret)
    assert secret not in stored
    assert stored.startswith(f"{keyring.index_key_id}:")
    assert secret_matches(keyring, stored, key_id, secret)
    assert not secret_matches(keyring, stored, key_id, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert not secret_matches(keyring, stored, new_key()[0], secret)
    # The index key moves to another id: keys hashed before keep working while the old id is in the keyring.
    roots = keyring._roots
    moved = Keyring(roots, primary_id="k2", index_key_id="k1" if keyring.index_key_id == "k2" else "k2")
    assert secret_matches(moved, stored, key_id, secret)
    assert not secret_matches(Keyring({"k9": b"x" * 32}, "k9"), stored, key_id, secret)


def test_scopes() -> None:
    assert normalize_scopes([]) == list(DEFAULT_SCOPES)
    assert normalize_scopes([SCOPE_ADMIN, SCOPE_SEND, SCOPE_SEND]) == [SCOPE_SEND, SCOPE_ADMIN]
    with pytest.raises(ValueError, match="unknown scope"):
        normalize_scopes(["messages:write"])


async def _setup(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> tuple[ClientAdmin, str, str]:
    store = EdgeStore(database)
    await store.create_indexes()
    admin = ClientAdmin(store, keyring, clock)
    client = await admin.create_client("Shop")
    record, key = await admin.create_key(client.id, [SCOPE_READ])
    stored = await database["api_keys"].find_one({"_id": record.id})
    assert stored is not None and key not in str(stored) and key.split("_")[2] not in str(stored)
    return admin, client.id, key


async def _refused(auth: Authenticator, header: str, scopes: frozenset[str] = frozenset()) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await auth.authenticate(header, scopes)
    return caught.value


async def test_authenticate_scopes_and_errors(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    admin, client_id, key = await _setup(database, keyring, clock)
    auth = Authenticator(admin.store, keyring, clock)
    principal = await auth.authenticate(f"Bearer {key}", frozenset({SCOPE_READ}))
    assert principal.client_id == client_id and principal.scopes == {SCOPE_READ}

    missing = await _refused(auth, "")
    assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")
    malformed = await _refused(auth, "Bearer nope")
    assert (malformed.code, malformed.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    wrong = key[:-1] + ("x" if key[-1] != "x" else "y")
    assert (await _refused(auth, f"Bearer {wrong}")).reason == "API_KEY_INVALID"
    unknown = new_key()[2]
    assert (await _refused(auth, f"Bearer {unknown}")).reason == "API_KEY_INVALID"
    scope = await _refused(auth, f"Bearer {key}", frozenset({SCOPE_SEND}))
    assert (scope.code, scope.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
    for error in (missing, malformed, scope):
        assert key not in error.message


async def test_revocation_reaches_other_replicas_within_cache_lifetime(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    admin, _, key = await _setup(database, keyring, clock)
    here = Authenticator(admin.store, keyring, clock, cache_seconds=5)
    there = Authenticator(admin.store, keyring, clock, cache_seconds=5)
    await here.authenticate(f"Bearer {key}", frozenset())
    await there.authenticate(f"Bearer {key}", frozenset())
    key_id = split_key(key)[0]  # type: ignore[index]
    await admin.revoke_key(key_id)
    here.forget(key_id)
    assert (await _refused(here, f"Bearer {key}")).reason == "API_KEY_INVALID"
    # The other replica still has the key cached (the hot path does not touch the database) ...
    await there.authenticate(f"Bearer {key}", frozenset())
    clock.advance(5.1)
    # ... until its cache entry lapses.
    assert (await _refused(there, f"Bearer {key}")).reason == "API_KEY_INVALID"


async def test_unknown_ids_are_cached_briefly(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    admin, client_id, _ = await _setup(database, keyring, clock)
    auth = Authenticator(admin.store, keyring, clock, miss_cache_seconds=2)
    key_id, secret, full = new_key()
    await _refused(auth, f"Bearer {full}")
    await admin.store.insert_key(key_id, client_id, [SCOPE_READ], hash_secret(keyring, key_id, secret), clock.now())
    await _refused(auth, f"Bearer {full}")  # the miss is remembered
    clock.advance(2.1)
    assert (await auth.authenticate(f"Bearer {full}", frozenset())).key_id == key_id


async def test_last_use_is_written_at_most_once_a_minute(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    admin, client_id, key = await _setup(database, keyring, clock)
    auth = Authenticator(admin.store, keyring, clock)
    key_id = split_key(key)[0]  # type: ignore[index]
    first = clock.now()
    for _ in range(5):
        await auth.authenticate(f"Bearer {key}", frozenset())
    await auth.drain()
    assert (await admin.store.get_key(key_id)).last_used_at == first  # type: ignore[union-attr]
    clock.advance(30)
    await auth.authenticate(f"Bearer {key}", frozenset())
    await auth.drain()
    assert (await admin.store.get_key(key_id)).last_used_at == first  # type: ignore[union-attr]
    clock.advance(31)
    await auth.authenticate(f"Bearer {key}", frozenset())
    await auth.drain()
    assert (await admin.store.get_key(key_id)).last_used_at == clock.now()  # type: ignore[union-attr]
    # Another replica within the minute does not write again.
    other = Authenticator(admin.store, keyring, clock)
    clock.advance(10)
    await other.authenticate(f"Bearer {key}", frozenset())
    await other.drain()
    await asyncio.sleep(0)
    assert (await admin.store.get_key(key_id)).last_used_at != clock.now()  # type: ignore[union-attr]
    assert client_id


async def test_admin_client_and_key_lifecycle(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock
) -> None:
    admin, client_id, _ = await _setup(database, keyring, clock)
    with pytest.raises(ServiceError) as taken:
        await admin.create_client("Shop")
    assert taken.value.reason == "CLIENT_EXISTS"
    with pytest.raises(ServiceError) as empty:
        await admin.create_client("  ")
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await admin.client("Shop")).id == client_id
    with pytest.raises(ServiceError) as unknown_client:
        await admin.create_key("nobody", [])
    assert unknown_client.value.reason == "CLIENT_NOT_FOUND"
    keys = await admin.list_keys(client_id)
    assert len(keys) == 1 and keys[0].revoked_at is None
    revoked = await admin.revoke_key(keys[0].id)
    clock.advance(10)
    again = await admin.revoke_key(keys[0].id)
    assert revoked.revoked_at == again.revoked_at
    with pytest.raises(ServiceError) as missing:
        await admin.revoke_key("nope")
    assert missing.value.reason == "API_KEY_NOT_FOUND"

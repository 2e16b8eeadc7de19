"""Clients and API keys: the operator's side (AdminService and `otpgate clients/apikeys`)."""

from __future__ import annotations

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.errors import Violations, already_exists, invalid_argument, not_found
from services.core.ids import new_id
from services.edge.keys import hash_secret, new_key, normalize_scopes
from services.edge.store import ApiKeyRecord, ClientRecord, EdgeStore

MAX_NAME_LENGTH = 100


class ClientAdmin:
    def __init__(self, store: EdgeStore, keyring: Keyring, clock: Clock) -> None:
        self.store = store
        self._keyring = keyring
        self._clock = clock

    async def create_client(self, display_name: str) -> ClientRecord:
        name = display_name.strip()
        problems = Violations()
        problems.check(bool(name), "display_name", "must not be empty")
        problems.check(len(name) <= MAX_NAME_LENGTH, "display_name", f"at most {MAX_NAME_LENGTH} characters")
        problems.check(name.isprintable(), "display_name", "must be printable text")
        problems.raise_if_any()
        now = self._clock.now()
        created = await self.store.insert_client(new_id(int(now.timestamp() * 1000)), name, now)
        if created is None:
            raise already_exists("a client with this name exists", "CLIENT_EXISTS")
        return created

    async def client(self, client_id_or_name: str) -> ClientRecord:
        found = await self.store.get_client(client_id_or_name) if client_id_or_name else None
        if found is None and client_id_or_name:
            found = await self.store.find_client_by_name(client_id_or_name)
        if found is None:
            raise not_found("client", "CLIENT_NOT_FOUND")
        return found

    async def create_key(self, client_id: str, scopes: list[str]) -> tuple[ApiKeyRecord, str]:
        """The stored key and the full key (shown once)."""
        try:
            chosen = normalize_scopes(scopes)
        except ValueError as exc:
            raise invalid_argument([("scopes", str(exc))]) from None
        client = await self.client(client_id)
        key_id, secret, full = new_key()
        record = await self.store.insert_key(
            key_id, client.id, chosen, hash_secret(self._keyring, key_id, secret), self._clock.now()
        )
        return record, full

    async def list_keys(self, client_id: str) -> list[ApiKeyRecord]:
        client = await self.client(client_id)
        return await self.store.list_keys(client.id)

    async def revoke_key(self, key_id: str) -> ApiKeyRecord:
        record = await self.store.revoke_key(key_id, self._clock.now()) if key_id else None
        if record is None:
            raise not_found("API key", "API_KEY_NOT_FOUND")
        return record

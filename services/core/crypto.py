"""Encryption at rest, blind indexes and keyed code hashes.

Root keys come from configuration as a keyring (key id -> 32 random bytes) with one
primary id. Every purpose gets its own key derived with HKDF, so a root key is never
used directly. Sealed values are AES-256-GCM with a random 96-bit nonce; the associated
data binds collection, document id, field and key id, so a ciphertext cannot be moved
to another document or field, nor relabelled with another key id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_FORMAT = 1
_NONCE_BYTES = 12
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class CryptoError(Exception):
    """A sealed value cannot be opened, or the keyring is unusable. Never carries plaintext."""


class UnknownKeyError(CryptoError):
    pass


class DecryptionError(CryptoError):
    pass


@dataclass(frozen=True)
class SealContext:
    """Where a sealed value lives; becomes the associated data."""

    collection: str
    document_id: str
    field: str

    def associated_data(self, key_id: str) -> bytes:
        return "\x1f".join(("otpgate", self.collection, self.document_id, self.field, key_id)).encode()


def _derive(root: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(root)


class Keyring:
    def __init__(self, keys: Mapping[str, bytes], primary_id: str, index_key_id: str | None = None) -> None:
        if not keys:
            raise CryptoError("keyring is empty")
        for key_id, key in keys.items():
            if not _KEY_ID_RE.match(key_id):
                raise CryptoError(f"bad key id {key_id!r}: use 1-32 of A-Z a-z 0-9 _ -")
            if len(key) != 32:
                raise CryptoError(f"key {key_id!r} must be 32 bytes, got {len(key)}")
        if primary_id not in keys:
            raise UnknownKeyError(f"primary key id {primary_id!r} is not in the keyring")
        index_key_id = index_key_id or primary_id
        if index_key_id not in keys:
            raise UnknownKeyError(f"index key id {index_key_id!r} is not in the keyring")
        self._roots = dict(keys)
        self.primary_id = primary_id
        # Blind indexes must stay stable when the primary key rotates, so they use their own key id.
        self.index_key_id = index_key_id

    @classmethod
    def parse(cls, spec: str, primary_id: str = "", index_key_id: str = "") -> Keyring:
        """Parse "id1:base64key,id2:base64key". The primary defaults to the last id listed."""
        keys: dict[str, bytes] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key_id, sep, encoded = item.partition(":")
            if not sep:
                raise CryptoError("each key must look like id:base64")
            try:
                keys[key_id] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise CryptoError(f"key {key_id!r} is not valid base64") from exc
        if not keys:
            raise CryptoError("no keys given")
        return cls(keys, primary_id or list(keys)[-1], index_key_id or None)

    @staticmethod
    def generate_spec(key_id: str) -> str:
        return f"{key_id}:{base64.b64encode(os.urandom(32)).decode()}"

    @property
    def key_ids(self) -> list[str]:
        return list(self._roots)

    def _root(self, key_id: str) -> bytes:
        try:
            return self._roots[key_id]
        except KeyError:
            raise UnknownKeyError(f"unknown key id {key_id!r}") from None

    @lru_cache(maxsize=64)  # noqa: B019 - keyrings live as long as the process
    def _purpose_key(self, key_id: str, purpose: str) -> bytes:
        return _derive(self._root(key_id), f"otpgate/{purpose}/v1")

    def _aead(self, key_id: str) -> AESGCM:
        return AESGCM(self._purpose_key(key_id, "seal"))

    # Sealing -----------------------------------------------------------------

    def seal(self, plaintext: bytes | str, context: SealContext) -> bytes:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        key_id = self.primary_id
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = self._aead(key_id).encrypt(nonce, data, context.associated_data(key_id))
        kid = key_id.encode()
        return bytes([_FORMAT, len(kid)]) + kid + nonce + ciphertext

    def open(self, sealed: bytes, context: SealContext) -> bytes:
        key_id, nonce, ciphertext = self._split(sealed)
        try:
            return self._aead(key_id).decrypt(nonce, ciphertext, context.associated_data(key_id))
        except InvalidTag:
            raise DecryptionError(f"cannot open {context.collection}.{context.field}: tampered or misplaced") from None

    def open_str(self, sealed: bytes, context: SealContext) -> str:
        return self.open(sealed, context).decode()

    def key_id_of(self, sealed: bytes) -> str:
        return self._split(sealed)[0]

    def needs_rotation(self, sealed: bytes) -> bool:
        return self.key_id_of(sealed) != self.primary_id

    def reseal(self, sealed: bytes, context: SealContext) -> bytes:
        return self.seal(self.open(sealed, context), context)

    @staticmethod
    def _split(sealed: bytes) -> tuple[str, bytes, bytes]:
        blob = bytes(sealed)
        if len(blob) < 2 or blob[0] != _FORMAT:
            raise DecryptionError("not a sealed value")
        kid_len = blob[1]
        header = 2 + kid_len
        if len(blob) < header + _NONCE_BYTES + 16:
            raise DecryptionError("sealed value is truncated")
        key_id = blob[2:header].decode(errors="replace")
        return key_id, blob[header : header + _NONCE_BYTES], blob[header + _NONCE_BYTES :]

    # Blind indexes and code hashes ---------------------------------------------

    def blind_index(self, purpose: str, value: str, key_id: str | None = None) -> str:
        """Deterministic HMAC-SHA256 of a value, for equality lookups without plaintext."""
        key = self._purpose_key(key_id or self.index_key_id, f"blind-index/{purpose}")
        return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()

    def blind_indexes(self, purpose: str, value: str) -> list[str]:
        """The value's blind index under the index key first, then under every other key: lookups
        that match any of them find records indexed before an index-key rotation until
        `otpgate keys rotate` has recomputed them."""
        others = [key_id for key_id in self.key_ids if key_id != self.index_key_id]
        return [self.blind_index(purpose, value, key_id) for key_id in [self.index_key_id, *others]]

    def code_hash(self, subject_id: str, code: str, key_id: str | None = None) -> str:
        """HMAC-SHA256 of a code bound to what it verifies; stored as "<key id>:<hex>"."""
        kid = key_id or self.primary_id
        key = self._purpose_key(kid, "code")
        digest = hmac.new(key, f"{subject_id}\x1f{code}".encode(), hashlib.sha256).hexdigest()
        return f"{kid}:{digest}"

    def code_matches(self, stored_hash: str, subject_id: str, code: str) -> bool:
        """Constant-time check of a code against a stored code_hash."""
        key_id, _, _ = stored_hash.partition(":")
        try:
            expected = self.code_hash(subject_id, code, key_id)
        except UnknownKeyError:
            return False
        return hmac.compare_digest(expected.encode(), stored_hash.encode())

    def secret_hash(self, purpose: str, secret: str) -> str:
        """Keyed hash for secrets such as API keys (compare with hmac.compare_digest)."""
        return self.blind_index(f"secret/{purpose}", secret)


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)

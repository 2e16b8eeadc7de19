"""Declarations of sealed fields, so one `otpgate keys rotate` re-encrypts every service's data.

Each service lists its sealed fields in services/<name>/sealed.py as SEALED_FIELDS.
A sealed field holds bytes from Keyring.seal with SealContext(collection, str(doc["_id"]), field).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SealedField:
    collection: str
    # Top-level field holding the sealed bytes (absent or None: nothing to rotate).
    field: str

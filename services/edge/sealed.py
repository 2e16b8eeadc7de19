"""The edge seals nothing: API keys and CAPTCHA tokens are kept only as keyed hashes."""

from __future__ import annotations

from services.core.rotation import SealedField

SEALED_FIELDS: list[SealedField] = []

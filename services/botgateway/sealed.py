"""Sealed fields of the bot gateway (re-encrypted by `otpgate keys rotate`)."""

from __future__ import annotations

from services.core.rotation import SealedField

SEALED_FIELDS = (
    SealedField("bots", "token_sealed"),
    SealedField("bots", "session_sealed"),
)

"""Sealed fields of the simulated Telegram (re-encrypted by `otpgate keys rotate` in sandbox mode)."""

from __future__ import annotations

from services.core.rotation import SealedField

SEALED_FIELDS = (
    SealedField("users", "phone_sealed"),
    SealedField("bots", "token_sealed"),
    SealedField("updates", "text_sealed"),
    SealedField("updates", "contact_sealed"),
    SealedField("gateway_requests", "phone_sealed"),
    SealedField("gateway_requests", "code_sealed"),
    SealedField("gateway_requests", "text_sealed"),
    SealedField("gateway_requests", "entered_sealed"),
)

"""Sealed fields of the delivery service (for key rotation)."""

from __future__ import annotations

from services.core.rotation import SealedField

SEALED_FIELDS = [
    SealedField("messages", "text"),
    SealedField("messages", "phone"),
    SealedField("messages", "code"),
    SealedField("policies", "webhook_secret"),
    SealedField("policies", "telegram_gateway_token"),
    SealedField("sandbox_sms", "text"),
    SealedField("sandbox_sms", "phone"),
]

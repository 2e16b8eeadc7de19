"""Sealed fields of the verification service (for `otpgate keys rotate`)."""

from __future__ import annotations

from services.core.rotation import SealedField

VERIFICATIONS = "verifications"
CONFIRMATIONS = "confirmations"

# The code is sealed only while it may still be re-sent, the phone only while it may be needed
# to re-send or to finish a confirmation; both are erased at the final state.
SEALED_FIELDS = [
    SealedField(VERIFICATIONS, "code"),
    SealedField(VERIFICATIONS, "phone"),
    SealedField(CONFIRMATIONS, "code"),
    SealedField(CONFIRMATIONS, "phone"),
]

"""What the directory keeps sealed or blind-indexed, for `otpgate keys rotate`."""

from __future__ import annotations

from services.core.rotation import SealedField
from services.core.rotation_runner import BlindIndex

SUBSCRIBERS = "subscribers"

SEALED_FIELDS = [SealedField(SUBSCRIBERS, "phone")]

# The phone's blind index is recomputed with the current index key from the sealed phone.
# On a clash (two records for one number, possible only while replicas disagreed on the index
# key), the record linked most recently keeps the number: the newest owner wins.
BLIND_INDEXES = [
    BlindIndex(
        collection=SUBSCRIBERS,
        field="phone_index",
        key_field="phone_index_key",
        purpose="phone",
        source=SealedField(SUBSCRIBERS, "phone"),
        newest_field="linked_at",
    )
]

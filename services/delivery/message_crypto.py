"""What delivery derives from the keyring for a message.

The number and the text are sealed (AES-256-GCM) bound to the message: SealContext("messages",
<message id>, "phone" | "text"), so a sealed value copied into another document does not open.
Blind indexes (HMAC-SHA256, one derived key per purpose) stand in for values that must be matched
but never stored in clear: "phone" (the held messages of a number are found by it), "limit-key"
(rate-limit counter ids carry no number, IP, session or client id) and "message-request" (the
fingerprint that tells a repeat of a request_id from a different message under the same id).
"""

from __future__ import annotations

import grpc

from services.core.crypto import Keyring, SealContext
from services.core.errors import ServiceError
from services.delivery.record import MessageRecord


class MessageCrypto:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def seal_phone(self, message_id: str, e164: str) -> bytes:
        return self.keyring.seal(e164, SealContext("messages", message_id, "phone"))

    def seal_text(self, message_id: str, text: str) -> bytes:
        return self.keyring.seal(text, SealContext("messages", message_id, "text"))

    def seal_code(self, message_id: str, code: str) -> bytes:
        return self.keyring.seal(code, SealContext("messages", message_id, "code"))

    def open_code(self, record: MessageRecord) -> str:
        if record.code_sealed is None:
            return ""
        return self.keyring.open_str(record.code_sealed, SealContext("messages", record.id, "code"))

    def open_phone(self, record: MessageRecord) -> str:
        if not record.phone_sealed:
            raise ServiceError(grpc.StatusCode.INTERNAL, "PHONE_PURGED", "the message's number is no longer kept")
        return self.keyring.open_str(record.phone_sealed, SealContext("messages", record.id, "phone"))

    def open_text(self, record: MessageRecord) -> str:
        if not record.text_sealed:
            raise ServiceError(grpc.StatusCode.INTERNAL, "TEXT_PURGED", "message text is no longer kept")
        return self.keyring.open_str(record.text_sealed, SealContext("messages", record.id, "text"))

    def phone_index(self, e164: str) -> str:
        return self.keyring.blind_index("phone", e164)

    def phone_indexes(self, e164: str) -> list[str]:
        """Every index a message of this number may carry (current key first): held messages
        indexed before an index-key rotation are found until the rotation recomputed them."""
        return self.keyring.blind_indexes("phone", e164)

    def limit_key(self, value: str) -> str:
        return self.keyring.blind_index("limit-key", value)[:32]

    def request_fingerprint(self, parts: list[str]) -> str:
        return self.keyring.blind_index("message-request", "\x1f".join(parts))

"""How an SMS text travels: its alphabet, and its parts when it does not fit one SMS.

The rules of 3GPP TS 23.038 / 23.040, as every SMSC and handset applies them:
- GSM-7 when every character is in the GSM 03.38 default alphabet or its extension table
  (an extension character, e.g. € [ ] { } ~ ^ \\ |, costs two septets: escape + code); UCS-2
  (UTF-16BE) otherwise.
- One SMS carries 160 septets, or 140 octets of UCS-2 (70 characters).
- A longer text goes as concatenated parts, each opening with a 6-octet user data header
  (IEI 0x00, one-octet reference, total, sequence), leaving 153 septets or 134 octets.
  An escape is never split from its character, nor a UTF-16 surrogate pair.
- Over SMPP, GSM-7 travels unpacked (one septet per octet) as data_coding 0, the SMSC default
  alphabet; the SMSC packs it for the radio.

Every part is billed by the carrier as one SMS: `count_parts` is what usage counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from aiosmpplib.codec import GSM7BitCodec, UCS2Codec

GSM7 = 0x00  # data_coding: SMSC default alphabet (GSM 03.38)
UCS2 = 0x08  # data_coding: UCS-2

ESCAPE = 0x1B
SINGLE_GSM7 = 160
SINGLE_UCS2 = 140
UDH_LENGTH = 6
PART_GSM7 = SINGLE_GSM7 - UDH_LENGTH - 1  # 153: the header plus fill bits take 7 septets
PART_UCS2 = SINGLE_UCS2 - UDH_LENGTH  # 134 octets, 67 characters
MAX_PARTS = 255

_GSM = GSM7BitCodec()
_UCS2 = UCS2Codec()


@dataclass(frozen=True)
class EncodedSms:
    data_coding: int
    # The short_message of each submit_sm: with a user data header when there is more than one.
    parts: tuple[bytes, ...]

    @property
    def concatenated(self) -> bool:
        return len(self.parts) > 1


def reference_for(message_id: str) -> int:
    """The concatenation reference of a message: the same on every attempt, so a part sent
    again joins the parts the handset already holds."""
    return hashlib.sha256(message_id.encode()).digest()[0]


def encode_sms(text: str, reference: int) -> EncodedSms:
    if GSM7BitCodec.is_gsm_text(text):
        data_coding, payload, single, per_part = GSM7, _GSM.encode(text)[0], SINGLE_GSM7, PART_GSM7
    else:
        data_coding, payload, single, per_part = UCS2, _UCS2.encode(text)[0], SINGLE_UCS2, PART_UCS2
    if len(payload) <= single:
        return EncodedSms(data_coding, (payload,))
    chunks = _split(payload, per_part, data_coding)
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"the text needs {len(chunks)} SMS parts; at most {MAX_PARTS} can be concatenated")
    total = len(chunks)
    parts = tuple(bytes((UDH_LENGTH - 1, 0x00, 0x03, reference & 0xFF, total, n)) + c for n, c in enumerate(chunks, 1))
    return EncodedSms(data_coding, parts)


def count_parts(text: str) -> int:
    """How many SMS the text is billed as."""
    return len(encode_sms(text, 0).parts)


def decode_sms(data_coding: int, payload: bytes) -> str:
    """The text of a (reassembled) short message; for receipts and tests."""
    return str((_UCS2 if data_coding == UCS2 else _GSM).decode(payload)[0])


def _split(payload: bytes, size: int, data_coding: int) -> list[bytes]:
    chunks: list[bytes] = []
    start = 0
    while start < len(payload):
        end = min(start + size, len(payload))
        if end < len(payload):
            if data_coding == GSM7 and payload[end - 1] == ESCAPE:
                end -= 1  # the escaped character follows: keep the pair together
            elif data_coding == UCS2 and 0xD8 <= payload[end - 2] <= 0xDB:
                end -= 2  # a high surrogate: its low half follows
        chunks.append(payload[start:end])
        start = end
    return chunks

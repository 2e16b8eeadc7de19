"""SMS alphabets and concatenation: GSM-7 vs UCS-2, the 160/153 and 70/67 limits, UDH parts."""

from __future__ import annotations

import pytest

from services.delivery.sms_text import GSM7, UCS2, count_parts, decode_sms, encode_sms, reference_for


def joined(parts: tuple[bytes, ...]) -> bytes:
    return b"".join(part[6:] for part in parts) if len(parts) > 1 else parts[0]


def test_gsm7_fits_160_septets_in_one_sms_and_an_extension_character_costs_two() -> None:
    assert encode_sms("a" * 160, 1).parts == (b"a" * 160,)
    assert count_parts("a" * 161) == 2
    euro = encode_sms("€" + "a" * 158, 1)  # 2 + 158 = 160 septets
    assert euro.data_coding == GSM7 and len(euro.parts) == 1 and euro.parts[0][:2] == b"\x1b\x65"
    assert count_parts("€" + "a" * 159) == 2  # 161 septets although 160 characters


def test_long_gsm7_goes_as_153_septet_parts_with_a_concatenation_header() -> None:
    text = "x" * 400
    sms = encode_sms(text, 0x2A)
    assert sms.data_coding == GSM7 and sms.concatenated
    assert [len(p) - 6 for p in sms.parts] == [153, 153, 94]
    assert [p[:6] for p in sms.parts] == [bytes([5, 0, 3, 0x2A, 3, n]) for n in (1, 2, 3)]
    assert decode_sms(GSM7, joined(sms.parts)) == text


def test_an_escape_is_never_split_from_its_character() -> None:
    text = "a" * 152 + "€" + "b" * 10  # the euro's escape would be septet 153
    sms = encode_sms(text, 1)
    assert sms.parts[0][6:] == b"a" * 152 and sms.parts[1][6:8] == b"\x1b\x65"
    assert decode_sms(GSM7, joined(sms.parts)) == text


def test_ucs2_for_anything_outside_gsm_with_70_and_67_character_limits() -> None:
    assert encode_sms("ж" * 70, 1).parts == (("ж" * 70).encode("utf-16-be"),)
    sms = encode_sms("Ваш код 1234", 1)
    assert sms.data_coding == UCS2 and decode_sms(UCS2, sms.parts[0]) == "Ваш код 1234"
    long = encode_sms("ж" * 71, 9)
    assert [len(p) - 6 for p in long.parts] == [134, 8] and long.parts[0][:6] == bytes([5, 0, 3, 9, 2, 1])


def test_a_surrogate_pair_is_never_split() -> None:
    text = "ж" * 66 + "😀" + "ж" * 5  # the emoji's high half would end part one
    sms = encode_sms(text, 1)
    assert len(sms.parts[0]) - 6 == 132
    assert decode_sms(UCS2, joined(sms.parts)) == text


def test_the_reference_is_stable_per_message_and_the_part_count_is_bounded() -> None:
    assert reference_for("01JABC") == reference_for("01JABC")
    assert 0 <= reference_for("01JABD") <= 255
    with pytest.raises(ValueError, match="at most 255"):
        encode_sms("ж" * 67 * 256, 1)

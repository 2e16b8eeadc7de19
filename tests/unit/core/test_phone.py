from __future__ import annotations

import phonenumbers
import pytest
from phonenumbers import PhoneNumberType

from services.core.phone import InvalidPhoneError, LineType, mask_phone, parse_phone


def test_parses_e164_with_region_and_line_type() -> None:
    phone = parse_phone("+7 999 123-45-67")
    assert phone.e164 == "+79991234567"
    assert phone.region == "RU"
    assert phone.country_code == 7
    assert phone.line_type == LineType.MOBILE
    assert phone.prefix == "+7999123"
    assert phone.sms_line_type_allowed


def test_telegram_contact_numbers_come_without_plus() -> None:
    assert parse_phone("79991234567", plus_optional=True).e164 == "+79991234567"
    with pytest.raises(InvalidPhoneError):
        parse_phone("79991234567")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "+",
        "+1",
        "hello",
        "+7999abc4567",
        "+7" + "9" * 40,
        "+00000000000",
        "+7 (999) 12",
        "+44 20 7946 09999999",
    ],
)
def test_invalid_input_is_refused_without_echo(raw: str) -> None:
    with pytest.raises(InvalidPhoneError) as info:
        parse_phone(raw)
    if len(raw.strip()) > 4:
        assert raw.strip() not in str(info.value)


def test_premium_rate_numbers_are_not_for_sms() -> None:
    phone = parse_phone("+19005550123")
    assert phone.line_type == LineType.PREMIUM_RATE
    assert not phone.sms_line_type_allowed


@pytest.mark.parametrize(
    ("e164", "masked"),
    [("+79991234567", "+7******4567"), ("+442079460958", "+44******0958"), ("+12025550143", "+1******0143")],
)
def test_masking_keeps_only_country_code_and_last_four(e164: str, masked: str) -> None:
    assert mask_phone(e164) == masked


def _numbers_of_every_region() -> list[str]:
    """An example number of every region and line type, and each of them one digit short and one long."""
    numbers = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.PREMIUM_RATE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
                numbers += [e164, e164[:-1], e164 + "5"]
    return numbers


def test_valid_exactly_when_the_library_says_so() -> None:
    """parse_phone reads validity from the number's type; it must agree with is_valid_number everywhere."""
    numbers = _numbers_of_every_region()
    assert len(numbers) > 1000
    for raw in numbers:
        expected = phonenumbers.is_valid_number(phonenumbers.parse(raw, None))
        try:
            parsed = parse_phone(raw)
        except InvalidPhoneError:
            assert not expected, raw
            continue
        assert expected, raw
        assert parsed.region == phonenumbers.region_code_for_number(phonenumbers.parse(raw, None))

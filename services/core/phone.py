"""Phone numbers: parsing to E.164 with region and line type, and masking."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

MAX_INPUT = 32


class LineType(StrEnum):
    MOBILE = "mobile"
    FIXED_LINE = "fixed_line"
    FIXED_LINE_OR_MOBILE = "fixed_line_or_mobile"
    TOLL_FREE = "toll_free"
    PREMIUM_RATE = "premium_rate"
    SHARED_COST = "shared_cost"
    VOIP = "voip"
    PERSONAL_NUMBER = "personal_number"
    PAGER = "pager"
    UAN = "uan"
    VOICEMAIL = "voicemail"
    UNKNOWN = "unknown"


_LINE_TYPES = {
    PhoneNumberType.MOBILE: LineType.MOBILE,
    PhoneNumberType.FIXED_LINE: LineType.FIXED_LINE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE: LineType.FIXED_LINE_OR_MOBILE,
    PhoneNumberType.TOLL_FREE: LineType.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE: LineType.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST: LineType.SHARED_COST,
    PhoneNumberType.VOIP: LineType.VOIP,
    PhoneNumberType.PERSONAL_NUMBER: LineType.PERSONAL_NUMBER,
    PhoneNumberType.PAGER: LineType.PAGER,
    PhoneNumberType.UAN: LineType.UAN,
    PhoneNumberType.VOICEMAIL: LineType.VOICEMAIL,
}

# Line types that never get an SMS from us: they cost the sender or are favourite pumping targets.
SMS_REFUSED_LINE_TYPES = frozenset({LineType.PREMIUM_RATE, LineType.SHARED_COST, LineType.VOIP, LineType.UNKNOWN})


class InvalidPhoneError(ValueError):
    """The input is not a valid phone number. The message never repeats the input."""


@dataclass(frozen=True)
class Phone:
    e164: str
    region: str
    country_code: int
    line_type: LineType

    @property
    def masked(self) -> str:
        return mask_phone(self.e164)

    @property
    def prefix(self) -> str:
        """The number without its last 4 digits: the unit of prefix velocity and conversion."""
        return self.e164[:-4]

    @property
    def sms_line_type_allowed(self) -> bool:
        return self.line_type not in SMS_REFUSED_LINE_TYPES


_ALLOWED = re.compile(r"^[+\d][\d\s().-]*$")


def parse_phone(raw: str, *, plus_optional: bool = False) -> Phone:
    """Parse an international number. With plus_optional, "79991234567" (as Telegram sends
    contact numbers) is read as international too."""
    text = raw.strip()
    if not text:
        raise InvalidPhoneError("phone is empty")
    if len(text) > MAX_INPUT or not _ALLOWED.match(text):
        raise InvalidPhoneError("phone must be an E.164 number like +79991234567")
    if not text.startswith("+"):
        if not plus_optional:
            raise InvalidPhoneError("phone must start with + and the country code (E.164)")
        text = "+" + text
    try:
        number = phonenumbers.parse(text, None)
    except NumberParseException:
        raise InvalidPhoneError("phone is not a valid international number") from None
    # A number is valid exactly when its country's patterns give it a type (is_valid_number is that
    # test too): one match of the patterns answers both, where asking each would match them twice.
    kind = phonenumbers.number_type(number)
    if kind == PhoneNumberType.UNKNOWN:
        raise InvalidPhoneError("phone is not a valid number for its country")
    region = phonenumbers.region_code_for_number(number) or "ZZ"
    line_type = _LINE_TYPES.get(kind, LineType.UNKNOWN)
    return Phone(
        e164=phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
        region=region,
        country_code=int(number.country_code or 0),
        line_type=line_type,
    )


_COUNTRY_CODES = frozenset(str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def _country_code(digits: str) -> str:
    """The country calling code an international number starts with ("" if none): codes are
    prefix-free, 1 to 3 digits, so the first known prefix is the one (as the parser finds it)."""
    for size in (1, 2, 3):
        if digits[:size] in _COUNTRY_CODES:
            return digits[:size]
    return ""


def mask_phone(e164: str) -> str:
    """+79991234567 -> +7******4567: country code and last 4 digits, never more."""
    digits = e164.lstrip("+")
    if len(digits) <= 4:
        return "+" + "*" * len(digits)
    cc = _country_code(digits)
    if len(digits) - len(cc) <= 4:
        cc = ""
    hidden = len(digits) - len(cc) - 4
    return f"+{cc}{'*' * hidden}{digits[-4:]}"

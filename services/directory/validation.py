"""Request validation: every problem is collected into one INVALID_ARGUMENT with field violations."""

from __future__ import annotations

import re

from services.core.errors import Violations
from services.core.phone import InvalidPhoneError, Phone, parse_phone

# Bot ids become field names in subscriber documents: letters, digits and underscores only.
BOT_ID_RE = re.compile(r"^[A-Za-z0-9_]{3,64}$")
# Telegram user ids are positive and fit in 52 bits (Telegram's own promise); leave headroom.
MAX_USER_ID = (1 << 53) - 1


def check_bot_id(violations: Violations, value: str, field: str = "bot_id", *, required: bool = True) -> str:
    if not value:
        if required:
            violations.add(field, "is required")
        return ""
    if len(value) > 64:
        violations.add(field, "must be at most 64 characters")
    elif not BOT_ID_RE.match(value):
        violations.add(field, "must be 3-64 letters, digits or underscores")
    return value


def check_user_id(violations: Violations, value: int, field: str = "telegram_user_id") -> int:
    if value == 0:
        violations.add(field, "is required")
    elif value < 0 or value > MAX_USER_ID:
        violations.add(field, f"must be between 1 and {MAX_USER_ID}")
    return value


def check_phone(
    violations: Violations, value: str, field: str = "phone", *, plus_optional: bool = False
) -> Phone | None:
    if not value:
        violations.add(field, "is required")
        return None
    try:
        return parse_phone(value, plus_optional=plus_optional)
    except InvalidPhoneError as exc:
        violations.add(field, str(exc))
        return None

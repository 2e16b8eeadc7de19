"""Localised texts of every message the verification service has delivery send. One place, en and ru.

Codes are inserted here and nowhere else; the texts go to delivery sealed, never to logs.
"""

from __future__ import annotations

DEFAULT_LOCALE = "en"

_VERIFICATION = {
    "en": "{code} is your verification code. It expires in {minutes} min. Never share it with anyone.",
    "ru": "{code} — ваш код подтверждения. Он действует {minutes} мин. Никому его не сообщайте.",
}
_CONFIRMATION_SMS = {
    "en": "{code} is your code to confirm your number in Telegram. Type it to the bot. Never share it with anyone.",
    "ru": "{code} — код для подтверждения вашего номера в Telegram. Отправьте его боту. Никому его не сообщайте.",
}
_CONFIRMATION_PROMPT = {
    "en": (
        "Please confirm that {phone} is still your number: we have sent it an SMS with a code. "
        "Type that code here within {minutes} min."
    ),
    "ru": (
        "Подтвердите, что номер {phone} по-прежнему ваш: мы отправили на него SMS с кодом. "
        "Отправьте этот код сюда в течение {minutes} мин."
    ),
}

LOCALES = frozenset(_VERIFICATION)


def normalize_locale(raw: str) -> str:
    """ "ru-RU", "RU", "ru_RU" -> "ru"; anything unknown -> "en"."""
    base = raw.strip().replace("_", "-").split("-", 1)[0].lower()
    return base if base in LOCALES else DEFAULT_LOCALE


def is_supported_locale(raw: str) -> bool:
    base = raw.strip().replace("_", "-").split("-", 1)[0].lower()
    return base in LOCALES


def _minutes(seconds: float) -> int:
    return max(1, round(seconds / 60))


def verification_text(locale: str, code: str, ttl_seconds: float) -> str:
    return _VERIFICATION[normalize_locale(locale)].format(code=code, minutes=_minutes(ttl_seconds))


def confirmation_sms_text(locale: str, code: str) -> str:
    return _CONFIRMATION_SMS[normalize_locale(locale)].format(code=code)


def confirmation_prompt_text(locale: str, phone_masked: str, ttl_seconds: float) -> str:
    return _CONFIRMATION_PROMPT[normalize_locale(locale)].format(phone=phone_masked, minutes=_minutes(ttl_seconds))

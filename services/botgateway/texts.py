"""Everything the bots say, in English and Russian, in one place."""

from __future__ import annotations

from typing import Final

LANGUAGES: Final = ("en", "ru")

_TEXTS: Final[dict[str, dict[str, str]]] = {
    "welcome_known": {
        "en": "You're connected. Codes for {phone} will come to this chat.",
        "ru": "Готово. Коды для номера {phone} будут приходить в этот чат.",
    },
    "ask_contact": {
        "en": (
            "Hi! This bot delivers one-time codes instead of SMS.\n"
            "Tap the button below to share your phone number (only your own number is accepted)."
        ),
        "ru": (
            "Здравствуйте! Этот бот присылает одноразовые коды вместо SMS.\n"
            "Нажмите кнопку ниже, чтобы поделиться своим номером (принимается только ваш собственный номер)."
        ),
    },
    "contact_button": {"en": "Share my phone number", "ru": "Поделиться моим номером"},
    "linked": {
        "en": "Thanks! Codes for {phone} will come to this chat.",
        "ru": "Спасибо! Коды для номера {phone} будут приходить в этот чат.",
    },
    "number_changed": {
        "en": "Your number is now {phone}. The previous number was unlinked.",
        "ru": "Теперь ваш номер {phone}. Прежний номер отвязан.",
    },
    "contact_not_own": {
        "en": (
            "This is not your own contact. Please share your own number with the button below; "
            "forwarded contacts and other people's numbers are not accepted."
        ),
        "ru": (
            "Это не ваш контакт. Поделитесь своим номером с помощью кнопки ниже; "
            "пересланные контакты и чужие номера не принимаются."
        ),
    },
    "contact_invalid": {
        "en": "This number cannot be used to receive codes.",
        "ru": "Этот номер нельзя использовать для получения кодов.",
    },
    "confirmed": {
        "en": "Number {phone} confirmed. Thank you!",
        "ru": "Номер {phone} подтверждён. Спасибо!",
    },
    "wrong_code": {
        "en": "Wrong code. Tries left: {left}.",
        "ru": "Неверный код. Осталось попыток: {left}.",
    },
    "code_expired": {
        "en": "This code has expired. Request a new one from the service you are signing in to.",
        "ru": "Срок действия кода истёк. Запросите новый код в сервисе, куда вы входите.",
    },
    "too_many_attempts": {
        "en": "Too many wrong codes. Request a new code from the service you are signing in to.",
        "ru": "Слишком много неверных кодов. Запросите новый код в сервисе, куда вы входите.",
    },
    "no_pending": {
        "en": "There is no code to confirm right now.",
        "ru": "Сейчас нет кода, который нужно подтвердить.",
    },
    "stopped": {
        "en": "Done: this bot will not send you messages any more. Send /start to resume.",
        "ru": "Готово: этот бот больше не будет присылать вам сообщения. Отправьте /start, чтобы возобновить.",
    },
    "forget_ask": {
        "en": (
            "This erases your phone number and your links with all otpgate bots. "
            "Services will no longer be able to send you codes here.\n"
            "Send /confirm within 5 minutes to erase, or anything else to cancel."
        ),
        "ru": (
            "Это удалит ваш номер телефона и связи со всеми ботами otpgate. "
            "Сервисы больше не смогут присылать вам коды сюда.\n"
            "Отправьте /confirm в течение 5 минут, чтобы удалить, или что-нибудь другое для отмены."
        ),
    },
    "forgotten": {
        "en": "Your data was erased. Send /start if you want to connect again.",
        "ru": "Ваши данные удалены. Отправьте /start, если захотите подключиться снова.",
    },
    "forget_canceled": {
        "en": "Canceled: nothing was erased.",
        "ru": "Отменено: ничего не удалено.",
    },
    "help": {
        "en": (
            "This bot delivers one-time codes and short notices from services you use, instead of SMS.\n"
            "/start: connect (share your number once)\n"
            "/stop: stop receiving messages from this bot\n"
            "/forget: erase your number and links\n"
            "If you received a confirmation code by SMS, just type it here."
        ),
        "ru": (
            "Этот бот присылает одноразовые коды и короткие уведомления от сервисов вместо SMS.\n"
            "/start: подключиться (поделиться номером один раз)\n"
            "/stop: не получать сообщения от этого бота\n"
            "/forget: удалить ваш номер и связи\n"
            "Если вы получили код подтверждения по SMS, просто введите его здесь."
        ),
    },
    "not_understood": {
        "en": "I only deliver codes. Send /help to see what I can do.",
        "ru": "Я только доставляю коды. Отправьте /help, чтобы узнать, что я умею.",
    },
    "try_later": {
        "en": "Something went wrong on our side. Please try again in a minute.",
        "ru": "Что-то пошло не так с нашей стороны. Попробуйте ещё раз через минуту.",
    },
}


def language_of(language_code: str) -> str:
    """The bot language for a Telegram user's language_code ("ru", "ru-RU", "en-US", "")."""
    base = language_code.strip().lower().replace("_", "-").split("-", 1)[0]
    return base if base in LANGUAGES else "en"


def text(key: str, language: str, **values: object) -> str:
    variants = _TEXTS[key]
    template = variants.get(language) or variants["en"]
    return template.format(**values) if values else template


def all_keys() -> list[str]:
    return list(_TEXTS)

"""Texts in one place, language choice, command and typed-code parsing, token config."""

from __future__ import annotations

import re
import string

import pytest

from services.botgateway import texts
from services.botgateway.conversation import parse_command, typed_code
from services.botgateway.registry import decode_page_token, encode_page_token, parse_bot_tokens
from services.core.errors import ServiceError


@pytest.mark.parametrize(
    ("code", "language"), [("ru", "ru"), ("ru-RU", "ru"), ("en-US", "en"), ("", "en"), ("de", "en")]
)
def test_language_of(code: str, language: str) -> None:
    assert texts.language_of(code) == language


def test_every_text_exists_in_every_language_with_the_same_placeholders() -> None:
    for key in texts.all_keys():
        fields = {
            lang: {f for _, f, _, _ in string.Formatter().parse(texts._TEXTS[key][lang]) if f}
            for lang in texts.LANGUAGES
        }
        assert fields["en"] == fields["ru"], key
        assert re.search("[а-яА-Я]", texts._TEXTS[key]["ru"]), key


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("123456", "123456"),
        ("123 456", "123456"),
        ("12-34-56", "123456"),
        ("123", None),
        ("12345678901", None),
        ("12a4", None),
    ],
)
def test_typed_code(text: str, code: str | None) -> None:
    assert typed_code(text) == code


def test_parse_command() -> None:
    assert parse_command("/start") == ("start", "")
    assert parse_command("/start@smscodes_bot  ref_42") == ("start", "ref_42")
    assert parse_command("/HELP") == ("help", "")
    assert parse_command("hello") is None


def test_bot_tokens_config() -> None:
    assert parse_bot_tokens(["SMSCODES_bot:123456:AAE-x_y"]) == {"smscodes_bot": "123456:AAE-x_y"}
    with pytest.raises(ValueError):
        parse_bot_tokens(["smscodes_bot"])


def test_page_tokens_round_trip_and_refuse_garbage() -> None:
    assert decode_page_token(encode_page_token("smscodes_bot")) == "smscodes_bot"
    with pytest.raises(ServiceError):
        decode_page_token("!!!")


def test_production_config_fails_fast_without_telegram_credentials() -> None:
    from services.botgateway.app import load_config
    from services.core.config import Env

    env = Env({"OTPGATE_ENV": "production", "OTPGATE_SHARED_BOTS": "a_bot,b_bot", "OTPGATE_BOT_TOKENS": "a_bot:1:x"})
    load_config(env)
    assert "OTPGATE_TELEGRAM_API_ID is required outside sandbox mode" in env.errors
    assert "OTPGATE_BOT_TOKENS has no token for shared bot b_bot" in env.errors
    assert not any("a_bot" in e for e in env.errors)
    sandbox = Env({"OTPGATE_ENV": "dev"})
    load_config(sandbox)
    assert sandbox.errors == []

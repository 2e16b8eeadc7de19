"""Page tokens: URL-safe, unpadded, round-trip their payload, and refuse what cannot be decoded."""

from __future__ import annotations

import pytest

from services.core import page_tokens


def test_a_token_round_trips_its_payload_and_is_url_safe() -> None:
    for payload in ("", "a", "bot_1", '["2026-12-01T00:00:00+00:00", "01M8"]', "o:40:client\u00e9"):
        token = page_tokens.encode(payload)
        assert "=" not in token and "+" not in token and "/" not in token
        assert page_tokens.decode(token) == payload


@pytest.mark.parametrize("token", ["a", "\u00e9t\u00e9", "_w"])
def test_what_cannot_be_decoded_is_a_value_error(token: str) -> None:
    with pytest.raises(ValueError):
        page_tokens.decode(token)

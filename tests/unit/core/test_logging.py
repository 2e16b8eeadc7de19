from __future__ import annotations

import io
import json

from services.core.logging import configure_logging, get_logger, request_id_var


def _log_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_with_redaction_and_request_id(own_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("unit", "debug", stream=stream)
    token = request_id_var.set("req-42")
    try:
        get_logger("t").info(
            "contact shared by +79991234567",
            phone="+79991234567",
            code="123456",
            bot_token="123:ABC",
            api_key="otpg_x_y",
            text="your code is 123456",
            nested={"msisdn": "79991234567", "secret": "s"},
            note="raw 79991234567 in text",
        )
    finally:
        request_id_var.reset(token)
    import logging

    logging.getLogger("pymongo.test").warning("library says +442079460958")
    lines = _log_lines(stream)
    ours, library = lines[0], lines[1]
    raw = stream.getvalue()
    for secret in ("79991234567", "123456", "123:ABC", "otpg_x_y", "2079460958"):
        assert secret not in raw
    assert ours["msg"] == "contact shared by +7******4567"
    assert ours["phone"] == "+7******4567"
    assert ours["code"] == ours["bot_token"] == ours["api_key"] == ours["text"] == "[redacted]"
    assert ours["nested"] == {"msisdn": "+7******4567", "secret": "[redacted]"}
    assert ours["request_id"] == "req-42"
    assert ours["service"] == "unit"
    assert library["msg"] == "library says +44******0958"
    assert library["level"] == "warning"

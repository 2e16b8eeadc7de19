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


def test_ids_request_ids_and_hashes_are_never_masked(own_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("unit", "debug", stream=stream)
    message_id = "01M8RH5D5GBE6512345670840C5Z"  # a digit run inside an id is not a number
    request_id = "79991234567"  # a client's request id made of digits, as some are
    token = request_id_var.set(request_id)
    try:
        get_logger("t").info(
            f"message {message_id} accepted",
            message_id=message_id,
            subscriber_ids=["49151123456789", "01M8RH5D5GBE6512345670840C5Z"],
            code_hash="4915112345678912",
            note=f"order 79991234567 paid; took 1733051234567.25 ms; id {message_id}.",
            count=79991234567,
        )
    finally:
        request_id_var.reset(token)
    event = _log_lines(stream)[0]
    assert event["msg"] == f"message {message_id} accepted"
    assert event["message_id"] == message_id
    assert event["request_id"] == request_id
    assert event["subscriber_ids"] == ["49151123456789", message_id]
    assert event["code_hash"] == "4915112345678912"
    # In prose, a number standing alone that could be a phone number is masked, even at the end of
    # a sentence; a decimal number, an id and a non-text value are not.
    assert event["note"] == f"order +7******4567 paid; took 1733051234567.25 ms; id {message_id}."
    assert event["count"] == 79991234567


def test_numbers_that_cannot_be_phone_numbers_stay(own_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("unit", "debug", stream=stream)
    get_logger("t").info("epoch ms 1733051234567 and +123 and +79991234567", detail="+10000000000000 +79991234567.")
    event = _log_lines(stream)[0]
    assert event["msg"] == "epoch ms 1733051234567 and +123 and +7******4567"
    assert event["detail"] == "+10000000000000 +7******4567."

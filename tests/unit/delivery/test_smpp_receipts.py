"""SMPP receipts (TLVs or text) and submit_sm_resp statuses mapped to outcomes."""

from __future__ import annotations

from aiosmpplib import DeliverSm, OptionalParam, PhoneNumber

from services.core.config import Env
from services.delivery.config import load_config
from services.delivery.smpp import MessageIds, parse_receipt, submit_refusal
from services.delivery.sms import DELIVERED, FAILED, PENDING

SAME = MessageIds("same")


def receipt(text: str = "", esm_class: int = 0x04, **tlvs: int | str) -> DeliverSm:
    tags = {"receipted_message_id": 0x001E, "message_state": 0x0427}
    params = [OptionalParam(tags[name], value) for name, value in tlvs.items()]
    return DeliverSm(
        short_message=text or " ",
        source=PhoneNumber("79991234567"),
        destination=PhoneNumber("otpgate"),
        esm_class=esm_class,
        optional_params=params,
    )


def test_tlvs_win_over_the_text() -> None:
    parsed = parse_receipt(receipt("id:999 stat:UNDELIV err:001", receipted_message_id="5a001", message_state=2), SAME)
    assert parsed is not None and (parsed.key, parsed.state, parsed.code) == ("5a001", DELIVERED, "DELIVRD")


def test_the_text_when_there_are_no_tlvs() -> None:
    text = "id:5A002 sub:001 dlvrd:000 submit date:2612011200 done date:2612011201 stat:UNDELIV err:012 text:"
    parsed = parse_receipt(receipt(text), SAME)
    assert parsed is not None and (parsed.key, parsed.state, parsed.code) == ("5A002", FAILED, "UNDELIV:err=012")
    enroute = parse_receipt(receipt("id:7 stat:ENROUTE err:000"), SAME)
    assert enroute is not None and enroute.state == PENDING and enroute.code == "ENROUTE"


def test_a_mobile_originated_message_or_a_receipt_without_id_is_not_a_receipt() -> None:
    assert parse_receipt(receipt("hello", esm_class=0), SAME) is None
    assert parse_receipt(receipt("stat:DELIVRD"), SAME) is None


def test_receipt_ids_in_another_base_are_matched_as_numbers() -> None:
    ids = MessageIds("dec_to_hex")  # submit_sm_resp answers hex, receipts say decimal
    parsed = parse_receipt(receipt("id:368641 stat:DELIVRD err:000"), ids)
    assert parsed is not None and parsed.key == ids.of_submit("5a001") == "368641"
    back = MessageIds("hex_to_dec")
    assert back.of_receipt_text("5a001") == back.of_submit("368641")


def test_statuses_map_to_retry_later_or_permanent_failure() -> None:
    throttled = submit_refusal(0x58, frozenset(), 5.0)
    assert (throttled.code, throttled.permanent, throttled.retry_after) == ("ESME_RTHROTTLED", False, 5.0)
    assert not submit_refusal(0x14, frozenset(), 5.0).permanent  # ESME_RMSGQFUL
    destination = submit_refusal(0x0B, frozenset(), 5.0)
    assert destination.code == "ESME_RINVDSTADR" and destination.permanent and "invalid destination" in str(destination)
    assert not submit_refusal(0x08, frozenset(), 5.0).permanent  # ESME_RSYSERR: the SMSC's trouble
    vendor = submit_refusal(0x401, frozenset(), 5.0)
    assert vendor.code == "ESME_0x00000401" and vendor.permanent
    assert not submit_refusal(0x401, frozenset({0x401}), 5.0).permanent


def test_smpp_configuration_names_every_problem_and_never_echoes_the_password() -> None:
    env = Env(
        {
            "OTPGATE_SMS_PROVIDER": "smpp",
            "OTPGATE_SMPP_SYSTEM_ID": "a-system-id-longer-than-15",
            "OTPGATE_SMPP_PASSWORD": "far-too-long-password",
            "OTPGATE_SMPP_SOURCE_TON": "9",
            "OTPGATE_SMPP_RETRY_STATUSES": "0x45,nope",
            "OTPGATE_SMS_SENDER": "A sender name too long",
        },
        service="delivery",
    )
    load_config(env)
    problems = "\n".join(env.errors)
    for expected in (
        "needs OTPGATE_SMPP_HOST",
        "OTPGATE_SMPP_SYSTEM_ID must be ASCII, at most 15",
        "OTPGATE_SMPP_PASSWORD must be ASCII, at most 8",
        "OTPGATE_SMPP_SOURCE_TON '9' is invalid",
        "OTPGATE_SMPP_RETRY_STATUSES 'nope' is invalid",
        "alphanumeric SMPP sender has at most 11 characters",
    ):
        assert expected in problems
    assert "far-too-long-password" not in problems


def test_smpp_configuration_that_loads() -> None:
    env = Env(
        {
            "OTPGATE_SMS_PROVIDER": "smpp",
            "OTPGATE_SMPP_HOST": "smsc.example.net",
            "OTPGATE_SMPP_SYSTEM_ID": "acme",
            "OTPGATE_SMPP_PASSWORD": "pa55",
            "OTPGATE_SMPP_RETRY_STATUSES": "0x45,400",
            "OTPGATE_SMS_SENDER": "+4915112345678",
        },
        service="delivery",
    )
    config = load_config(env)
    assert not env.errors
    assert config.smpp.link.host == "smsc.example.net" and config.smpp.link.window == 10
    assert config.smpp.retry_statuses == frozenset({0x45, 0x400}) and config.smpp.source_ton is None
    assert "pa55" not in repr(config.smpp)

"""Verify API rules that need no other service: validation, scoping, limits, presentation."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from otpgate.common.v1 import common_pb2

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from services.verification import templates
from services.verification.config import VerifyPolicy
from services.verification.store import Store
from services.verification.verify import Verifier
from tests.unit.verification.conftest import start_request


def violations(err: ServiceError) -> dict[str, str]:
    from google.rpc import error_details_pb2

    for detail in err.details:
        if isinstance(detail, error_details_pb2.BadRequest):
            return {v.field: v.description for v in detail.field_violations}
    return {}


def test_start_defaults(verifier: Verifier) -> None:
    start = verifier.validate_start(start_request())
    assert start.channel == common_pb2.CHANNEL_AUTO
    assert start.code_length == 6 and start.ttl == 300 and start.locale == "en"


def test_start_validation_names_every_bad_field_and_never_echoes_input(verifier: Verifier) -> None:
    with pytest.raises(ServiceError) as info:
        verifier.validate_start(
            start_request(
                client_id="",
                phone="+7999",
                code_length=11,
                ttl={"seconds": 29},
                locale="xx",
                custom_code="12ab",
                request_id="r" * 200,
            )
        )
    err = info.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err)) == {"client_id", "phone", "code_length", "ttl", "locale", "custom_code", "request_id"}
    assert "12ab" not in err.message and "+7999" not in err.message
    with pytest.raises(ServiceError) as info:
        verifier.validate_start(start_request(ttl={"seconds": 3601}))
    assert set(violations(info.value)) == {"ttl"}
    with pytest.raises(ServiceError) as info:
        verifier.validate_start(start_request(custom_code="1234", code_length=6))
    assert set(violations(info.value)) == {"code_length"}


def test_start_accepts_the_whole_documented_range(verifier: Verifier) -> None:
    for length in (4, 10):
        assert verifier.validate_start(start_request(code_length=length)).code_length == length
    for ttl in (30, 3600):
        assert verifier.validate_start(start_request(ttl={"seconds": ttl})).ttl == ttl
    assert verifier.validate_start(start_request(locale="ru-RU")).locale == "ru"
    custom = verifier.validate_start(start_request(custom_code="12 34 56 78"))
    assert custom.custom_code == "12345678" and custom.code_length == 8


def test_request_fingerprint_separates_different_requests(verifier: Verifier) -> None:
    base = verifier.fingerprint(verifier.validate_start(start_request()))
    assert base == verifier.fingerprint(verifier.validate_start(start_request()))
    for change in (
        {"phone": "+79991234568"},
        {"channel": 3},
        {"code_length": 8},
        {"ttl": {"seconds": 60}},
        {"locale": "ru"},
        {"bot": "smscodes_bot"},
        {"custom_code": "123456"},
    ):
        assert verifier.fingerprint(verifier.validate_start(start_request(**change))) != base


async def test_other_clients_ids_look_exactly_like_unknown_ids(verifier: Verifier) -> None:
    issued = await verifier.issue(verifier.validate_start(start_request()))
    assert issued is not None
    record, _ = issued
    errors = []
    for client_id, verification_id in (
        ("client-b", record["_id"]),
        ("client-a", "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        ("client-a", "not-an-id"),
    ):
        for call in (verifier.get, verifier.cancel):
            with pytest.raises(ServiceError) as info:
                await call(client_id, verification_id)
            errors.append((info.value.code, info.value.reason, info.value.message))
        with pytest.raises(ServiceError) as info:
            await verifier.check(client_id, verification_id, "123456")
        errors.append((info.value.code, info.value.reason, info.value.message))
    assert set(errors) == {(grpc.StatusCode.NOT_FOUND, "VERIFICATION_NOT_FOUND", "verification not found")}
    assert (await verifier.get("client-a", record["_id"])).pending


async def test_check_refuses_malformed_codes_without_spending_an_attempt(verifier: Verifier) -> None:
    issued = await verifier.issue(verifier.validate_start(start_request()))
    assert issued is not None
    record, _ = issued
    for bad in ("", "12", "abcdef", "12345678901"):
        with pytest.raises(ServiceError) as info:
            await verifier.check("client-a", record["_id"], bad)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (await verifier.get("client-a", record["_id"])).attempts_left == 5


async def test_a_right_code_never_counts_against_the_cap_and_a_wrong_one_keeps_its_unit(
    verifier: Verifier, store: Store
) -> None:
    issued = await verifier.issue(verifier.validate_start(start_request()))
    assert issued is not None
    record, code = issued
    wrong = "0000" if code != "0000" else "1111"
    _, approved = await verifier.check("client-a", record["_id"], wrong)
    assert not approved
    units = [doc["n"] async for doc in store.failed_checks.find({})]
    assert units == [1]
    _, approved = await verifier.check("client-a", record["_id"], code)
    assert approved
    assert [doc["n"] async for doc in store.failed_checks.find({})] == units  # the right one left the count as it was


async def test_failed_checks_per_phone_are_capped_across_verifications(
    verifier: Verifier, store: Store, clock: ManualClock
) -> None:
    # 100 failed checks an hour for one number, whichever verifications (and clients) they hit.
    done = 0
    client = 0
    while done < 100:
        client += 1
        issued = await verifier.issue(verifier.validate_start(start_request(client_id=f"c{client}")))
        assert issued is not None
        record, code = issued
        for _ in range(5):
            view, _ = await verifier.check(f"c{client}", record["_id"], "0000" if code != "0000" else "1111")
            done += 1
        assert view.status == "MAX_ATTEMPTS_REACHED"
        clock.advance(30)
    issued = await verifier.issue(verifier.validate_start(start_request(client_id="fresh", ttl={"seconds": 3600})))
    assert issued is not None
    record, code = issued
    with pytest.raises(ServiceError) as info:
        await verifier.check("fresh", record["_id"], code)  # even the right code waits
    err = info.value
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_FAILED_CHECKS")
    assert code not in err.message
    # Another number is not affected.
    other = await verifier.issue(verifier.validate_start(start_request(client_id="fresh", phone="+79991234500")))
    assert other is not None
    _, approved = await verifier.check("fresh", other[0]["_id"], other[1])
    assert approved
    # The window slides (in ten-minute steps): the refusal says when the oldest failures leave it,
    # at most 70 minutes after the first, and not before.
    retry = err.details[1].retry_delay.seconds
    assert 60 * 60 - 600 - 60 <= retry <= 70 * 60 - 600
    clock.advance(retry - 2)
    with pytest.raises(ServiceError):
        await verifier.check("fresh", record["_id"], code)
    clock.advance(2)
    later = await verifier.issue(verifier.validate_start(start_request(client_id="later")))
    assert later is not None
    _, approved = await verifier.check("later", later[0]["_id"], later[1])
    assert approved


async def test_presentation_of_a_pending_verification(verifier: Verifier, clock: ManualClock) -> None:
    issued = await verifier.issue(verifier.validate_start(start_request(code_length=8, locale="ru", channel=3)))
    assert issued is not None
    record, code = issued
    view = await verifier.get("client-a", record["_id"])
    out = verifier.to_proto(view)
    assert out.status == common_pb2.VERIFICATION_STATUS_PENDING
    assert out.phone_masked == "+7******4567" and out.code_length == 8 and out.locale == "ru"
    assert out.requested_channel == common_pb2.CHANNEL_SMS
    assert out.send_count == 1 and out.check_attempts_left == 5
    assert out.expire_time.ToDatetime().timestamp() - out.create_time.ToDatetime().timestamp() == 300
    assert out.resend_time.ToDatetime().timestamp() - out.create_time.ToDatetime().timestamp() == 30
    assert code not in str(out)
    clock.advance(300)
    expired = verifier.to_proto(await verifier.get("client-a", record["_id"]))
    assert expired.status == common_pb2.VERIFICATION_STATUS_EXPIRED and expired.check_attempts_left == 0
    assert not expired.HasField("resend_time")


def test_templates_in_english_and_russian_carry_the_code() -> None:
    en = templates.verification_text("en", "123456", 300)
    ru = templates.verification_text("ru", "123456", 300)
    assert "123456" in en and "5 min" in en
    assert "123456" in ru and "5 мин" in ru and en != ru
    assert templates.verification_text("de", "123456", 300) == en  # unknown -> English
    assert "4321" in templates.confirmation_sms_text("ru", "4321")
    prompt = templates.confirmation_prompt_text("en", "+7******4567", 600)
    assert "+7******4567" in prompt and "10 min" in prompt


async def test_request_id_claims(store: Store, clock: ManualClock) -> None:
    sent: set[str] = set()

    async def started(record_id: str) -> bool:
        return record_id in sent

    async def claim(planned: str) -> Document | None:
        return await store.claim_request("c", "r", "fp", clock.now(), planned, started)

    assert await claim("V1") is None
    busy = await claim("V2")
    assert busy is not None and busy["verification_id"] is None and busy["planned_id"] == "V1"  # in progress
    await store.release_request("c", "r")  # the request failed: the id is free again
    assert await claim("V3") is None
    # A claim whose owner died is taken over after a minute, never before.
    clock.advance(59)
    assert await claim("V4") is not None
    clock.advance(2)
    assert await claim("V5") is None
    # The verification it planned went out: complete without a write, never taken over.
    sent.add("V5")
    clock.advance(3600)
    done = await claim("V6")
    assert done is not None and done["planned_id"] == "V5" and done["verification_id"] is None
    # One that named another verification (a re-send) is complete by that name.
    await store.release_request("c", "r")
    sent.clear()
    assert await claim("V7") is None
    await store.complete_request("c", "r", "V0")
    clock.advance(3600)
    named = await claim("V8")
    assert named is not None and named["verification_id"] == "V0"


async def test_a_repeat_while_the_planned_verification_is_not_out_yet_is_in_progress(
    verifier: Verifier, clock: ManualClock
) -> None:
    request = start_request(request_id="r-9")
    start = verifier.validate_start(request)
    earlier = await verifier.store.claim_request(
        "client-a", "r-9", verifier.fingerprint(start), clock.now(), "P1", verifier._first_send_recorded
    )
    assert earlier is None
    issued = await verifier.issue(start, "P1")  # created, its first send not answered yet
    assert issued is not None
    with pytest.raises(ServiceError) as info:
        await verifier.start(request)
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.ABORTED, "REQUEST_IN_PROGRESS")
    await verifier.engine.record_send(verifier.engine.view(issued[0]), {"message_id": "m1", "channel": 2})
    replay = await verifier.start(request)
    assert replay.verification.id == "P1" and replay.verification.message_id == "m1"


async def test_concurrent_wrong_checks_across_clients_and_replicas_stop_exactly_at_the_cap(
    store: Store, keyring: Keyring, clock: ManualClock, verifier: Verifier
) -> None:
    # Two replicas (each with its own cache of closed windows) on one database; four clients each
    # hold a pending verification for the same number, 20 checks allowed per verification.
    policy = VerifyPolicy(max_checks=20, failed_checks_per_hour=40)
    replicas = [Verifier(store, keyring, clock, policy, verifier.delivery) for _ in range(2)]
    pending = []
    for client in ("c1", "c2", "c3", "c4"):
        issued = await replicas[0].issue(replicas[0].validate_start(start_request(client_id=client)))
        assert issued is not None
        pending.append((client, issued[0]["_id"], "0000" if issued[1] != "0000" else "1111"))

    async def check(n: int) -> str:
        client, verification_id, wrong_code = pending[n % 4]
        try:
            _, approved = await replicas[n % 2].check(client, verification_id, wrong_code)
        except ServiceError as refusal:
            return refusal.reason
        assert not approved
        return "WRONG"

    outcomes = await asyncio.gather(*(check(n) for n in range(80)))
    assert outcomes.count("WRONG") == 40 and outcomes.count("TOO_MANY_FAILED_CHECKS") == 40
    counted = [doc async for doc in store.failed_checks.find({})]
    assert sum(int(doc["n"]) for doc in counted) == 40
    # Each verification compared no more codes than were counted against the number.
    used = [(await replicas[0].get(client, vid)).attempts for client, vid, _ in pending]
    assert sum(used) == 40 and max(used) <= 20

"""The Verify API end to end: codes really leave through delivery (sandbox SMS inbox, sandbox
Telegram chat) and are checked back."""

from __future__ import annotations

import asyncio
import re

import grpc
from google.protobuf import duration_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.verification.v1 import verification_pb2 as V
from prometheus_client import REGISTRY

from services.core.errors import parse_rpc_error
from tests.integration.verification.conftest import Env, new_phone, refused

SMS = common_pb2.CHANNEL_SMS
PENDING = common_pb2.VERIFICATION_STATUS_PENDING
APPROVED = common_pb2.VERIFICATION_STATUS_APPROVED


def conversions_recorded() -> float:
    labels = {
        "grpc_type": "unary",
        "grpc_service": "otpgate.delivery.v1.DeliveryService",
        "grpc_method": "RecordConversion",
    }
    return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0


def start(phone: str, client_id: str = "shop", **fields: object) -> V.StartVerificationRequest:
    return V.StartVerificationRequest(client_id=client_id, phone=phone, channel=fields.pop("channel", SMS), **fields)  # type: ignore[arg-type]


async def test_sms_code_wrong_then_right(env: Env, captured_logs: object) -> None:
    phone = new_phone()
    started = (await env.verification.StartVerification(start(phone, locale="ru"))).verification
    assert started.status == PENDING and started.channel == SMS and started.message_id
    assert started.send_count == 1 and started.check_attempts_left == 5 and started.phone_masked.endswith(phone[-4:])
    (text,) = await env.inbox(phone)
    assert "ваш код" in text
    (code,) = await env.codes_by_sms(phone)
    assert len(code) == 6
    wrong = str((int(code) + 1) % 10**6).zfill(6)
    first = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=started.id, code=wrong)
    )
    assert not first.approved and first.verification.status == PENDING and first.verification.check_attempts_left == 4
    approved_before = REGISTRY.get_sample_value("otpgate_verifications_total", {"outcome": "approved"}) or 0
    ok = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=started.id, code=code)
    )
    assert ok.approved and ok.verification.status == APPROVED
    assert REGISTRY.get_sample_value("otpgate_verifications_total", {"outcome": "approved"}) == approved_before + 1
    # The approval reached delivery's fraud guard as a conversion of the SMS that carried the code.
    delivery_db = env.database.client[env.stack.env["OTPGATE_DELIVERY_DATABASE"]]
    counted = await delivery_db["fraud_sms"].find_one({"_id": started.message_id})
    assert counted is not None and counted["converted"] is True
    assert conversions_recorded() > 0
    again = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=started.id, code=code)
    )
    assert not again.approved and again.verification.status == APPROVED  # single use
    got = await env.verification.GetVerification(V.GetVerificationRequest(client_id="shop", id=started.id))
    assert got.verification.status == APPROVED
    logs = captured_logs.text()  # type: ignore[attr-defined]
    assert "verification_started" in logs and "verification_checked" in logs  # the capture works
    assert code not in logs and phone not in logs and phone[1:] not in logs


async def test_resend_returns_the_same_code_after_the_cooldown_and_at_most_five_times(env: Env) -> None:
    phone = new_phone()
    first = (
        await env.verification.StartVerification(start(phone, ttl=duration_pb2.Duration(seconds=900)))
    ).verification
    env.clock.advance(10)
    too_soon = await refused(env.verification.StartVerification(start(phone)))
    assert (too_soon.code, too_soon.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESEND_TOO_SOON")
    assert too_soon.retry_after == 20
    assert len(await env.inbox(phone)) == 1
    for sends in range(2, 6):
        env.clock.advance(30)
        again = (await env.verification.StartVerification(start(phone))).verification
        assert again.id == first.id and again.send_count == sends
    codes = await env.codes_by_sms(phone)
    assert len(codes) == 5 and len(set(codes)) == 1  # the same code every time
    env.clock.advance(30)
    spent = await refused(env.verification.StartVerification(start(phone)))
    assert (spent.code, spent.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MAX_SENDS_REACHED")
    assert len(await env.inbox(phone)) == 5
    ok = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=first.id, code=codes[0])
    )
    assert ok.approved
    # Once approved, a new start is a new verification; here delivery's per-phone limit (5 SMS in
    # 10 minutes) refuses it, and that refusal reaches the caller unchanged, leaving nothing pending.
    env.clock.advance(1)
    limited = await refused(env.verification.StartVerification(start(phone)))
    assert (limited.code, limited.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert limited.retry_after and limited.retry_after > 0
    assert await env.database["verifications"].count_documents({"status": "PENDING"}) == 0
    env.clock.advance(600)
    fresh = (await env.verification.StartVerification(start(phone))).verification
    assert fresh.id != first.id and fresh.send_count == 1


async def test_expired_verification_is_refused_and_a_new_start_issues_a_new_code(env: Env) -> None:
    phone = new_phone()
    first = (await env.verification.StartVerification(start(phone, ttl=duration_pb2.Duration(seconds=60)))).verification
    (code,) = await env.codes_by_sms(phone)
    env.clock.advance(60)
    late = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=first.id, code=code)
    )
    assert not late.approved and late.verification.status == common_pb2.VERIFICATION_STATUS_EXPIRED
    second = (await env.verification.StartVerification(start(phone))).verification
    assert second.id != first.id


async def test_a_start_finds_the_pending_verification_through_the_unique_pending_index(env: Env) -> None:
    """A start inserts a new verification first; the unique pending index refuses it while one is
    pending for the number, and the pending one, found by that index, is re-sent instead."""
    phone = new_phone()
    first = (await env.verification.StartVerification(start(phone))).verification
    env.clock.advance(30)
    again = (await env.verification.StartVerification(start(phone))).verification
    assert again.id == first.id and again.send_count == 2
    record = await env.database["verifications"].find_one({"_id": first.id})
    assert record is not None
    assert await env.database["verifications"].count_documents({"phone_bi": record["phone_bi"]}) == 1
    await env.verification.CancelVerification(V.CancelVerificationRequest(client_id="shop", id=first.id))
    fresh = (await env.verification.StartVerification(start(phone))).verification
    assert fresh.id != first.id and fresh.status == PENDING and fresh.send_count == 1
    pending = {"phone_bi": record["phone_bi"], "status": "PENDING"}
    assert await env.database["verifications"].count_documents(pending) == 1
    # The Verify API keeps no pointers (re-confirmations do).
    assert await env.database["pending_pointers"].count_documents({"record_id": {"$in": [first.id, fresh.id]}}) == 0


async def test_request_id_idempotency(env: Env) -> None:
    phone = new_phone()
    first = (await env.verification.StartVerification(start(phone, request_id="r-1"))).verification
    env.clock.advance(60)
    replay = (await env.verification.StartVerification(start(phone, request_id="r-1"))).verification
    assert replay.id == first.id and replay.send_count == 1
    assert len(await env.inbox(phone)) == 1  # the repeat sent nothing
    # The claim named the verification it would create; nothing was written to it afterwards.
    claims = env.database["verification_requests"]
    assert await claims.find_one({"planned_id": first.id, "verification_id": None}) is not None
    # Another request for the number re-sends the pending one: its claim names that one.
    resent = (await env.verification.StartVerification(start(phone, request_id="r-2"))).verification
    assert resent.id == first.id and resent.send_count == 2
    env.clock.advance(120)
    again = (await env.verification.StartVerification(start(phone, request_id="r-2"))).verification
    assert again.id == first.id and again.send_count == 2 and len(await env.inbox(phone)) == 2
    assert await claims.count_documents({"verification_id": first.id}) == 1
    conflict = await refused(env.verification.StartVerification(start(phone, request_id="r-1", code_length=8)))
    assert (conflict.code, conflict.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_CONFLICT")
    # Request ids are per client.
    other = (await env.verification.StartVerification(start(phone, client_id="other", request_id="r-1"))).verification
    assert other.id != first.id


async def test_delivery_refusals_pass_through_and_leave_nothing_behind(env: Env) -> None:
    await env.delivery.UpdateClientPolicy(
        delivery_pb2.UpdateClientPolicyRequest(
            policy=common_pb2.ClientPolicy(client_id="de-only", allowed_countries=["DE"], sms_countries_any=True)
        )
    )
    phone = new_phone()
    failure = await refused(env.verification.StartVerification(start(phone, client_id="de-only")))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "COUNTRY_NOT_ALLOWED")
    assert await env.database["verifications"].find_one({}) is None
    assert await env.inbox(phone) == []


async def test_custom_code_needs_the_policy(env: Env) -> None:
    phone = new_phone()
    refusal = await refused(env.verification.StartVerification(start(phone, client_id="bank", custom_code="424242")))
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CUSTOM_CODE_NOT_ALLOWED")
    await env.delivery.UpdateClientPolicy(
        delivery_pb2.UpdateClientPolicyRequest(
            policy=common_pb2.ClientPolicy(client_id="bank", allow_custom_code=True, sms_countries_any=True)
        )
    )
    started = (
        await env.verification.StartVerification(start(phone, client_id="bank", custom_code="424242"))
    ).verification
    assert started.code_length == 6
    assert await env.codes_by_sms(phone) == ["424242"]
    ok = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="bank", id=started.id, code="424242")
    )
    assert ok.approved
    # Withdrawn, the permission still holds for the seconds a replica trusts it, then not.
    await env.delivery.UpdateClientPolicy(
        delivery_pb2.UpdateClientPolicyRequest(
            policy=common_pb2.ClientPolicy(client_id="bank", allow_custom_code=False, sms_countries_any=True)
        )
    )
    env.clock.advance(1)
    trusted = await env.verification.StartVerification(start(new_phone(), client_id="bank", custom_code="5151"))
    assert trusted.verification.code_length == 4
    env.clock.advance(1)
    withdrawn = await refused(
        env.verification.StartVerification(start(new_phone(), client_id="bank", custom_code="5151"))
    )
    assert (withdrawn.code, withdrawn.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CUSTOM_CODE_NOT_ALLOWED")


async def test_telegram_channel_delivers_the_code_in_the_bot_chat(env: Env) -> None:
    user = await env.user()
    await env.connect(user)
    started = (
        await env.verification.StartVerification(start(user.phone, channel=common_pb2.CHANNEL_TELEGRAM, code_length=8))
    ).verification
    assert started.channel == common_pb2.CHANNEL_TELEGRAM
    # The first send is the record's own: what delivery answered is written on it once it went out.
    stored = await env.database["verifications"].find_one({"_id": started.id})
    assert (stored["sends"], stored["last_send"]["n"], stored["last_send"]["message_id"]) == (1, 1, started.message_id)
    chat = await env.chat(user)
    codes = [m.group(0) for text in chat if "verification code" in text and (m := re.search(r"\d{8}", text))]
    assert len(codes) == 1
    assert await env.inbox(user.phone) == []  # no SMS for a person reachable in Telegram
    conversions = conversions_recorded()
    ok = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=started.id, code=codes[0])
    )
    assert ok.approved and ok.verification.message_id == started.message_id
    # A code a bot alone carried is no sample for the fraud guard: delivery is not asked.
    assert conversions_recorded() == conversions


async def test_cancel_and_scoping(env: Env) -> None:
    phone = new_phone()
    started = (await env.verification.StartVerification(start(phone))).verification
    (code,) = await env.codes_by_sms(phone)
    for call in (
        env.verification.GetVerification(V.GetVerificationRequest(client_id="thief", id=started.id)),
        env.verification.CancelVerification(V.CancelVerificationRequest(client_id="thief", id=started.id)),
        env.verification.CheckVerification(V.CheckVerificationRequest(client_id="thief", id=started.id, code=code)),
    ):
        failure = await refused(call)
        assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "VERIFICATION_NOT_FOUND")
    canceled = await env.verification.CancelVerification(V.CancelVerificationRequest(client_id="shop", id=started.id))
    assert canceled.verification.status == common_pb2.VERIFICATION_STATUS_CANCELED
    late = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=started.id, code=code)
    )
    assert not late.approved and late.verification.status == common_pb2.VERIFICATION_STATUS_CANCELED
    stored = await env.database["verifications"].find_one({"_id": started.id})
    assert stored is not None and "code" not in stored and "phone" not in stored


async def test_brute_force_over_grpc_stops_at_five(env: Env) -> None:
    phone = new_phone()
    started = (await env.verification.StartVerification(start(phone, code_length=4))).verification
    (code,) = await env.codes_by_sms(phone)
    guesses = [g for g in (f"{n:04d}" for n in range(10000)) if g != code][:6]
    lefts = []
    for guess in guesses[:5]:
        reply = await env.verification.CheckVerification(
            V.CheckVerificationRequest(client_id="shop", id=started.id, code=guess)
        )
        lefts.append(reply.verification.check_attempts_left)
    assert lefts == [4, 3, 2, 1, 0]
    assert reply.verification.status == common_pb2.VERIFICATION_STATUS_MAX_ATTEMPTS_REACHED
    late = await env.verification.CheckVerification(
        V.CheckVerificationRequest(client_id="shop", id=started.id, code=code)
    )
    assert not late.approved


async def test_concurrency_over_grpc(env: Env) -> None:
    phone = new_phone()
    starts = await asyncio.gather(
        *(env.verification.StartVerification(start(phone)) for _ in range(20)), return_exceptions=True
    )
    made = {r.verification.id for r in starts if not isinstance(r, BaseException)}
    refusals = {parse_rpc_error(r).reason for r in starts if isinstance(r, grpc.aio.AioRpcError)}
    assert len(made) == 1 and refusals <= {"RESEND_TOO_SOON"}
    assert len(await env.inbox(phone)) == 1  # one verification, one SMS
    (verification_id,) = made
    (code,) = await env.codes_by_sms(phone)
    checks = await asyncio.gather(
        *(
            env.verification.CheckVerification(
                V.CheckVerificationRequest(client_id="shop", id=verification_id, code=code)
            )
            for _ in range(100)
        )
    )
    assert sum(c.approved for c in checks) == 1

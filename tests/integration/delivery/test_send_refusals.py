"""SendMessage through real gRPC against the real database: SMS to the sandbox inbox, and every refusal."""

from __future__ import annotations

from datetime import timedelta

import grpc
import phonenumbers
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.delivery.support import QUIET, refused, sms_request, stubs
from tests.support.stack import running_stack

PREMIUM = phonenumbers.format_number(
    phonenumbers.example_number_for_type("GB", phonenumbers.PhoneNumberType.PREMIUM_RATE),
    phonenumbers.PhoneNumberFormat.E164,
)
VOIP = phonenumbers.format_number(
    phonenumbers.example_number_for_type("GB", phonenumbers.PhoneNumberType.VOIP), phonenumbers.PhoneNumberFormat.E164
)


async def test_sms_reaches_the_sandbox_inbox_masked_and_sealed(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: object
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, sandbox = stubs(stack)
        reply = await delivery.SendMessage(sms_request("+79991234567", "Code 424242", request_id="r1"))
        message = reply.message
        assert message.status == common_pb2.MESSAGE_STATUS_DELIVERED
        assert message.channel == common_pb2.CHANNEL_SMS
        assert message.phone_masked == "+7******4567"
        inbox = await sandbox.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone="+79991234567"))
        assert [m.text for m in inbox.messages] == ["Code 424242"]
        assert inbox.messages[0].phone_masked == "+7******4567"
        # Stored sealed: neither the text nor the number appears in the document.
        db = mongo_client[stack.env["OTPGATE_DELIVERY_DATABASE"]]
        raw = repr(await db["messages"].find_one({"_id": message.id}))
        assert "424242" not in raw and "79991234567" not in raw
        assert "79991234567" not in captured_logs.text() and "424242" not in captured_logs.text()  # type: ignore[attr-defined]


async def test_validation_lists_every_bad_field(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)
        failure = await refused(
            delivery.SendMessage(
                delivery_pb2.SendMessageRequest(
                    client_id="shop", phone="12345", text="", ttl=duration_pb2.Duration(seconds=1)
                )
            )
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {f for f, _ in failure.field_violations} == {"phone", "text", "ttl"}
        long_text = await refused(delivery.SendMessage(sms_request("+79991234567", "x" * 4097)))
        assert [f for f, _ in long_text.field_violations] == ["text"]
        # A text that shows nothing (control, format and space characters only) is no message.
        for blank in ("\x00\x07\x1b", "\u200b\u200e", " \n\t\u3000"):
            nothing = await refused(delivery.SendMessage(sms_request("+79991234567", blank)))
            assert nothing.field_violations == [("text", "must contain a visible character")]
        origin = common_pb2.Origin(ip="300.1.2.3", user_agent="bad\nagent", session_id="s" * 257)
        bad_origin = await refused(delivery.SendMessage(sms_request("+79991234567", origin=origin)))
        assert {f for f, _ in bad_origin.field_violations} == {"origin.ip", "origin.user_agent", "origin.session_id"}
        bad_callback = await refused(
            delivery.SendMessage(sms_request("+79991234567", callback_url="ftp://example.com/x"))
        )
        assert [f for f, _ in bad_callback.field_violations] == ["callback_url"]


async def test_policy_refusals_country_sms_captcha_and_cap(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)

        async def policy(**fields: object) -> None:
            paths = list(fields)
            await delivery.UpdateClientPolicy(
                delivery_pb2.UpdateClientPolicyRequest(
                    policy=common_pb2.ClientPolicy(client_id="shop", **fields),  # type: ignore[arg-type]
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                )
            )

        await policy(allowed_countries=["DE"])
        failure = await refused(delivery.SendMessage(sms_request("+79991234567")))
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "COUNTRY_NOT_ALLOWED")

        await policy(allowed_countries=[], sms_countries=["DE"], sms_countries_any=False)
        failure = await refused(delivery.SendMessage(sms_request("+79991234567")))
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SMS_NOT_ALLOWED")
        ok = await delivery.SendMessage(sms_request("+4915123456789"))
        assert ok.message.status == common_pb2.MESSAGE_STATUS_DELIVERED

        await policy(sms_countries_any=True, captcha_rule=common_pb2.CAPTCHA_RULE_SMS)
        failure = await refused(delivery.SendMessage(sms_request("+79991234568")))
        assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPTCHA_REQUIRED")
        assert failure.status is not None
        passed = await delivery.SendMessage(
            sms_request("+79991234568", origin=common_pb2.Origin(captcha_verified=True))
        )
        assert passed.message.status == common_pb2.MESSAGE_STATUS_DELIVERED

        await policy(captcha_rule=common_pb2.CAPTCHA_RULE_ALWAYS)
        failure = await refused(
            delivery.SendMessage(
                delivery_pb2.SendMessageRequest(
                    client_id="shop", phone="+79991234569", text="hi", channel=common_pb2.CHANNEL_TELEGRAM
                )
            )
        )
        assert failure.reason == "CAPTCHA_REQUIRED"

        await policy(captcha_rule=common_pb2.CAPTCHA_RULE_ON_RISK, daily_sms_cap=2)
        await delivery.SendMessage(sms_request("+79161110001"))
        await delivery.SendMessage(sms_request("+79161110002"))
        failure = await refused(delivery.SendMessage(sms_request("+79161110003")))
        assert (failure.code, failure.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SMS_CAP_REACHED")
        assert failure.retry_after is not None and failure.retry_after > 0


async def test_line_types(mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock) -> None:
    overrides = {**QUIET, "OTPGATE_FRAUD_MODE": "block"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        # Premium-rate numbers never get an SMS, CAPTCHA or not.
        solved = common_pb2.Origin(captcha_verified=True, captcha_possible=True)
        for origin in (common_pb2.Origin(), solved):
            failure = await refused(delivery.SendMessage(sms_request(PREMIUM, origin=origin)))
            assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SMS_NOT_ALLOWED")
            assert "LINE_TYPE_PREMIUM_RATE" in failure.message
        # A VoIP number is a risk: refused where no CAPTCHA can be shown, asked for one where it
        # can, and sent once it is solved.
        failure = await refused(delivery.SendMessage(sms_request(VOIP)))
        assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SMS_NOT_ALLOWED")
        assert failure.metadata["signal"] == "LINE_TYPE_VOIP"
        failure = await refused(
            delivery.SendMessage(sms_request(VOIP, origin=common_pb2.Origin(captcha_possible=True)))
        )
        assert (failure.reason, failure.metadata["signal"]) == ("CAPTCHA_REQUIRED", "LINE_TYPE_VOIP")
        sent = await delivery.SendMessage(sms_request(VOIP, origin=solved))
        assert sent.message.status == common_pb2.MESSAGE_STATUS_DELIVERED


async def test_rate_limits_per_phone_ip_and_session_with_retry_info(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)
        for i in range(5):
            await delivery.SendMessage(sms_request("+79991234567", request_id=f"p{i}"))
        failure = await refused(delivery.SendMessage(sms_request("+79991234567", request_id="p5")))
        assert (failure.code, failure.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert failure.retry_after is not None and 0 < failure.retry_after <= 600
        # An idempotent repeat is answered before the limits count it.
        again = await delivery.SendMessage(sms_request("+79991234567", request_id="p0"))
        assert again.replayed
        clock.advance(1200)
        await delivery.SendMessage(sms_request("+79991234567", request_id="p6"))

        origin = common_pb2.Origin(ip="203.0.113.7")
        for i in range(20):  # the default: 20 SMS per address and hour
            await delivery.SendMessage(sms_request(f"+791622200{i:02d}", origin=origin))
        failure = await refused(delivery.SendMessage(sms_request("+79162220099", origin=origin)))
        assert failure.reason == "RATE_LIMITED" and "ip_sms" in failure.message

        session = common_pb2.Origin(session_id="sess-1")
        for i in range(10):
            await delivery.SendMessage(sms_request(f"+7916333000{i}", origin=session))
        failure = await refused(delivery.SendMessage(sms_request("+79163330019", origin=session)))
        assert failure.reason == "RATE_LIMITED" and "session" in failure.message


async def test_idempotent_and_conflicting_repeats(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, sandbox = stubs(stack)
        first = await delivery.SendMessage(sms_request("+79991234567", "A", request_id="same"))
        repeat = await delivery.SendMessage(sms_request("+79991234567", "A", request_id="same"))
        assert repeat.replayed and not first.replayed and repeat.message.id == first.message.id
        # Repeats are found through an _id-keyed pointer, not by scanning the outbox.
        database = mongo_client[stack.commons["delivery"].database]
        pointer = await database.idempotency.find_one({"_id": "shop\x1fsame"})
        assert pointer is not None and pointer["message_id"] == first.message.id
        conflict = await refused(delivery.SendMessage(sms_request("+79991234567", "B", request_id="same")))
        assert (conflict.code, conflict.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_CONFLICT")
        # Another client may use the same request id.
        other = await delivery.SendMessage(sms_request("+79991234567", "A", request_id="same", client_id="bank"))
        assert not other.replayed and other.message.id != first.message.id
        inbox = await sandbox.ListSandboxSms(delivery_pb2.ListSandboxSmsRequest(phone="+79991234567"))
        assert len(inbox.messages) == 2


async def test_a_refused_request_gives_its_request_id_back_and_a_held_one_is_in_progress(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {**QUIET, "OTPGATE_DELIVERY_LIMIT_PHONE_SHORT": "1/600"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        database = mongo_client[stack.commons["delivery"].database]
        await delivery.SendMessage(sms_request("+79991234567", "A", request_id="first"))
        limited = await refused(delivery.SendMessage(sms_request("+79991234567", "B", request_id="second")))
        assert limited.reason == "RATE_LIMITED"
        assert await database.idempotency.find_one({"_id": "shop\x1fsecond"}) is None  # given back
        clock.advance(1201)  # past the sliding window
        later = await delivery.SendMessage(sms_request("+79991234567", "B", request_id="second"))
        assert not later.replayed
        # A key taken by a request that has not stored its message yet: the repeat must wait.
        pointer = {"_id": "shop\x1fbusy", "message_id": "01NEVERSTORED0000000000000", "created_at": clock.now()}
        await database.idempotency.insert_one(pointer)
        busy = await refused(delivery.SendMessage(sms_request("+79163330019", "C", request_id="busy")))
        assert (busy.code, busy.reason, busy.retry_after) == (grpc.StatusCode.ABORTED, "REQUEST_IN_PROGRESS", 1.0)
        # No request runs longer than OTPGATE_RPC_TIMEOUT (5 s here): a key held twice that long with
        # no message was left by a request that failed or died, and is taken over.
        clock.advance(9)
        still = await refused(delivery.SendMessage(sms_request("+79163330019", "C", request_id="busy")))
        assert still.reason == "REQUEST_IN_PROGRESS"
        clock.advance(2)
        taken = await delivery.SendMessage(sms_request("+79163330019", "C", request_id="busy"))
        assert not taken.replayed
        stored = await database.idempotency.find_one({"_id": "shop\x1fbusy"})
        assert stored is not None and stored["message_id"] == taken.message.id


@pytest.mark.parametrize("client", ["shop"])
async def test_messages_are_scoped_to_their_client(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, client: str
) -> None:
    async with running_stack(
        mongo_client,
        keyring,
        ["delivery"],
        overrides={**QUIET, "OTPGATE_DELIVERY_INLINE_DISPATCH": "false"},
        clock=clock,
    ) as stack:
        delivery, _ = stubs(stack)
        ids = []
        for i in range(5):
            reply = await delivery.SendMessage(sms_request(f"+7999123450{i}", client_id=client))
            assert reply.message.status == common_pb2.MESSAGE_STATUS_QUEUED
            ids.append(reply.message.id)
            clock.advance(1)
        got = await delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id=client, id=ids[0]))
        assert got.message.id == ids[0]
        for call in (
            delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="bank", id=ids[0])),
            delivery.CancelMessage(delivery_pb2.CancelMessageRequest(client_id="bank", id=ids[0])),
            delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id=client, id="01ARZ3NDEKTSV4RRFFQ69G5FAV")),
        ):
            failure = await refused(call)
            assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")
        # Paging, newest first.
        page1 = await delivery.ListMessages(delivery_pb2.ListMessagesRequest(client_id=client, page_size=2))
        page2 = await delivery.ListMessages(
            delivery_pb2.ListMessagesRequest(client_id=client, page_size=2, page_token=page1.next_page_token)
        )
        page3 = await delivery.ListMessages(
            delivery_pb2.ListMessagesRequest(client_id=client, page_size=2, page_token=page2.next_page_token)
        )
        listed = [m.id for m in [*page1.messages, *page2.messages, *page3.messages]]
        assert listed == list(reversed(ids)) and not page3.next_page_token
        assert not (await delivery.ListMessages(delivery_pb2.ListMessagesRequest(client_id="bank"))).messages
        # Time filters: [after, before).
        window = delivery_pb2.ListMessagesRequest(client_id=client)
        window.create_time_after.FromDatetime(clock.now() - timedelta(seconds=4))
        window.create_time_before.FromDatetime(clock.now() - timedelta(seconds=1))
        assert [m.id for m in (await delivery.ListMessages(window)).messages] == [ids[3], ids[2], ids[1]]
        # Cancel, then filter by status.
        canceled = await delivery.CancelMessage(delivery_pb2.CancelMessageRequest(client_id=client, id=ids[1]))
        assert canceled.message.status == common_pb2.MESSAGE_STATUS_CANCELED
        again = await refused(delivery.CancelMessage(delivery_pb2.CancelMessageRequest(client_id=client, id=ids[1])))
        assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_NOT_CANCELABLE")
        only = await delivery.ListMessages(
            delivery_pb2.ListMessagesRequest(client_id=client, status=common_pb2.MESSAGE_STATUS_CANCELED)
        )
        assert [m.id for m in only.messages] == [ids[1]]
        # Expiry is decided at read time with the injected clock.
        clock.advance(3600)
        expired = await delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id=client, id=ids[0]))
        assert expired.message.status == common_pb2.MESSAGE_STATUS_EXPIRED
        assert expired.message.failure_reason == common_pb2.FAILURE_REASON_TTL_EXPIRED
        listed_expired = await delivery.ListMessages(
            delivery_pb2.ListMessagesRequest(client_id=client, status=common_pb2.MESSAGE_STATUS_EXPIRED)
        )
        assert len(listed_expired.messages) == 4


async def test_policy_update_with_field_mask_and_sealed_webhook_secret(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)
        default = await delivery.GetClientPolicy(delivery_pb2.GetClientPolicyRequest(client_id="shop"))
        assert default.policy.client_id == "shop" and not default.policy.webhook_secret_set
        updated = await delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(
                    client_id="shop",
                    sms_fallback=True,
                    default_confirm_days=30,
                    webhook_secret="s3cret-s3cret-s3cret",
                    rate_limits=common_pb2.RateLimits(
                        phone_short=common_pb2.RateLimit(limit=2, window=duration_pb2.Duration(seconds=60))
                    ),
                ),
                update_mask=field_mask_pb2.FieldMask(
                    paths=["sms_fallback", "default_confirm_days", "webhook_secret", "rate_limits.phone_short"]
                ),
            )
        )
        assert updated.policy.sms_fallback and updated.policy.default_confirm_days == 30
        assert updated.policy.webhook_secret_set and not updated.policy.webhook_secret
        assert updated.policy.rate_limits.phone_short.limit == 2
        raw = await mongo_client[stack.env["OTPGATE_DELIVERY_DATABASE"]]["policies"].find_one({"_id": "shop"})
        assert raw is not None and b"s3cret" not in bytes(raw["webhook_secret"])
        # A mask with one field leaves the others alone.
        again = await delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id="shop", daily_sms_cap=7),
                update_mask=field_mask_pb2.FieldMask(paths=["daily_sms_cap"]),
            )
        )
        assert again.policy.daily_sms_cap == 7 and again.policy.sms_fallback and again.policy.webhook_secret_set
        # The per-client override applies.
        await delivery.SendMessage(sms_request("+79991234567"))
        await delivery.SendMessage(sms_request("+79991234567"))
        failure = await refused(delivery.SendMessage(sms_request("+79991234567")))
        assert failure.reason == "RATE_LIMITED"
        bad = await refused(
            delivery.UpdateClientPolicy(
                delivery_pb2.UpdateClientPolicyRequest(
                    policy=common_pb2.ClientPolicy(client_id="shop", allowed_countries=["Germany"]),
                    update_mask=field_mask_pb2.FieldMask(paths=["allowed_countries", "nope"]),
                )
            )
        )
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_usage_counts_per_client_channel_and_day(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)
        await delivery.SendMessage(sms_request("+79991234567"))
        await delivery.SendMessage(sms_request("+79991234568"))
        clock.advance(86400)
        await delivery.SendMessage(sms_request("+79991234569"))
        usage = await delivery.GetUsage(
            delivery_pb2.GetUsageRequest(client_id="shop", start_day="2026-01-01", end_day="2026-01-02")
        )
        rows = [(r.day, r.channel, r.messages, r.billed_sms) for r in usage.records]
        assert rows == [
            ("2026-01-01", common_pb2.CHANNEL_SMS, 2, 2),
            ("2026-01-02", common_pb2.CHANNEL_SMS, 1, 1),
        ]
        assert not (await delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="bank"))).records


async def test_usage_counts_a_long_sms_as_its_parts(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=QUIET, clock=clock) as stack:
        delivery, _ = stubs(stack)
        await delivery.SendMessage(sms_request("+79991234567", text="Code 1234"))
        await delivery.SendMessage(sms_request("+79991234568", text="Ваш код 1234. " * 6))  # 84 UCS-2 chars: 2 parts
        await delivery.SendMessage(sms_request("+79991234569", text="x" * 400))  # 3 GSM-7 parts
        usage = await delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="shop", start_day="2026-01-01"))
        assert [(r.messages, r.billed_sms, r.sms_parts) for r in usage.records] == [(3, 6, 6)]


async def test_the_early_directory_lookup_neither_fails_an_accepted_message_nor_outlives_a_refused_one(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    # Delivery alone: the directory is unreachable, so the lookup asked at admission fails.
    overrides = {**QUIET, "OTPGATE_DELIVERY_LIMIT_PHONE_SHORT": "1/600"}
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        accepted = await delivery.SendMessage(sms_request("+79991234567", "A", channel=common_pb2.CHANNEL_AUTO))
        # Stored: the attempt asked the directory again and left it for the dispatcher, as with no lookup.
        assert accepted.message.status == common_pb2.MESSAGE_STATUS_QUEUED
        limited = await refused(delivery.SendMessage(sms_request("+79991234567", "B", channel=common_pb2.CHANNEL_AUTO)))
        assert limited.reason == "RATE_LIMITED"
        database = mongo_client[stack.commons["delivery"].database]
        assert await database.messages.count_documents({}) == 1

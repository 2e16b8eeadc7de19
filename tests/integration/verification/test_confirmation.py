"""Phone re-confirmation end to end: delivery holds a message, the SMS code arrives in the
sandbox SMS inbox, the sandbox Telegram user types it to the bot, the message is released."""

from __future__ import annotations

import asyncio

import grpc
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.directory.v1 import directory_pb2
from otpgate.verification.v1 import verification_pb2 as V

from tests.integration.verification.conftest import Env, new_phone, refused

BOT = "smscodes_bot"


async def hold_message(env: Env, phone: str, text: str = "Your order 77 is ready") -> str:
    reply = await env.delivery.SendMessage(
        delivery_pb2.SendMessageRequest(
            client_id="shop", phone=phone, text=text, channel=common_pb2.CHANNEL_TELEGRAM, bot=BOT, confirm_days=30
        )
    )
    message = reply.message
    for _ in range(100):  # dispatch may finish just after the answer
        if message.status == common_pb2.MESSAGE_STATUS_HELD and await env.inbox(phone):
            break
        await asyncio.sleep(0.05)
        message = (
            await env.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message.id))
        ).message
    assert message.status == common_pb2.MESSAGE_STATUS_HELD
    return message.id


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


async def test_hold_sms_code_typed_to_the_bot_releases_the_message(env: Env, captured_logs: object) -> None:
    user = await env.user()
    await env.connect(user)
    message_id = await hold_message(env, user.phone)
    (code,) = await env.codes_by_sms(user.phone)
    assert len(code) == 6
    chat = await env.chat(user)
    # The bot prompt (delivery picks Russian for a +7 number) names the number, masked.
    assert any("SMS" in text and "+7******" + user.phone[-4:] in text for text in chat), chat
    assert not any("order 77" in text for text in chat)  # held, not delivered

    answer = await env.type(user, wrong(code))
    assert "4" in answer  # tries left
    answer = await env.type(user, f"{code[:3]} {code[3:]}")  # spaces are fine
    assert "confirmed" in answer.lower()

    message = (await env.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message_id))).message
    for _ in range(100):
        if message.status == common_pb2.MESSAGE_STATUS_SENT:
            break
        await asyncio.sleep(0.05)
        message = (
            await env.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message_id))
        ).message
    assert message.status == common_pb2.MESSAGE_STATUS_SENT
    assert any("order 77" in text for text in await env.chat(user))
    subscriber = await env.directory.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=user.user_id))
    assert subscriber.subscriber.HasField("confirm_time")

    # Typing the code again: nothing is pending any more.
    late = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=code, bot_id=BOT)
    )
    assert late.outcome == V.CONFIRMATION_OUTCOME_NO_PENDING
    stored = await env.database["confirmations"].find_one({"telegram_user_id": user.user_id})
    assert stored is not None and stored["status"] == "APPROVED"
    assert "code" not in stored and "phone" not in stored and not stored["followup_pending"]
    logs = captured_logs.text()  # type: ignore[attr-defined]
    assert "confirmation_started" in logs and "confirmation_code_submitted" in logs  # the capture works
    assert code not in logs and user.phone not in logs and user.phone[1:] not in logs


async def test_wrong_telegram_user_is_refused_and_tries_count_down(env: Env) -> None:
    owner = await env.user()
    stranger = await env.user()
    await env.connect(owner)
    await env.connect(stranger)
    await hold_message(env, owner.phone)
    (code,) = await env.codes_by_sms(owner.phone)
    # Someone else who learnt the code cannot confirm the owner's number.
    foreign = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=stranger.user_id, code=code, bot_id=BOT)
    )
    assert foreign.outcome == V.CONFIRMATION_OUTCOME_NO_PENDING and not foreign.phone_masked
    left = []
    for _ in range(4):
        reply = await env.verification.SubmitConfirmationCode(
            V.SubmitConfirmationCodeRequest(telegram_user_id=owner.user_id, code=wrong(code), bot_id=BOT)
        )
        assert reply.outcome == V.CONFIRMATION_OUTCOME_WRONG_CODE
        left.append(reply.attempts_left)
    assert left == [4, 3, 2, 1]
    ok = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=owner.user_id, code=code, bot_id="smsccode_bot")
    )
    # Answered once the confirmation is recorded; the held message is released after the answer.
    assert ok.outcome == V.CONFIRMATION_OUTCOME_CONFIRMED
    assert ok.phone_masked.endswith(owner.phone[-4:])
    await env.stack.app("verification").confirmer.drain()
    stored = await env.database["confirmations"].find_one({"telegram_user_id": owner.user_id, "status": "APPROVED"})
    assert stored is not None and not stored["followup_pending"] and stored["released_count"] == 1


async def test_five_wrong_codes_end_the_confirmation(env: Env) -> None:
    user = await env.user()
    await env.connect(user)
    message_id = await hold_message(env, user.phone)
    (code,) = await env.codes_by_sms(user.phone)
    for _ in range(4):
        await env.verification.SubmitConfirmationCode(
            V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=wrong(code), bot_id=BOT)
        )
    last = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=wrong(code), bot_id=BOT)
    )
    assert last.outcome == V.CONFIRMATION_OUTCOME_TOO_MANY_ATTEMPTS and last.attempts_left == 0
    after = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=code, bot_id=BOT)
    )
    assert after.outcome == V.CONFIRMATION_OUTCOME_TOO_MANY_ATTEMPTS
    stored = await env.database["confirmations"].find_one({"telegram_user_id": user.user_id})
    assert stored["status"] == "MAX_ATTEMPTS_REACHED" and "code" not in stored
    # What was held for the number failed for the wrong codes, at once, not as a timeout later.
    held = await env.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message_id))
    assert (held.message.status, held.message.failure_reason) == (
        common_pb2.MESSAGE_STATUS_FAILED,
        common_pb2.FAILURE_REASON_CONFIRMATION_FAILED,
    )


async def test_one_pending_confirmation_per_number_reused_with_the_same_code_after_the_cooldown(env: Env) -> None:
    user = await env.user(language="ru")
    await env.connect(user)
    request = V.StartPhoneConfirmationRequest(
        phone=user.phone, telegram_user_id=user.user_id, bot_id=BOT, client_id="shop", locale="ru"
    )
    first = await env.verification.StartPhoneConfirmation(request)
    assert not first.reused and first.code_sent
    env.clock.advance(30)
    inside = await env.verification.StartPhoneConfirmation(request)
    assert inside.confirmation_id == first.confirmation_id and inside.reused and not inside.code_sent
    assert len(await env.inbox(user.phone)) == 1
    env.clock.advance(30)
    resent = await env.verification.StartPhoneConfirmation(request)
    assert resent.confirmation_id == first.confirmation_id and resent.code_sent
    assert resent.expire_time == first.expire_time  # the window does not grow
    codes = await env.codes_by_sms(user.phone)
    assert len(codes) == 2 and codes[0] == codes[1]
    assert "Telegram" in (await env.inbox(user.phone))[0] and "код" in (await env.inbox(user.phone))[0]
    assert len([doc async for doc in env.database["confirmations"].find({})]) == 1
    # Found without its pointer too (a hint; the unique pending index decides), which is written again.
    await env.database["pending_pointers"].delete_many({})
    again = await env.verification.StartPhoneConfirmation(request)
    assert again.confirmation_id == first.confirmation_id and again.reused and not again.code_sent
    assert await env.database["pending_pointers"].count_documents({"record_id": first.confirmation_id}) == 1
    # The code expires after 10 minutes even though the record is still there.
    env.clock.advance(600)
    expired = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=codes[0], bot_id=BOT)
    )
    assert expired.outcome == V.CONFIRMATION_OUTCOME_EXPIRED
    # After expiry a new start is a new confirmation with a new code.
    fresh = await env.verification.StartPhoneConfirmation(request)
    assert fresh.confirmation_id != first.confirmation_id and not fresh.reused


async def test_a_new_number_voids_the_persons_pending_confirmation_of_the_old_one(env: Env) -> None:
    user = await env.user()
    await env.connect(user)
    old = await env.verification.StartPhoneConfirmation(
        V.StartPhoneConfirmationRequest(phone=user.phone, telegram_user_id=user.user_id, bot_id=BOT, client_id="shop")
    )
    other_phone = new_phone()
    new = await env.verification.StartPhoneConfirmation(
        V.StartPhoneConfirmationRequest(phone=other_phone, telegram_user_id=user.user_id, bot_id=BOT, client_id="shop")
    )
    assert new.confirmation_id != old.confirmation_id and not new.reused
    statuses = {doc["_id"]: doc["status"] async for doc in env.database["confirmations"].find({})}
    assert statuses[old.confirmation_id] == "CANCELED" and statuses[new.confirmation_id] == "PENDING"
    (old_code,) = await env.codes_by_sms(user.phone)
    typed = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=old_code, bot_id=BOT)
    )
    assert typed.outcome != V.CONFIRMATION_OUTCOME_CONFIRMED


async def test_number_moved_to_another_account_supersedes_the_pending_confirmation(env: Env) -> None:
    first_owner = await env.user()
    await env.connect(first_owner)
    await env.verification.StartPhoneConfirmation(
        V.StartPhoneConfirmationRequest(
            phone=first_owner.phone, telegram_user_id=first_owner.user_id, bot_id=BOT, client_id="shop"
        )
    )
    (code,) = await env.codes_by_sms(first_owner.phone)
    new_owner = await env.user(phone=first_owner.phone)
    await env.connect(new_owner)  # the newest owner wins the number in the directory
    moved = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=first_owner.user_id, code=code, bot_id=BOT)
    )
    assert moved.outcome == V.CONFIRMATION_OUTCOME_NO_PENDING
    env.clock.advance(61)
    started = await env.verification.StartPhoneConfirmation(
        V.StartPhoneConfirmationRequest(
            phone=new_owner.phone, telegram_user_id=new_owner.user_id, bot_id=BOT, client_id="shop"
        )
    )
    assert not started.reused


async def test_start_validation_and_unknown_submitter(env: Env) -> None:
    bad = await refused(env.verification.StartPhoneConfirmation(V.StartPhoneConfirmationRequest(phone="12")))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in bad.field_violations} == {"phone", "telegram_user_id", "bot_id", "client_id"}
    nobody = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=424242, code="123456", bot_id=BOT)
    )
    assert nobody.outcome == V.CONFIRMATION_OUTCOME_NO_PENDING


async def test_raw_collections_never_hold_a_plaintext_code(env: Env) -> None:
    user = await env.user()
    await env.connect(user)
    await hold_message(env, user.phone)
    (code,) = await env.codes_by_sms(user.phone)
    dump = ""
    for name in await env.database.list_collection_names():
        dump += repr([doc async for doc in env.database[name].find({})])
    assert code not in dump and user.phone[1:] not in dump


async def test_a_follow_up_that_did_not_finish_inline_is_finished_by_the_sweeper(env: Env) -> None:
    user = await env.user()
    await env.connect(user)
    message_id = await hold_message(env, user.phone)
    (code,) = await env.codes_by_sms(user.phone)
    confirmer = env.stack.app("verification").confirmer
    # The code was accepted, then the process stopped before the directory and delivery heard of it.
    record = await env.database["confirmations"].find_one({"telegram_user_id": user.user_id})
    result = await confirmer.engine.check(confirmer.engine.view(record), code)
    assert result.record["followup_pending"] and "phone" in result.record
    assert await confirmer.retry_followups() == 0  # too fresh: the inline path may still be running
    env.clock.advance(31)
    assert await confirmer.retry_followups() == 1
    message = (await env.delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=message_id))).message
    assert message.status in (common_pb2.MESSAGE_STATUS_QUEUED, common_pb2.MESSAGE_STATUS_SENT)
    subscriber = await env.directory.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=user.user_id))
    assert subscriber.subscriber.HasField("confirm_time")
    stored = await env.database["confirmations"].find_one({"_id": record["_id"]})
    assert not stored["followup_pending"] and "phone" not in stored and stored["released_count"] == 1


async def test_confirmation_sms_is_billed_to_the_client_only_for_its_own_bot(env: Env) -> None:
    bots = botgateway_pb2_grpc.BotGatewayServiceStub(env.stack.channel("botgateway"))
    own = (
        await bots.RegisterBot(botgateway_pb2.RegisterBotRequest(token="6001234567:own-bot", owner_client_id="bank"))
    ).bot
    shared_user = await env.user()
    own_user = await env.user()
    await env.connect(shared_user)
    await env.connect(own_user, bot=own.id)
    for user, bot in ((shared_user, BOT), (own_user, own.id)):
        started = await env.verification.StartPhoneConfirmation(
            V.StartPhoneConfirmationRequest(
                phone=user.phone, telegram_user_id=user.user_id, bot_id=bot, client_id="bank"
            )
        )
        assert started.code_sent
        assert len(await env.codes_by_sms(user.phone)) == 1
    day = env.clock.now().strftime("%Y-%m-%d")
    usage = await env.delivery.GetUsage(delivery_pb2.GetUsageRequest(client_id="bank", start_day=day, end_day=day))
    sms = [r for r in usage.records if r.channel == common_pb2.CHANNEL_SMS]
    assert sum(r.billed_sms for r in sms) == 1  # the own bot's confirmation only


async def test_the_right_code_is_confirmed_at_once_even_when_releasing_cannot_happen_yet(env: Env) -> None:
    """The answer waits for the confirmation to be recorded, never for the held messages."""
    user = await env.user()
    await env.connect(user)
    await hold_message(env, user.phone)
    (code,) = await env.codes_by_sms(user.phone)
    await env.stack.running["delivery"].server.stop(0)  # delivery is down when the person types the code
    ok = await env.verification.SubmitConfirmationCode(
        V.SubmitConfirmationCodeRequest(telegram_user_id=user.user_id, code=code, bot_id=BOT)
    )
    assert ok.outcome == V.CONFIRMATION_OUTCOME_CONFIRMED and ok.phone_masked.endswith(user.phone[-4:])
    subscriber = await env.directory.GetSubscriber(directory_pb2.GetSubscriberRequest(telegram_user_id=user.user_id))
    assert subscriber.subscriber.HasField("confirm_time")
    confirmer = env.stack.app("verification").confirmer
    await confirmer.drain()
    stored = await env.database["confirmations"].find_one({"telegram_user_id": user.user_id, "status": "APPROVED"})
    # Still pending: the sweeper releases the held message once delivery answers (tested above).
    assert stored is not None and stored["followup_pending"] and stored.get("marked_at")

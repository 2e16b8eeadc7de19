"""Phone re-confirmation: an SMS code the person types back to a bot.

Delivery holds a message whose number was confirmed too long ago and calls
StartPhoneConfirmation. One pending confirmation exists per number (reused, never
duplicated) and per Telegram user. The SMS code and a bot prompt both go through
delivery.SendMessage (purpose CONFIRMATION, confirm_days=0). The person types the code to
any bot; SubmitConfirmationCode accepts it only from the Telegram user the confirmation was
started for, who must still own the number in the directory. Success marks the number
confirmed in the directory, and then the answer tells the bot what to say: it comes as soon
as the confirmation is recorded. Releasing the held messages follows the answer, in the
background; `followup_pending` stays set until it is done, so the sweeper finishes it if this
process stops first (retry_followups).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from dataclasses import dataclass
from datetime import timedelta

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2

from services.core.clock import Clock, as_utc
from services.core.counters import Full
from services.core.crypto import Keyring
from services.core.errors import Violations, aborted, invalid_argument
from services.core.ids import new_id
from services.core.logging import get_logger
from services.core.mongo import Document
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.verification import metrics, templates
from services.verification.codes import (
    MAX_CODE_LENGTH,
    MIN_CODE_LENGTH,
    CheckOutcome,
    CodeEngine,
    View,
    expire_at,
    generate_code,
    is_code_shaped,
    normalize_typed_code,
)
from services.verification.config import ConfirmationPolicy
from services.verification.downstream import DownstreamError, call, duration, timestamp
from services.verification.store import APPROVED, CANCELED, EXPIRED, MAX_ATTEMPTS_REACHED, PENDING, PHONE_INDEX, Store

log = get_logger(__name__)

# A finished confirmation still explains a late typed code ("expired", "too many tries") this long.
RECENT_FINAL = timedelta(hours=24)
# The sweeper retries a follow-up (directory + release) that did not finish inline after this long.
FOLLOWUP_GRACE = timedelta(seconds=30)
NOT_OWNER_REASONS = frozenset({"PHONE_NOT_LINKED", "SUBSCRIBER_NOT_FOUND"})

Outcome = verification_pb2.ConfirmationOutcome
CONFIRMED = verification_pb2.CONFIRMATION_OUTCOME_CONFIRMED
WRONG_CODE = verification_pb2.CONFIRMATION_OUTCOME_WRONG_CODE
OUTCOME_EXPIRED = verification_pb2.CONFIRMATION_OUTCOME_EXPIRED
NO_PENDING = verification_pb2.CONFIRMATION_OUTCOME_NO_PENDING
TOO_MANY_ATTEMPTS = verification_pb2.CONFIRMATION_OUTCOME_TOO_MANY_ATTEMPTS


@dataclass(frozen=True)
class StartInput:
    phone: Phone
    telegram_user_id: int
    bot_id: str
    client_id: str
    locale: str


class Confirmer:
    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        clock: Clock,
        policy: ConfirmationPolicy,
        delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub,
        directory: directory_pb2_grpc.DirectoryServiceAsyncStub,
        failed_checks_per_hour: int = 100,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.clock = clock
        self.policy = policy
        self.delivery = delivery
        self.directory = directory
        self.failed_checks = store.failed_check_counter(clock, failed_checks_per_hour)
        self._releases: set[asyncio.Task[None]] = set()
        # On success the code is erased at once; the sealed phone stays until the follow-up
        # (directory.MarkConfirmed, delivery.ReleaseHeldMessages) is done.
        self.engine = CodeEngine(
            store,
            store.confirmations,
            keyring,
            clock,
            approve_unset=("code",),
            approve_set={"followup_pending": True},
        )

    # Start -------------------------------------------------------------------------------

    def validate_start(self, request: verification_pb2.StartPhoneConfirmationRequest) -> StartInput:
        v = Violations()
        phone: Phone | None = None
        try:
            phone = parse_phone(request.phone)
        except InvalidPhoneError as exc:
            v.add("phone", str(exc))
        v.check(request.telegram_user_id > 0, "telegram_user_id", "required")
        v.check(bool(request.bot_id), "bot_id", "required")
        v.check(bool(request.client_id), "client_id", "required")
        v.raise_if_any()
        assert phone is not None
        return StartInput(
            phone=phone,
            telegram_user_id=request.telegram_user_id,
            bot_id=request.bot_id,
            client_id=request.client_id,
            locale=templates.normalize_locale(request.locale or templates.DEFAULT_LOCALE),
        )

    async def start(
        self, request: verification_pb2.StartPhoneConfirmationRequest
    ) -> verification_pb2.StartPhoneConfirmationResponse:
        start = self.validate_start(request)
        phone_bi = self.keyring.blind_index(PHONE_INDEX, start.phone.e164)
        for attempt in range(5):
            # The pointer first; after a refused insert (one is pending), the unique index too.
            existing = await self.store.pending_by_key(self.store.confirmations, phone_bi, search=attempt > 0)
            if existing is not None:
                view = await self.engine.settle_lapsed(self.engine.view(existing))
                if view.pending:
                    if int(view.record["telegram_user_id"]) == start.telegram_user_id:
                        return await self._reuse(view, start)
                    # The number moved to another Telegram account: the old person's code must not count.
                    won, _ = await self.engine.decide(view.id, CANCELED)
                    if won:
                        metrics.confirmations.labels("superseded").inc()
                continue
            created = await self._create(start, phone_bi)
            if created is not None:
                return created
        raise aborted("the confirmation changed concurrently; retry", reason="CONFLICT")

    async def issue(self, start: StartInput, phone_bi: str) -> tuple[Document, str] | None:
        """Store a new pending confirmation and its code (not sent yet). None if one is pending."""
        now = self.clock.now()
        # One pending confirmation per person too: an older one for another number is void.
        async for other in self.store.confirmations.find(
            {"telegram_user_id": start.telegram_user_id, "status": PENDING, "phone_bi": {"$ne": phone_bi}}, {"_id": 1}
        ):
            won, _ = await self.engine.decide(str(other["_id"]), CANCELED)
            if won:
                metrics.confirmations.labels("superseded").inc()
        record_id = new_id(int(now.timestamp() * 1000))
        code = generate_code(self.policy.code_length)
        record: Document = {
            "_id": record_id,
            "pending_key": phone_bi,
            "phone_bi": phone_bi,
            "phone": self.engine.seal_phone(record_id, start.phone.e164),
            "phone_masked": start.phone.masked,
            "telegram_user_id": start.telegram_user_id,
            "bot_id": start.bot_id,
            "client_id": start.client_id,
            "locale": start.locale,
            "status": PENDING,
            **self.engine.code_fields(record_id, code),
            "max_attempts": self.policy.max_attempts,
            "max_sends": self.policy.max_sends,
            "created_at": now,
            "updated_at": now,
            "expire_at": now + timedelta(seconds=self.policy.ttl),
        }
        if not await self.engine.insert(record):
            return None
        await self.store.point_pending(phone_bi, record_id, now)
        return record, code

    async def _create(self, start: StartInput, phone_bi: str) -> verification_pb2.StartPhoneConfirmationResponse | None:
        issued = await self.issue(start, phone_bi)
        if issued is None:
            return None
        record, code = issued
        record_id = str(record["_id"])
        try:
            sms = await self._send_sms(record, start, code, 1)
        except BaseException as exc:
            # A refused SMS leaves no pending confirmation behind.
            await self.store.confirmations.delete_one({"_id": record_id, "status": PENDING})
            if isinstance(exc, DownstreamError):
                metrics.confirmations.labels("refused").inc()
                log.info("confirmation_refused", confirmation_id=record_id, reason=exc.reason)
                raise exc.service_error() from None
            raise
        prompt_id = await self._send_prompt(record, start, 1)
        await self.engine.record_send(self.engine.view(record), {"message_id": sms.id, "prompt_message_id": prompt_id})
        metrics.confirmations.labels("started").inc()
        log.info(
            "confirmation_started",
            confirmation_id=record_id,
            client_id=start.client_id,
            bot_id=start.bot_id,
            telegram_user_id=start.telegram_user_id,
        )
        return self._start_response(record, reused=False, code_sent=True)

    async def _reuse(self, view: View, start: StartInput) -> verification_pb2.StartPhoneConfirmationResponse:
        metrics.confirmations.labels("reused").inc()
        reservation = await self.engine.reserve_send(view, self.policy.resend_cooldown)
        if reservation.refusal is not None:
            # Inside the cooldown, or out of sends: the code already sent stays valid.
            log.info("confirmation_reused", confirmation_id=view.id, resent=False, why=reservation.refusal.value)
            return self._start_response(view.record, reused=True, code_sent=False)
        number = reservation.number
        record = reservation.view.record
        try:
            code = self.engine.open_code(record)
            sms = await self._send_sms(record, start, code, number)
        except DownstreamError as err:
            await self.engine.undo_send(view, number)
            log.info("confirmation_resend_refused", confirmation_id=view.id, reason=err.reason)
            return self._start_response(record, reused=True, code_sent=False)
        except BaseException:
            await self.engine.undo_send(view, number)
            raise
        prompt_id = await self._send_prompt(record, start, number)
        await self.engine.record_send(reservation.view, {"message_id": sms.id, "prompt_message_id": prompt_id})
        metrics.confirmations.labels("resent").inc()
        log.info("confirmation_reused", confirmation_id=view.id, resent=True, send_count=number)
        return self._start_response(record, reused=True, code_sent=True)

    def _start_response(
        self, record: Document, *, reused: bool, code_sent: bool
    ) -> verification_pb2.StartPhoneConfirmationResponse:
        response = verification_pb2.StartPhoneConfirmationResponse(
            confirmation_id=str(record["_id"]), reused=reused, code_sent=code_sent
        )
        response.expire_time.CopyFrom(timestamp(expire_at(record)))
        return response

    def _remaining(self, record: Document) -> float:
        return max(1.0, (expire_at(record) - self.clock.now()).total_seconds())

    async def _send_sms(self, record: Document, start: StartInput, code: str, send_number: int) -> common_pb2.Message:
        request = delivery_pb2.SendMessageRequest(
            client_id=start.client_id,
            phone=start.phone.e164,
            text=templates.confirmation_sms_text(start.locale, code),
            channel=common_pb2.CHANNEL_SMS,
            # The bot that triggered it: delivery bills the SMS to the client only for its own bot.
            bot=start.bot_id,
            confirm_days=0,
            ttl=duration(math.floor(self._remaining(record))),
            request_id=f"confirmation:{record['_id']}:{send_number}",
            purpose=delivery_pb2.MESSAGE_PURPOSE_CONFIRMATION,
        )
        reply = await call(lambda: self.delivery.SendMessage(request))
        return reply.message

    async def _send_prompt(self, record: Document, start: StartInput, send_number: int) -> str:
        """Tell the person in the bot to type the SMS code. Best effort: the SMS is what matters."""
        request = delivery_pb2.SendMessageRequest(
            client_id=start.client_id,
            phone=start.phone.e164,
            text=templates.confirmation_prompt_text(start.locale, start.phone.masked, self._remaining(record)),
            channel=common_pb2.CHANNEL_TELEGRAM,
            bot=start.bot_id,
            confirm_days=0,
            sms_fallback=False,
            ttl=duration(math.floor(self._remaining(record))),
            request_id=f"confirmation:{record['_id']}:{send_number}:prompt",
            purpose=delivery_pb2.MESSAGE_PURPOSE_CONFIRMATION,
        )
        try:
            reply = await call(lambda: self.delivery.SendMessage(request))
        except DownstreamError as err:
            log.warning("confirmation_prompt_not_sent", confirmation_id=str(record["_id"]), reason=err.reason)
            return ""
        return str(reply.message.id)

    # Submit ------------------------------------------------------------------------------

    async def submit(
        self, request: verification_pb2.SubmitConfirmationCodeRequest
    ) -> verification_pb2.SubmitConfirmationCodeResponse:
        if request.telegram_user_id <= 0:
            raise invalid_argument([("telegram_user_id", "required")])
        code = normalize_typed_code(request.code)
        if not is_code_shaped(code):
            raise invalid_argument([("code", f"must be {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} digits")])
        user = request.telegram_user_id
        record = await self.store.latest_confirmation(user, PENDING)
        if record is None:
            return await self._answer_without_pending(user)
        view = self.engine.view(record)
        masked = str(record["phone_masked"])
        if not view.pending:
            view = await self.engine.settle_lapsed(view)
            if view.status == EXPIRED:
                return self._answer("expired", OUTCOME_EXPIRED, masked, view.id)
            return await self._answer_without_pending(user)
        phone = self.engine.open_phone(view.record)
        if not await self._still_owner(user, phone):
            await self.engine.decide(view.id, CANCELED)
            log.info("confirmation_owner_changed", confirmation_id=view.id, telegram_user_id=user)
            return self._answer("no_pending", NO_PENDING, "", view.id)
        result = await self.engine.check_capped(view, code, self.failed_checks, str(record["phone_bi"]))
        if isinstance(result, Full):
            return self._answer("too_many_failed_checks", TOO_MANY_ATTEMPTS, masked, view.id)
        if result.outcome is CheckOutcome.APPROVED:
            if not await self.mark_confirmed(result.record, phone):
                return self._answer("no_pending", NO_PENDING, "", view.id)
            self._release_later(result.record, phone)
            return self._answer("confirmed", CONFIRMED, masked, view.id)
        if result.outcome is CheckOutcome.WRONG_CODE:
            return self._answer("wrong_code", WRONG_CODE, masked, view.id, attempts_left=result.attempts_left)
        if result.outcome is CheckOutcome.EXHAUSTED:
            if result.view.status == MAX_ATTEMPTS_REACHED:
                await self._fail_held(view.id, user, phone)
            return self._answer("too_many_attempts", TOO_MANY_ATTEMPTS, masked, view.id)
        if result.outcome is CheckOutcome.EXPIRED:
            return self._answer("expired", OUTCOME_EXPIRED, masked, view.id)
        # FINAL: confirmed by a concurrent submit of the same code, or canceled meanwhile.
        if result.view.status == APPROVED:
            return self._answer("confirmed", CONFIRMED, masked, view.id)
        return self._answer("no_pending", NO_PENDING, "", view.id)

    async def _fail_held(self, confirmation_id: str, user: int, phone: str) -> None:
        """Every try was a wrong code: the messages held for the number fail (CONFIRMATION_FAILED)
        rather than wait for their ttl. Should delivery not answer, they end at their ttl
        (CONFIRMATION_TIMEOUT): late, but not lost."""
        request = delivery_pb2.FailHeldMessagesRequest(telegram_user_id=user, phone=phone)
        try:
            reply = await call(lambda: self.delivery.FailHeldMessages(request))
        except DownstreamError as err:
            log.warning("held_messages_not_failed", confirmation_id=confirmation_id, reason=err.reason)
            return
        log.info("confirmation_failed", confirmation_id=confirmation_id, failed_count=reply.failed_count)

    async def _answer_without_pending(self, user: int) -> verification_pb2.SubmitConfirmationCodeResponse:
        last = await self.store.latest_confirmation(user)
        now = self.clock.now()
        if last is not None and last.get("final_at") and as_utc(last["final_at"]) > now - RECENT_FINAL:
            if last["status"] == EXPIRED:
                return self._answer("expired", OUTCOME_EXPIRED, str(last["phone_masked"]), str(last["_id"]))
            if last["status"] == MAX_ATTEMPTS_REACHED:
                return self._answer("too_many_attempts", TOO_MANY_ATTEMPTS, str(last["phone_masked"]), str(last["_id"]))
        return self._answer("no_pending", NO_PENDING, "", "")

    def _answer(
        self,
        outcome_label: str,
        outcome: Outcome.ValueType,
        masked: str,
        confirmation_id: str,
        *,
        attempts_left: int = 0,
    ) -> verification_pb2.SubmitConfirmationCodeResponse:
        metrics.confirmations.labels(outcome_label).inc()
        log.info(
            "confirmation_code_submitted",
            confirmation_id=confirmation_id,
            outcome=outcome_label,
            attempts_left=attempts_left,
        )
        return verification_pb2.SubmitConfirmationCodeResponse(
            outcome=outcome, attempts_left=attempts_left, phone_masked=masked
        )

    async def _still_owner(self, user: int, phone: str) -> bool:
        """The directory still links this number to this Telegram user."""
        try:
            reply = await call(lambda: self.directory.GetSubscriber(directory_pb2.GetSubscriberRequest(phone=phone)))
        except DownstreamError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise err.service_error() from None
        return int(reply.subscriber.telegram_user_id) == user

    async def mark_confirmed(self, record: Document, phone: str) -> bool:
        """After a correct code: directory.MarkConfirmed. False when the number is no longer this
        person's (the follow-up ends there). A transient failure leaves `followup_pending` set, and
        the sweeper marks it later: the code was right, and the confirmation is recorded."""
        record_id = str(record["_id"])
        if record.get("marked_at"):
            return True
        user = int(record["telegram_user_id"])
        try:
            await call(
                lambda: self.directory.MarkConfirmed(
                    directory_pb2.MarkConfirmedRequest(telegram_user_id=user, phone=phone)
                )
            )
        except DownstreamError as err:
            if err.reason in NOT_OWNER_REASONS or err.code == grpc.StatusCode.NOT_FOUND:
                await self._close_followup(record_id, {"followup_failed": err.reason})
                log.info("confirmation_owner_changed", confirmation_id=record_id, reason=err.reason)
                return False
            log.warning("confirmation_mark_failed", confirmation_id=record_id, reason=err.reason)
            return True
        marked = self.clock.now()
        await self.store.confirmations.update_one({"_id": record_id}, {"$set": {"marked_at": marked}})
        record["marked_at"] = marked
        return True

    def _release_later(self, record: Document, phone: str) -> None:
        """Finish the follow-up after the answer, on its own deadline (a fresh context, not the
        request's): its own database limits, and no request id of a request that has ended."""
        task = asyncio.create_task(self._follow_up_quietly(record, phone), context=contextvars.Context())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _follow_up_quietly(self, record: Document, phone: str) -> None:
        try:
            await self.follow_up(record, phone)
        except Exception as exc:  # the sweeper finishes it: followup_pending is still set
            log.warning("confirmation_release_failed", confirmation_id=str(record["_id"]), error=type(exc).__name__)

    async def drain(self) -> None:
        """Wait for the releases under way (tests, shutdown)."""
        while self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)

    async def follow_up(self, record: Document, phone: str) -> int | None:
        """directory.MarkConfirmed (unless done), then delivery.ReleaseHeldMessages.

        Returns the released count; None when the number is no longer this person's. A transient
        failure leaves `followup_pending` set, and the sweeper finishes the work later.
        """
        record_id = str(record["_id"])
        user = int(record["telegram_user_id"])
        if not await self.mark_confirmed(record, phone):
            return None
        if not record.get("marked_at"):
            return 0  # the directory did not answer: the sweeper tries again
        try:
            reply = await call(
                lambda: self.delivery.ReleaseHeldMessages(
                    delivery_pb2.ReleaseHeldMessagesRequest(telegram_user_id=user, phone=phone)
                )
            )
        except DownstreamError as err:
            log.warning("confirmation_release_failed", confirmation_id=record_id, reason=err.reason)
            return 0
        await self._close_followup(record_id, {"released_count": reply.released_count})
        log.info("confirmation_confirmed", confirmation_id=record_id, released_count=reply.released_count)
        return int(reply.released_count)

    async def _close_followup(self, record_id: str, extra: Document) -> None:
        await self.store.confirmations.update_one(
            {"_id": record_id},
            {"$set": {"followup_pending": False, **extra}, "$unset": {"phone": ""}},
        )

    async def retry_followups(self, limit: int = 100) -> int:
        """Finish confirmations whose directory/release step failed inline."""
        cutoff = self.clock.now() - FOLLOWUP_GRACE
        done = 0
        cursor = self.store.confirmations.find({"followup_pending": True, "final_at": {"$lte": cutoff}}).limit(limit)
        async for record in cursor:
            if not record.get("phone"):
                await self._close_followup(str(record["_id"]), {})
                continue
            await self.follow_up(record, self.engine.open_phone(record))
            done += 1
        return done

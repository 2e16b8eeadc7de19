"""The two legs a message can go out on, one try each, and what a try decides (`Outcome`).

Bot leg: the candidate bots in turn (routing.py), through botgateway's SendBotMessage with a short
deadline (bot_send_timeout, so a bot's full rate bucket reschedules instead of blocking). A bot
that can never carry it (not connected, blocked, gone) passes to the next; one that refuses for
now (its rate, an outage) leaves a retry time; a deactivated account ends the leg. SMS leg: the
provider's send; a permanent refusal fails the message, a temporary one retries. Every retry is
dated by the provider's or gateway's retry-after when they give one, else the backoff, and a retry
that would fall after the ttl expires the message instead.

Exactly once through the bots: every SendBotMessage carries the message id as its request_id, so
botgateway gives every send of the message through one bot the same Telegram random_id, and
Telegram makes one message of them (botgateway's sends.py). A send whose outcome is unknown (the
call timed out or broke after it went out, botgateway said SEND_OUTCOME_UNKNOWN, or failed
unexpectedly) may have reached the person, so the message is pinned to that bot and person
(`bot_pinned`): every later try repeats the same send there, never another bot or SMS, until
Telegram settles it: the repeat is answered with the message (SENT), or Telegram refuses it, which
proves it made none (`refused_by=telegram`), and routing goes on as for any refusal. A refusal the
gateway gives without asking Telegram (the person stopped the bot, the bot was removed) cannot
tell whether the first send arrived, so the message fails with its reason and is not sent again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2

from services.core.clock import Clock
from services.core.errors import RpcFailure, parse_rpc_error
from services.core.logging import get_logger
from services.delivery.message_crypto import MessageCrypto
from services.delivery.record import DELIVERED, EXPIRED, FAILED, SENT, SMS, TELEGRAM, MessageChanges, MessageRecord
from services.delivery.settings import EngineSettings
from services.delivery.sms import SmsError, SmsProvider, count_outcome

log = get_logger(__name__)
R = common_pb2  # failure reasons
# The call ended without botgateway's answer about the send (or with a bug's): it may have gone out.
_UNKNOWN_OUTCOME = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
    }
)


@dataclass
class Outcome:
    """What one dispatch attempt decided; written under the claim."""

    changes: MessageChanges = field(default_factory=MessageChanges)
    start_confirmation: bool = False


@dataclass(frozen=True)
class BotTries:
    """The candidate bots tried in turn: the SENT write if one took the message, else why none did."""

    attempts: int  # the message's attempts, these included
    sent: MessageChanges | None = None
    retry_after: float | None = None  # the soonest a bot that refused for now allows another try
    reason: int = 0  # the failure reason if no bot will ever take it
    pin: MessageChanges | None = None  # a send's outcome is unknown: the bot and person every retry goes to
    final: bool = False  # fail with `reason`, no fallback: the person may have the message already


def outcome_unknown(failure: RpcFailure) -> bool:
    """Whether a failed SendBotMessage may still have reached the person."""
    if failure.reason == "SEND_OUTCOME_UNKNOWN":
        return True
    if failure.code == grpc.StatusCode.UNAVAILABLE and not failure.reason:
        # The connection, not botgateway, answered: the call may have gone out before it broke, unless
        # it never connected.
        return "failed to connect" not in failure.message.lower()
    return failure.code in _UNKNOWN_OUTCOME


def retry(record: MessageRecord, retry_after: float | None, now: datetime, settings: EngineSettings) -> Outcome:
    """Try again after `retry_after` (else the backoff), unless that falls after the message's ttl."""
    delay = retry_after if retry_after is not None else settings.backoff(record.attempts)
    at = now + timedelta(seconds=max(0.0, delay))
    if at >= record.expire_at:
        return Outcome({"status": EXPIRED, "failure_reason": R.FAILURE_REASON_TTL_EXPIRED, "attempts": record.attempts})
    return Outcome({"next_attempt_at": at, "attempts": record.attempts})


class Legs:
    def __init__(
        self,
        botgateway: botgateway_pb2_grpc.BotGatewayServiceAsyncStub,
        sms: SmsProvider,
        crypto: MessageCrypto,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.botgateway = botgateway
        self.sms = sms
        self.crypto = crypto
        self.clock = clock
        self.settings = settings

    async def try_bots(
        self, record: MessageRecord, resolution: directory_pb2.ResolvePhoneResponse, candidates: list[str]
    ) -> BotTries:
        text = self.crypto.open_text(record)
        user_id = int(resolution.telegram_user_id)
        attempts = record.attempts
        retry_after: float | None = None
        reason = 0
        for bot_id in candidates:
            attempts += 1
            failure = await self._send_bot(record, bot_id, user_id, text)
            if failure is None:
                return BotTries(attempts, sent=self._sent(bot_id, user_id, attempts))
            if outcome_unknown(failure):
                return self._pinned(bot_id, user_id, attempts, failure)
            if failure.code == grpc.StatusCode.FAILED_PRECONDITION:
                if failure.reason == "USER_DEACTIVATED":
                    return BotTries(attempts, retry_after=None, reason=R.FAILURE_REASON_USER_DEACTIVATED)
                if failure.reason == "BLOCKED_BY_USER":
                    reason = R.FAILURE_REASON_BLOCKED_BY_USER
                elif not reason:
                    reason = R.FAILURE_REASON_NOT_CONNECTED
                continue
            if failure.code == grpc.StatusCode.NOT_FOUND:
                reason = reason or R.FAILURE_REASON_BOT_UNAVAILABLE
                continue
            # RESOURCE_EXHAUSTED (the bot's rate), UNAVAILABLE before the send (no live session, an
            # outage): try another bot, else retry when the soonest of them allows.
            wait = failure.retry_after if failure.retry_after is not None else self.settings.backoff(attempts)
            retry_after = wait if retry_after is None else min(retry_after, wait)
        return BotTries(attempts, retry_after=retry_after, reason=reason)

    async def try_pinned(self, record: MessageRecord) -> BotTries | None:
        """Repeat the send whose outcome is unknown, through the same bot to the same person. None:
        Telegram refused it, so no message exists and the message is routed again as usual."""
        attempts = record.attempts + 1
        bot_id, user_id = record.bot_id, record.telegram_user_id
        failure = await self._send_bot(record, bot_id, user_id, self.crypto.open_text(record))
        if failure is None:
            return BotTries(attempts, sent=self._sent(bot_id, user_id, attempts))
        if failure.metadata.get("refused_by") == "telegram":
            return None
        if failure.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            # Refused before Telegram was asked: the first send may have arrived, so nothing more is sent.
            log.warning("pinned_bot_refused", message_id=record.id, bot=bot_id, reason=failure.reason)
            reason = {
                "USER_DEACTIVATED": R.FAILURE_REASON_USER_DEACTIVATED,
                "BLOCKED_BY_USER": R.FAILURE_REASON_BLOCKED_BY_USER,
            }.get(failure.reason)
            if reason is None:
                found = failure.code == grpc.StatusCode.NOT_FOUND
                reason = R.FAILURE_REASON_BOT_UNAVAILABLE if found else R.FAILURE_REASON_NOT_CONNECTED
            return BotTries(attempts, reason=reason, final=True)
        return self._pinned(bot_id, user_id, attempts, failure)

    async def _send_bot(self, record: MessageRecord, bot_id: str, user_id: int, text: str) -> RpcFailure | None:
        """One SendBotMessage of this message; its failure, None when it went out."""
        request = botgateway_pb2.SendBotMessageRequest(
            bot_id=bot_id,
            telegram_user_id=user_id,
            text=text,
            protect_content=record.protect_content,
            request_id=record.id,
        )
        if record.delete_after:
            request.delete_after.seconds = record.delete_after
        try:
            await self.botgateway.SendBotMessage(request, timeout=self.settings.bot_send_timeout)
        except grpc.aio.AioRpcError as error:
            failure = parse_rpc_error(error)
            log.info(
                "bot_send_refused", message_id=record.id, bot=bot_id, status=failure.code.name, reason=failure.reason
            )
            return failure
        return None

    def _sent(self, bot_id: str, user_id: int, attempts: int) -> MessageChanges:
        return {
            "status": SENT,
            "channel": TELEGRAM,
            "bot_id": bot_id,
            "attempts": attempts,
            "sent_at": self.clock.now(),
            "telegram_user_id": user_id,
            "failure_reason": 0,
            "bot_pinned": False,
        }

    def _pinned(self, bot_id: str, user_id: int, attempts: int, failure: RpcFailure) -> BotTries:
        wait = failure.retry_after if failure.retry_after is not None else self.settings.backoff(attempts)
        pin: MessageChanges = {"channel": TELEGRAM, "bot_id": bot_id, "telegram_user_id": user_id, "bot_pinned": True}
        return BotTries(attempts, retry_after=wait, pin=pin)

    async def send_sms(self, record: MessageRecord, e164: str) -> Outcome:
        text = self.crypto.open_text(record)
        attempts = record.attempts + 1
        provider = self.sms.name
        try:
            sent = await self.sms.send(record.id, e164, text, self.settings.sms_sender)
        except SmsError as exc:
            count_outcome(provider, exc.code.lower())
            log.warning("sms_failed", message_id=record.id, provider=provider, error=exc.code, permanent=exc.permanent)
            base: MessageChanges = {
                "channel": SMS,
                "sms_admitted": True,
                "sms_provider": provider,
                "sms_error": exc.code,
            }
            if exc.permanent:
                return Outcome(
                    {**base, "status": FAILED, "failure_reason": R.FAILURE_REASON_SMS_FAILED, "attempts": attempts}
                )
            out = retry(record.updated({"attempts": attempts}), exc.retry_after, self.clock.now(), self.settings)
            out.changes.update(base)
            return out
        count_outcome(provider, "accepted")
        now = self.clock.now()
        changes: MessageChanges = {
            "channel": SMS,
            "sms_admitted": True,
            "status": DELIVERED if sent.delivered else SENT,
            "failure_reason": 0,
            "attempts": attempts,
            "sent_at": now,
            "sms_provider": provider,
            "provider_id": sent.provider_id,
            "sms_parts": sent.parts,
            "cost_micros": round(sent.parts * self.settings.sms_part_cost * 1_000_000),
            "bot_id": "",
        }
        if sent.delivered:
            changes["delivered_at"] = now
        else:
            changes["sms_poll_at"] = now + timedelta(seconds=self.settings.sms_poll_interval)
            changes["sms_poll_until"] = now + timedelta(seconds=self.settings.sms_poll_for)
            changes["purge_at"] = now + timedelta(seconds=max(self.settings.text_retention, self.settings.sms_poll_for))
        return Outcome(changes)

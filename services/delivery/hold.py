"""The confirmation hold: a message waits while its number is re-confirmed.

Telegram never tells a bot that a number changed hands, so a client may ask (confirm_days, or its
policy's default) that the number be confirmed within that many days. A message whose person last
confirmed earlier, or never, is HELD on the bot it would go through, and verification's
StartPhoneConfirmation sends an SMS code that the person types back to that bot. Verification then
calls ReleaseHeldMessages (release.py), which sends what was held; a held message that reaches its
ttl expires with CONFIRMATION_TIMEOUT. A confirmation that can never be sent (policy, fraud guard,
bad number) fails the message; one that cannot be started now (verification unavailable) is
started again by the dispatcher (store.held_needing_confirmation).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc

from services.core.clock import Clock
from services.core.errors import parse_rpc_error
from services.core.logging import get_logger
from services.delivery.message_crypto import MessageCrypto
from services.delivery.record import FAILED, MessageChanges, MessageRecord
from services.delivery.routing import confirmed_at
from services.delivery.settings import EngineSettings
from services.delivery.store import Store

log = get_logger(__name__)

RU_LOCALE_REGIONS = frozenset({"RU", "BY", "KZ", "KG", "UA", "UZ", "TJ", "AM", "AZ", "MD"})
# Verification's answers that mean the confirmation SMS can never go out for this number.
_CONFIRMATION_REFUSED = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)


def confirmation_due(resolution: directory_pb2.ResolvePhoneResponse, days: int, now: datetime) -> bool:
    """Whether a number must be confirmed again before a message asking for `days` (> 0) goes out."""
    confirmed = confirmed_at(resolution)
    return confirmed is None or now - confirmed > timedelta(days=days)


def must_hold(record: MessageRecord, resolution: directory_pb2.ResolvePhoneResponse, now: datetime) -> bool:
    """A message is held unless it asks for no confirmation (confirm_days 0, always so for purpose
    CONFIRMATION), was released already, or its number was confirmed recently enough."""
    days = record.confirm_days
    return days > 0 and not record.released_at and confirmation_due(resolution, days, now)


class ConfirmationHold:
    def __init__(
        self,
        store: Store,
        verification: verification_pb2_grpc.VerificationServiceAsyncStub,
        crypto: MessageCrypto,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.verification = verification
        self.crypto = crypto
        self.clock = clock
        self.settings = settings

    async def start(self, record: MessageRecord) -> MessageRecord:
        """Ask verification to confirm the held message's number; written under the caller's claim."""
        request = verification_pb2.StartPhoneConfirmationRequest(
            phone=self.crypto.open_phone(record),
            telegram_user_id=record.telegram_user_id,
            bot_id=record.bot_id,
            client_id=record.client_id,
            locale="ru" if record.region in RU_LOCALE_REGIONS else "en",
        )
        changes: MessageChanges
        try:
            await self.verification.StartPhoneConfirmation(request)
            changes = {"confirmation_started": True}
            log.info("message_held", message_id=record.id, bot=record.bot_id)
        except grpc.aio.AioRpcError as error:
            failure = parse_rpc_error(error)
            log.warning(
                "confirmation_start_failed", message_id=record.id, status=failure.code.name, reason=failure.reason
            )
            now = self.clock.now()
            if failure.code in _CONFIRMATION_REFUSED:
                # The confirmation SMS cannot go out (policy, fraud guard, bad number): never deliverable.
                reason = (
                    common_pb2.FAILURE_REASON_SMS_NOT_ALLOWED
                    if failure.code == grpc.StatusCode.PERMISSION_DENIED
                    else common_pb2.FAILURE_REASON_CONFIRMATION_FAILED
                )
                changes = {
                    "status": FAILED,
                    "failure_reason": reason,
                    "confirmation_started": False,
                    "updated_at": now,
                    "purge_at": now + timedelta(seconds=self.settings.text_retention),
                }
            else:
                delay = failure.retry_after if failure.retry_after else self.settings.backoff(record.attempts)
                changes = {"confirmation_started": False, "next_attempt_at": now + timedelta(seconds=delay)}
        await self.store.write(record.id, changes)
        return record.updated(changes)

"""What a client does with a message it sent: read it, cancel it, report that its code was used.

A client sees only its own messages: another client's id and an unknown id are the same
NOT_FOUND. Cancel takes the message's claim, so it never races a send: while a dispatcher holds
it the answer is ABORTED MESSAGE_BUSY (read it again), and a message no longer QUEUED or HELD
(expiry counts as of now) is FAILED_PRECONDITION MESSAGE_NOT_CANCELABLE. A Telegram Gateway code
SENT but not yet reported delivered can still be canceled: the Gateway is asked to revoke it
(revokeVerificationMessage; Telegram leaves a code the person already has).
"""

from __future__ import annotations

from datetime import timedelta

from otpgate.common.v1 import common_pb2

from services.core.clock import Clock
from services.core.errors import ServiceError, aborted, failed_precondition, not_found, unavailable
from services.delivery.dispatch import Dispatcher
from services.delivery.fraud import FraudGuard
from services.delivery.gateway_leg import GatewayLeg
from services.delivery.notify import StatusNotifier
from services.delivery.record import (
    CANCELED,
    EPOCH,
    GATEWAY,
    OPEN_STATUSES,
    SENT,
    STATUS_NAMES,
    MessageChanges,
    MessageRecord,
)
from services.delivery.settings import EngineSettings
from services.delivery.store import Store
from services.delivery.tg_gateway import GatewayFailure


class ClientMessages:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        gateway: GatewayLeg,
        fraud: FraudGuard,
        notifier: StatusNotifier,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.gateway = gateway
        self.fraud = fraud
        self.notifier = notifier
        self.clock = clock
        self.settings = settings

    async def _own(self, client_id: str, message_id: str) -> MessageRecord:
        record = await self.store.get_for_client(client_id, message_id) if client_id and message_id else None
        if record is None:
            raise not_found("message", "MESSAGE_NOT_FOUND")
        return record

    async def get(self, client_id: str, message_id: str) -> common_pb2.Message:
        return (await self._own(client_id, message_id)).to_proto(self.clock.now())

    async def cancel(self, client_id: str, message_id: str) -> common_pb2.Message:
        record = await self._own(client_id, message_id)
        status, _ = record.status_at(self.clock.now())
        if status not in OPEN_STATUSES and not _revocable(record, status):
            raise _not_cancelable(status)
        claim = await self.dispatcher.claim(record)
        if claim is None:
            raise aborted("the message is being sent right now; read it again", reason="MESSAGE_BUSY")
        fresh = await self.store.get(message_id)
        assert fresh is not None
        status, _ = fresh.status_at(self.clock.now())
        if _revocable(fresh, status):
            await self.gateway.revoke(fresh)
        elif status not in OPEN_STATUSES:
            await self.dispatcher.run_claimed(fresh, claim)  # writes EXPIRED if it ran out
            raise _not_cancelable(status)
        now = self.clock.now()
        changes: MessageChanges = {
            "status": CANCELED,
            "lease_until": EPOCH,
            "claim_seq": claim.seq,
            "updated_at": now,
            "purge_at": now + timedelta(seconds=self.settings.text_retention),
        }
        await self.store.write(message_id, changes)
        await self.dispatcher.claims.release(claim)
        canceled = fresh.updated(changes)
        await self.notifier.changed(canceled)
        return canceled.to_proto(now)

    async def check_gateway_code(self, client_id: str, message_id: str, code: str) -> str:
        """The Gateway's verdict on a code it generated for this message (see gateway_leg.py)."""
        record = await self._own(client_id, message_id)
        if record.channel != GATEWAY or not record.gateway_code_length or not record.provider_id:
            raise failed_precondition("NOT_A_GATEWAY_CODE", "this message did not carry a code the Gateway made")
        try:
            return await self.gateway.check_code(record, code)
        except GatewayFailure as failure:
            if failure.definite:
                raise failed_precondition("GATEWAY_REFUSED", f"the Telegram Gateway answered {failure.error}") from None
            raise unavailable("GATEWAY_UNAVAILABLE", "the Telegram Gateway did not answer; retry", 1.0) from None

    async def record_conversion(self, client_id: str, message_id: str) -> None:
        """The code this message carried was entered: feeds the fraud guard's conversion rates."""
        await self._own(client_id, message_id)
        await self.fraud.record_conversion(message_id)


def _revocable(record: MessageRecord, status: int) -> bool:
    return status == SENT and record.channel == GATEWAY


def _not_cancelable(status: int) -> ServiceError:
    return failed_precondition(
        "MESSAGE_NOT_CANCELABLE", f"the message is {STATUS_NAMES[status]} and can no longer be canceled"
    )

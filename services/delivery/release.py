"""ReleaseHeldMessages: a person confirmed their number, so what was held for it goes out;
FailHeldMessages: they did not (every try was a wrong code), so it fails with CONFIRMATION_FAILED.

Called by verification when the person typed the confirmation code to the bot (see hold.py).
Only the messages held for that number and that Telegram user are released; each is taken under
its claim, marked released (`released_at`: it is never held again) and dispatched at once.
A held message that ran out meanwhile is written EXPIRED instead. One whose claim another caller
holds (the hold loop starting its confirmation again, a concurrent release) cannot be taken now:
the others are released and the call answers ABORTED with RetryInfo, so verification keeps the
confirmation's follow-up pending and calls again until none is left held. The confirmation also counts as
a conversion of the SMS that carried the code (fraud.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

from otpgate.common.v1 import common_pb2

from services.core.clock import Clock
from services.core.errors import aborted, invalid_argument
from services.core.logging import get_logger
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.delivery.claims import Claim
from services.delivery.dispatch import Dispatcher
from services.delivery.fraud import FraudGuard
from services.delivery.message_crypto import MessageCrypto
from services.delivery.record import EPOCH, FAILED, HELD, QUEUED, MessageChanges, MessageRecord
from services.delivery.store import Store

log = get_logger(__name__)


class HeldRelease:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        fraud: FraudGuard,
        crypto: MessageCrypto,
        clock: Clock,
        text_retention: float = 86400.0,
    ) -> None:
        self.text_retention = text_retention
        self.store = store
        self.dispatcher = dispatcher
        self.fraud = fraud
        self.crypto = crypto
        self.clock = clock

    @staticmethod
    def _phone(phone_raw: str) -> Phone:
        try:
            return parse_phone(phone_raw)
        except InvalidPhoneError as exc:
            raise invalid_argument([("phone", str(exc))]) from None

    async def _held(
        self, telegram_user_id: int, phone: Phone, busy: list[str]
    ) -> AsyncIterator[tuple[MessageRecord, Claim]]:
        """Each message still held for this number and Telegram user, fresh and under its claim (the
        caller writes it and releases the claim); one that ran out meanwhile is written EXPIRED; the
        ids of those another caller holds are added to `busy`."""
        for record in await self.store.held_for_phone(self.crypto.phone_indexes(phone.e164)):
            if record.telegram_user_id != telegram_user_id:
                continue
            claim = await self.dispatcher.claim(record)
            if claim is None:
                busy.append(record.id)
                continue
            fresh = await self.store.get(record.id)
            if fresh is None or fresh.status != HELD or fresh.expire_at <= self.clock.now():
                if fresh is not None:
                    await self.dispatcher.run_claimed(fresh, claim)  # writes EXPIRED if it ran out
                else:
                    await self.dispatcher.claims.release(claim)
                continue
            yield fresh, claim

    async def release(self, telegram_user_id: int, phone_raw: str) -> int:
        """How many held messages were released (and dispatched)."""
        phone = self._phone(phone_raw)
        await self.fraud.record_confirmed_phone(self.crypto.phone_index(phone.e164))
        released = 0
        busy: list[str] = []
        async for fresh, claim in self._held(telegram_user_id, phone, busy):
            now = self.clock.now()
            changes: MessageChanges = {"status": QUEUED, "released_at": now, "next_attempt_at": now}
            await self.store.write(fresh.id, changes)
            released += 1
            await self.dispatcher.run_claimed(fresh.updated(changes), claim)
        log.info("held_messages_released", released=released, busy=len(busy))
        if busy:
            raise aborted(
                f"{len(busy)} held message(s) of this number are being worked on; call again",
                "HELD_MESSAGES_BUSY",
                retry_after=1.0,
            )
        return released

    async def fail(self, telegram_user_id: int, phone_raw: str) -> int:
        """How many held messages failed: the confirmation they waited for ended with wrong codes."""
        failed = 0
        busy: list[str] = []
        async for fresh, claim in self._held(telegram_user_id, self._phone(phone_raw), busy):
            now = self.clock.now()
            changes: MessageChanges = {
                "status": FAILED,
                "failure_reason": common_pb2.FAILURE_REASON_CONFIRMATION_FAILED,
                "lease_until": EPOCH,
                "claim_seq": claim.seq,
                "updated_at": now,
                "purge_at": now + timedelta(seconds=self.text_retention),
            }
            await self.store.write(fresh.id, changes)
            await self.dispatcher.claims.release(claim)
            await self.dispatcher.notifier.changed(fresh.updated(changes))
            failed += 1
        # One another caller held is left to its ttl (CONFIRMATION_TIMEOUT): late, but not lost.
        log.info("held_messages_failed", failed=failed, busy=len(busy))
        return failed

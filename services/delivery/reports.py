"""SMS delivery reports: a SENT SMS becomes DELIVERED or FAILED when its provider says so.

The dispatcher asks the provider for the status of each SENT SMS whose `sms_poll_at` has come,
every sms_poll_interval, for at most sms_poll_for after the send; after that it stays SENT. A
provider that pushes its reports goes through `apply` instead, with the same effect. Each message
is changed under its claim, and the change is announced like any other (notify.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from otpgate.common.v1 import common_pb2

from services.core.clock import Clock
from services.delivery.dispatch import Dispatcher
from services.delivery.message_crypto import MessageCrypto
from services.delivery.notify import StatusNotifier
from services.delivery.record import DELIVERED, EPOCH, FAILED, GATEWAY, MessageChanges, MessageRecord
from services.delivery.settings import EngineSettings
from services.delivery.sms import DELIVERED as SMS_DELIVERED
from services.delivery.sms import FAILED as SMS_FAILED
from services.delivery.sms import PENDING, SmsError, SmsProvider
from services.delivery.store import Store


class SmsReports:
    def __init__(
        self,
        store: Store,
        sms: SmsProvider,
        dispatcher: Dispatcher,
        notifier: StatusNotifier,
        crypto: MessageCrypto,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.sms = sms
        self.dispatcher = dispatcher
        self.notifier = notifier
        self.crypto = crypto
        self.clock = clock
        self.settings = settings
        # Telegram Gateway messages polled for their status (gateway_reports.py), when set.
        self.gateway_poll: Callable[[MessageRecord], Awaitable[None]] | None = None

    async def poll_once(self) -> int:
        """Ask the SMS provider for delivery reports of SENT SMS. Returns how many were asked."""
        count = 0
        now = self.clock.now()
        for record in await self.store.sms_to_poll(now, self.settings.batch):
            if record.channel == GATEWAY and self.gateway_poll is not None:
                await self.gateway_poll(record)
                count += 1
                continue
            claim = await self.dispatcher.claim(record)
            if claim is None:
                continue
            changes: MessageChanges = {"lease_until": EPOCH, "claim_seq": claim.seq}
            try:
                state, code = await self.sms.status(record.provider_id or "", self.crypto.open_phone(record))
            except (SmsError, Exception):
                state, code = PENDING, "error"
            now = self.clock.now()
            if state == SMS_DELIVERED:
                changes.update(
                    {
                        "status": DELIVERED,
                        "delivered_at": now,
                        "sms_poll_at": None,
                        "updated_at": now,
                        "sms_status": code,
                    }
                )
            elif state == SMS_FAILED:
                changes.update(
                    {
                        "status": FAILED,
                        "failure_reason": common_pb2.FAILURE_REASON_SMS_FAILED,
                        "sms_poll_at": None,
                        "updated_at": now,
                        "sms_status": code,
                    }
                )
            elif record.sms_poll_until and now >= record.sms_poll_until:
                changes["sms_poll_at"] = None
            else:
                changes["sms_poll_at"] = now + timedelta(seconds=self.settings.sms_poll_interval)
            await self.store.write(record.id, changes)
            await self.dispatcher.claims.release(claim)
            if "status" in changes:
                await self.notifier.changed(record.updated(changes))
            count += 1
        return count

    async def apply(self, provider_id: str, delivered: bool, code: str) -> bool:
        """A delivery report pushed by a provider (same effect as a polled status). False: no SENT
        message has that provider id, or it is claimed right now."""
        record = await self.store.sent_by_provider_id(provider_id)
        if record is None:
            return False
        claim = await self.dispatcher.claim(record)
        if claim is None:
            return False
        now = self.clock.now()
        changes: MessageChanges = {
            "lease_until": EPOCH,
            "claim_seq": claim.seq,
            "updated_at": now,
            "sms_poll_at": None,
            "sms_status": code,
        }
        if delivered:
            changes.update({"status": DELIVERED, "delivered_at": now})
        else:
            changes.update({"status": FAILED, "failure_reason": common_pb2.FAILURE_REASON_SMS_FAILED})
        await self.store.write(record.id, changes)
        await self.dispatcher.claims.release(claim)
        await self.notifier.changed(record.updated(changes))
        return True

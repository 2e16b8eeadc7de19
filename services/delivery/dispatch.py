"""Dispatch: one attempt at a claimed message, and the claiming of due messages.

Every change to a message happens under its claim (claims.py); `run_claimed` is the one place an
attempt's outcome is written, the claim released and the status change announced (notify.py).
An attempt: an open message past its ttl expires; a HELD one only (re)starts its confirmation;
channel SMS goes to the SMS leg; otherwise the directory names the person's bots (routing.py),
a number due for re-confirmation is held (hold.py), and the bot leg tries the candidates (legs.py).
When no bot can carry it, channel AUTO with sms_fallback takes the SMS leg (admitted now if it was
not at acceptance, sms_admission.py); otherwise the message fails with the reason the bots gave.

With several replicas, each dispatcher claims due messages (QUEUED with next_attempt_at passed,
or HELD with a confirmation to start again) whose lease has lapsed; a claim is exclusive, so two
replicas never try one message at once, and a replica that dies leaves its leases to lapse.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2

from services.core.clock import Clock
from services.core.errors import ServiceError
from services.core.logging import get_logger
from services.core.phone import parse_phone
from services.delivery import metrics
from services.delivery.claims import Claim, Claims
from services.delivery.fraud import FraudGuard, SmsLeg
from services.delivery.hold import ConfirmationHold, must_hold
from services.delivery.legs import Legs, Outcome, retry
from services.delivery.message_crypto import MessageCrypto
from services.delivery.notify import StatusNotifier
from services.delivery.policy import PolicyStore
from services.delivery.record import (
    AUTO,
    EPOCH,
    EXPIRED,
    FAILED,
    FINAL_STATUSES,
    HELD,
    OPEN_STATUSES,
    SENT,
    SMS,
    TELEGRAM,
    MessageChanges,
    MessageRecord,
)
from services.delivery.routing import Router
from services.delivery.settings import EngineSettings
from services.delivery.sms_admission import SmsAdmission
from services.delivery.store import Store

log = get_logger(__name__)
R = common_pb2  # failure reasons


class Dispatcher:
    def __init__(
        self,
        store: Store,
        claims: Claims,
        router: Router,
        legs: Legs,
        hold: ConfirmationHold,
        sms_admission: SmsAdmission,
        policies: PolicyStore,
        fraud: FraudGuard,
        notifier: StatusNotifier,
        crypto: MessageCrypto,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.claims = claims
        self.router = router
        self.legs = legs
        self.hold = hold
        self.sms_admission = sms_admission
        self.policies = policies
        self.fraud = fraud
        self.notifier = notifier
        self.crypto = crypto
        self.clock = clock
        self.settings = settings

    async def claim(self, record: MessageRecord) -> Claim | None:
        """The message's claim, unless another caller holds it (None)."""
        return await self.claims.acquire("message", record.id, record.claim_seq, lease_until=record.lease_until)

    async def claim_due(self, limit: int | None = None) -> list[tuple[MessageRecord, Claim]]:
        """Claim due messages (QUEUED and due, or HELD whose confirmation must be started again)."""
        now = self.clock.now()
        batch = limit or self.settings.batch
        due = [*await self.store.due(now, batch), *await self.store.held_needing_confirmation(now, batch)]
        claimed: list[tuple[MessageRecord, Claim]] = []
        for record in due:
            claim = await self.claim(record)
            if claim is None:
                continue
            fresh = await self.store.get(record.id)
            if fresh is None or fresh.status not in OPEN_STATUSES:
                await self.claims.release(claim)
                continue
            await self.store.write(record.id, {"lease_until": claim.lease_until, "claim_seq": claim.seq})
            metrics.dispatch_lag_seconds.observe(max(0.0, (now - fresh.next_attempt_at).total_seconds()))
            claimed.append((fresh, claim))
        return claimed

    async def run_claimed(
        self, record: MessageRecord, claim: Claim, resolution: directory_pb2.ResolvePhoneResponse | None = None
    ) -> MessageRecord:
        """One attempt under a held claim; writes the outcome and releases the claim."""
        started = record.status
        try:
            outcome = await self._attempt(record, resolution)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatch_attempt_failed", message_id=record.id)
            delay = self.settings.backoff(record.attempts)
            outcome = Outcome({"next_attempt_at": self.clock.now() + timedelta(seconds=delay)})
        now = self.clock.now()
        changes: MessageChanges = {**outcome.changes, "lease_until": EPOCH, "claim_seq": claim.seq, "updated_at": now}
        status = changes.get("status", record.status)
        if status in FINAL_STATUSES or status == SENT:
            changes.setdefault("purge_at", now + timedelta(seconds=self.settings.text_retention))
        await self.store.write(record.id, changes)
        record = record.updated(changes)
        if outcome.start_confirmation:
            record = await self.hold.start(record)
            status = record.status
        await self.claims.release(claim)
        if status != started:
            await self.notifier.changed(record)
        return record

    async def _attempt(self, record: MessageRecord, resolution: directory_pb2.ResolvePhoneResponse | None) -> Outcome:
        now = self.clock.now()
        status, reason = record.status_at(now)
        if status == EXPIRED:
            return Outcome({"status": EXPIRED, "failure_reason": reason})
        if status not in OPEN_STATUSES:
            return Outcome()
        if status == HELD:
            # Still waiting for the person: only (re)start the confirmation if that failed before.
            return Outcome(start_confirmation=not record.confirmation_started)
        e164 = self.crypto.open_phone(record)
        if record.requested_channel == SMS:
            return await self.legs.send_sms(record, e164)
        if resolution is None:
            try:
                resolution = await self.router.resolve(e164, record.requested_bot)
            except grpc.aio.AioRpcError as error:
                log.warning("resolve_failed", message_id=record.id, status=error.code().name)
                return retry(record, None, self.clock.now(), self.settings)
        candidates = await self.router.candidates(resolution, record.requested_bot, record.bot_owner, record.client_id)
        if not candidates:
            reason = R.FAILURE_REASON_NOT_CONNECTED
            if resolution.found and set(resolution.blocked_bot_ids) & (
                {record.requested_bot} if record.bot_owner else set(resolution.blocked_bot_ids)
            ):
                reason = R.FAILURE_REASON_BLOCKED_BY_USER
            return await self._fallback_or_fail(record, e164, reason)
        if must_hold(record, resolution, now):
            held: MessageChanges = {
                "status": HELD,
                "bot_id": candidates[0],
                "channel": TELEGRAM,
                "telegram_user_id": int(resolution.telegram_user_id),
                "confirmation_started": False,
            }
            return Outcome(held, start_confirmation=True)
        tries = await self.legs.try_bots(record, resolution, candidates)
        if tries.sent is not None:
            return Outcome(tries.sent)
        tried = record.updated({"attempts": tries.attempts})
        if tries.retry_after is not None:
            return retry(tried, tries.retry_after, self.clock.now(), self.settings)
        out = await self._fallback_or_fail(tried, e164, tries.reason or R.FAILURE_REASON_NOT_CONNECTED)
        out.changes.setdefault("attempts", tries.attempts)
        return out

    async def _fallback_or_fail(self, record: MessageRecord, e164: str, reason: int) -> Outcome:
        if record.requested_channel == AUTO and record.sms_fallback:
            if not record.sms_admitted:
                refusal = await self._admit_late(record, e164)
                if refusal is not None:
                    return refusal
            return await self.legs.send_sms(record, e164)
        return Outcome({"status": FAILED, "failure_reason": reason})

    async def _admit_late(self, record: MessageRecord, e164: str) -> Outcome | None:
        """An SMS leg decided only at dispatch time: the same admission, a refusal fails the message."""
        policy = await self.policies.get(record.client_id)
        leg = SmsLeg(
            phone=parse_phone(e164),
            client_id=record.client_id,
            purpose=record.purpose,
            captcha_verified=record.captcha_verified,
            captcha_possible=False,
            fraud_mode=policy.fraud_mode,
            requester_keys=record.origin_keys or {},
        )
        origin = common_pb2.Origin(captcha_verified=leg.captcha_verified)
        try:
            admitted = await self.sms_admission.admit(leg, policy, origin, record.billed, record.purpose)
        except ServiceError as refusal:
            log.info("sms_leg_refused", message_id=record.id, reason=refusal.reason)
            return Outcome({"status": FAILED, "failure_reason": R.FAILURE_REASON_SMS_NOT_ALLOWED, "channel": SMS})
        await self.fraud.record_sms(record.id, leg, record.phone_index, admitted)
        return None

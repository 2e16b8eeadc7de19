"""Dispatch: one attempt at a claimed message, and the claiming of due messages.

Every change to a message happens under its claim (claims.py); `run_claimed` is the one place an
attempt's outcome is written, the claim released and the status change announced (notify.py).
An attempt: an open message past its ttl expires; a HELD one only (re)starts its confirmation;
otherwise it climbs its ladder (ladder.py) from the rung it is on; a SENT Gateway code whose
rung's fallback_after passed undelivered is revoked, and climbs only once the Gateway says it is
revoked (`_fall_back`). The bot rung: the directory names the person's bots (routing.py), a
number due for re-confirmation is held (hold.py), and the bot leg tries the candidates (legs.py). The Gateway rung (gateway_leg.py) and the SMS rung are
paid: admitted now if they were not at acceptance (sms_admission.py). A rung that failed for good
passes the message to the next; when none is left it fails with the first reason given.

A bot send is made once (legs.py: the message id is its request id, a send whose outcome is
unknown pins the message to that bot). When the outcome of a send cannot be written (the database
went away between the send and the write), this process keeps it and the message's next attempt
here writes it instead of trying again; on another replica, the repeat through the same bot is
answered by Telegram with the message already made.

With several replicas, each dispatcher claims due messages (QUEUED with next_attempt_at passed,
or HELD with a confirmation to start again) whose lease has lapsed; a claim is exclusive, so two
replicas never try one message at once, and a replica that dies leaves its leases to lapse.
Replicas polling together read the same oldest candidates: each passes over the ones the other
won for the next ones (`claim_due`), so both work through the pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

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
from services.delivery.gateway_leg import ADMITTED, GatewayLeg
from services.delivery.hold import ConfirmationHold, must_hold
from services.delivery.ladder import rungs
from services.delivery.legs import BotTries, Legs, Outcome, retry
from services.delivery.message_crypto import MessageCrypto
from services.delivery.notify import StatusNotifier
from services.delivery.policy import PolicyStore, Rung
from services.delivery.record import (
    CHANNEL_NAMES,
    DELIVERED,
    EPOCH,
    EXPIRED,
    FAILED,
    FINAL_STATUSES,
    GATEWAY,
    HELD,
    OPEN_STATUSES,
    QUEUED,
    READ,
    REASON_NAMES,
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
from services.delivery.tg_gateway import UNREACHABLE

# Rounds of claim_due: the first, and two to look past candidates other replicas took first.
_CLAIM_ROUNDS = 3

log = get_logger(__name__)
R = common_pb2  # failure reasons
UNWRITTEN_KEPT = 10_000
T = TypeVar("T")


class Dispatcher:
    def __init__(
        self,
        store: Store,
        claims: Claims,
        router: Router,
        legs: Legs,
        gateway: GatewayLeg,
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
        self.gateway = gateway
        self.hold = hold
        self.sms_admission = sms_admission
        self.policies = policies
        self.fraud = fraud
        self.notifier = notifier
        self.crypto = crypto
        self.clock = clock
        self.settings = settings
        # Outcomes of sends whose write failed (the database went away in between), by message id.
        self._unwritten: dict[str, MessageChanges] = {}

    async def claim(self, record: MessageRecord) -> Claim | None:
        """The message's claim, unless another caller holds it (None)."""
        return await self.claims.acquire("message", record.id, record.claim_seq, lease_until=record.lease_until)

    async def claim_due(self, limit: int | None = None) -> list[tuple[MessageRecord, Claim]]:
        """Claim due messages (QUEUED and due, or HELD whose confirmation must be started again).

        Replicas that read the queue at the same moment see the same oldest candidates; the ones
        another replica claimed first are passed over for as many of the next ones, so the replicas
        split the queue instead of one of them idling through its pass."""
        now = self.clock.now()
        want = limit or self.settings.batch
        tried: set[str] = set()
        claimed: list[tuple[MessageRecord, Claim]] = []
        for _ in range(_CLAIM_ROUNDS):
            due = [
                *await self.store.due(now, want, tried),
                *await self.store.held_needing_confirmation(now, want, tried),
                *await self.store.fallback_due(now, want, tried),
            ]
            tried.update(record.id for record in due)
            # Each claim is a few round trips of its own: taken side by side, not one after the other.
            results = await at_most(self.settings.dispatch_concurrency, [self._claim_due(r, now) for r in due])
            won = [pair for pair in results if pair is not None]
            claimed.extend(won)
            want = len(results) - len(won)  # taken by others: look past them, as many again
            if want == 0:
                break
        return claimed

    async def _claim_due(self, record: MessageRecord, now: datetime) -> tuple[MessageRecord, Claim] | None:
        claim = await self.claim(record)
        if claim is None:
            return None
        fresh = await self.store.get(record.id)
        if fresh is None or not (fresh.status in OPEN_STATUSES or _fallback_due(fresh)):
            await self.claims.release(claim)
            return None
        await self.store.write(record.id, {"lease_until": claim.lease_until, "claim_seq": claim.seq})
        due_at = fresh.fallback_at if _fallback_due(fresh) else fresh.next_attempt_at
        metrics.dispatch_lag_seconds.observe(max(0.0, (now - (due_at or now)).total_seconds()))
        return fresh, claim

    async def run_claimed(
        self, record: MessageRecord, claim: Claim, resolution: directory_pb2.ResolvePhoneResponse | None = None
    ) -> MessageRecord:
        """One attempt under a held claim; writes the outcome and releases the claim."""
        started = record.status
        unwritten = self._unwritten.pop(record.id, None)
        try:
            if unwritten is not None and record.status in OPEN_STATUSES:
                outcome = Outcome(unwritten)  # it happened already: only its write is owed
            else:
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
        try:
            await self.store.write(record.id, changes)
        except Exception:
            self._owe(record.id, outcome.changes)
            raise
        record = record.updated(changes)
        if outcome.start_confirmation:
            record = await self.hold.start(record)
            status = record.status
        await self.claims.release(claim)
        if status != started or "revoked_request_id" in changes:  # a fallback may go SENT -> SENT
            await self.notifier.changed(record)
        return record

    def _owe(self, message_id: str, changes: MessageChanges) -> None:
        """An attempt that sent (or may have sent) could not be written: keep it for this message's next
        attempt here, which writes it instead of sending again."""
        if changes.get("status") not in (SENT, DELIVERED) and not changes.get("bot_pinned"):
            return
        log.warning("dispatch_outcome_unwritten", message_id=message_id)
        self._unwritten[message_id] = changes
        while len(self._unwritten) > UNWRITTEN_KEPT:
            self._unwritten.pop(next(iter(self._unwritten)))

    async def _attempt(self, record: MessageRecord, resolution: directory_pb2.ResolvePhoneResponse | None) -> Outcome:
        now = self.clock.now()
        status, reason = record.status_at(now)
        if status == EXPIRED:
            return Outcome({"status": EXPIRED, "failure_reason": reason})
        if _fallback_due(record):
            return await self._fall_back(record)
        if status not in OPEN_STATUSES:
            return Outcome()
        if status == HELD:
            # Still waiting for the person: only (re)start the confirmation if that failed before.
            return Outcome(start_confirmation=not record.confirmation_started)
        e164 = self.crypto.open_phone(record)
        unpinned = False
        if record.bot_pinned:
            pinned = await self.legs.try_pinned(record)
            if pinned is not None:
                return self._bot_outcome(record, pinned) or retry(
                    record.updated({"attempts": pinned.attempts}), pinned.retry_after, self.clock.now(), self.settings
                )
            # Telegram refused the repeat, so it made no message: the ladder goes on as for any message.
            record, resolution, unpinned = record.updated({"bot_pinned": False}), None, True
        policy = await self.policies.get(record.client_id)
        ladder = rungs(record, policy, await self.gateway.available(record.client_id))
        out = await self._climb(record, e164, ladder, resolution)
        if unpinned:
            out.changes.setdefault("bot_pinned", False)
        return out

    async def _climb(
        self,
        record: MessageRecord,
        e164: str,
        ladder: tuple[Rung, ...],
        resolution: directory_pb2.ResolvePhoneResponse | None,
    ) -> Outcome:
        """From the message's rung up (ladder.py): the first rung that sends, holds or must be
        tried again ends the attempt; a rung that failed for good passes it on."""
        progress: MessageChanges = {}
        reason = 0
        for index in range(record.rung, len(ladder)):
            rung = ladder[index]
            if not rung.serves(record.region):
                continue
            progress["rung"] = index
            record = record.updated({"rung": index})
            if rung.daily_cap and record.caps_taken <= index:
                progress["caps_taken"] = index + 1
                record = record.updated({"caps_taken": index + 1})
                if await self.sms_admission.take_rung_cap(record.client_id, rung.channel, rung.daily_cap) is not None:
                    log.info("ladder_cap_reached", message_id=record.id, channel=CHANNEL_NAMES[rung.channel])
                    metrics.ladder_fallbacks_total.labels(CHANNEL_NAMES[rung.channel], "DAILY_CAP").inc()
                    reason = reason or R.FAILURE_REASON_NOT_CONNECTED
                    continue
            if rung.channel == TELEGRAM:
                out, failed = await self._bot_rung(record, e164, resolution)
            elif rung.channel == GATEWAY:
                out, failed = await self._gateway_rung(record, e164)
                if out is not None and out.changes.get("status") == SENT:
                    out.changes["fallback_at"] = self._fallback_at(record, ladder, index)
            else:
                out, failed = await self._sms_rung(record, e164)
            if out is not None:
                out.changes = {**progress, **out.changes}
                return out
            record = record.updated(failed.changes)
            progress.update(failed.changes)
            reason = reason or int(failed.changes.get("failure_reason", 0))
            metrics.ladder_fallbacks_total.labels(CHANNEL_NAMES[rung.channel], REASON_NAMES.get(reason, "")).inc()
        progress.pop("failure_reason", None)
        return Outcome({**progress, "status": FAILED, "failure_reason": reason or R.FAILURE_REASON_NOT_CONNECTED})

    def _fallback_at(self, record: MessageRecord, ladder: tuple[Rung, ...], index: int) -> datetime | None:
        """When a code the Gateway accepted, not yet delivered, is revoked to climb: its rung's
        fallback_after from now, if a rung after it serves the number and the ttl lasts till then."""
        after = ladder[index].fallback_after
        if not after or not any(rung.serves(record.region) for rung in ladder[index + 1 :]):
            return None
        at = self.clock.now() + timedelta(seconds=after)
        return at if at < record.expire_at else None

    async def _fall_back(self, record: MessageRecord) -> Outcome:
        """A Gateway code still undelivered at its fallback time: revoke it, ask where it is, and
        climb only if the Gateway says it did not reach the person (revoked, or expired there).
        Delivered or read first: the revoke lost the race, the message is DELIVERED or READ. Still
        "sent", or no answer: the revoke may not have applied yet, so ask again later."""
        now = self.clock.now()
        if now >= record.expire_at:
            return Outcome({"fallback_at": None})  # its ttl is over: the Gateway's expiry ends it
        checked = await self.gateway.revoke_and_check(record)
        delivery = checked.delivery if checked is not None else ""
        if checked is None or delivery == "sent":
            wait = self.settings.backoff(0) if checked is None else self.gateway.poll_interval
            return Outcome({"fallback_at": now + timedelta(seconds=wait)})
        if delivery in ("delivered", "read"):
            log.info("ladder_fallback_too_late", message_id=record.id, delivery=delivery)
            reached: MessageChanges = {"fallback_at": None, "status": READ if delivery == "read" else DELIVERED}
            at = datetime.fromtimestamp(checked.delivery_time, UTC) if checked.delivery_time else now
            reached["delivered_at"] = record.delivered_at or at
            if delivery == "read":
                reached["read_at"] = now
            return Outcome(reached)
        if delivery not in ("revoked", "expired"):
            return Outcome({"fallback_at": None})  # nothing Telegram documents: leave it to its ttl
        refunded = checked.is_refunded or bool(record.refunded)
        if checked.is_refunded and not record.refunded:
            await self.store.refund_usage(record.id)
        climbing: MessageChanges = {
            "status": QUEUED,
            "rung": record.rung + 1,
            "fallback_at": None,
            "revoked_request_id": record.provider_id,
            "revoked_cost_micros": 0 if refunded else record.cost_micros,
            "refunded": refunded,
            "gateway_state": "revoked",
            "provider_id": None,
            "cost_micros": None,
            "sent_at": None,
            "sms_poll_at": None,
            "sms_poll_until": None,
            "next_attempt_at": now,
        }
        waited = (now - record.sent_at).total_seconds() if record.sent_at else 0.0
        log.info("ladder_fallback_on_timeout", message_id=record.id, delivery=delivery, waited_s=round(waited, 1))
        metrics.ladder_fallbacks_total.labels(CHANNEL_NAMES[GATEWAY], "NOT_DELIVERED").inc()
        record = record.updated(climbing)
        # The ladder as it was when the code went out (the Gateway rung in it), so `rung` points on.
        ladder = rungs(record, await self.policies.get(record.client_id), gateway_usable=True)
        out = await self._climb(record, self.crypto.open_phone(record), ladder, None)
        changes: MessageChanges = {**climbing, **out.changes}
        if changes.get("status") in OPEN_STATUSES:
            changes["purge_at"] = None  # open again: the text stays until it is sent
        return Outcome(changes, start_confirmation=out.start_confirmation)

    async def _bot_rung(
        self, record: MessageRecord, e164: str, resolution: directory_pb2.ResolvePhoneResponse | None
    ) -> tuple[Outcome | None, Outcome]:
        """(the attempt's outcome, or None and why no bot will take it)."""
        if resolution is None:
            try:
                resolution = await self.router.resolve(e164, record.requested_bot)
            except grpc.aio.AioRpcError as error:
                log.warning("resolve_failed", message_id=record.id, status=error.code().name)
                return retry(record, None, self.clock.now(), self.settings), Outcome()
        candidates = await self.router.candidates(resolution, record.requested_bot, record.bot_owner, record.client_id)
        if not candidates:
            reason = R.FAILURE_REASON_NOT_CONNECTED
            if resolution.found and set(resolution.blocked_bot_ids) & (
                {record.requested_bot} if record.bot_owner else set(resolution.blocked_bot_ids)
            ):
                reason = R.FAILURE_REASON_BLOCKED_BY_USER
            return None, Outcome({"failure_reason": reason})
        if must_hold(record, resolution, self.clock.now()):
            held: MessageChanges = {
                "status": HELD,
                "bot_id": candidates[0],
                "channel": TELEGRAM,
                "telegram_user_id": int(resolution.telegram_user_id),
                "confirmation_started": False,
            }
            return Outcome(held, start_confirmation=True), Outcome()
        tries = await self.legs.try_bots(record, resolution, candidates)
        decided = self._bot_outcome(record, tries)
        if decided is not None:
            return decided, Outcome()
        tried = record.updated({"attempts": tries.attempts})
        if tries.retry_after is not None:
            return retry(tried, tries.retry_after, self.clock.now(), self.settings), Outcome()
        return None, Outcome(
            {"attempts": tries.attempts, "failure_reason": tries.reason or R.FAILURE_REASON_NOT_CONNECTED}
        )

    def _bot_outcome(self, record: MessageRecord, tries: BotTries) -> Outcome | None:
        """What the bot leg settled on its own: sent, pinned to a bot whose send is unknown, or failed
        for good with no fallback. None: the bots refused, the caller decides."""
        if tries.sent is not None:
            return Outcome(tries.sent)
        if tries.final:
            return Outcome(
                {"status": FAILED, "failure_reason": tries.reason, "attempts": tries.attempts, "bot_pinned": False}
            )
        if tries.pin is not None:
            out = retry(
                record.updated({"attempts": tries.attempts}), tries.retry_after, self.clock.now(), self.settings
            )
            out.changes.update(tries.pin)
            return out
        return None

    async def _gateway_rung(self, record: MessageRecord, e164: str) -> tuple[Outcome | None, Outcome]:
        if record.gateway_state is None:  # a paid leg: the same admission as SMS, once
            refusal = await self._admit_late(record, e164, GATEWAY)
            if refusal is not None:
                return None, Outcome({"gateway_state": "refused", "failure_reason": R.FAILURE_REASON_SMS_NOT_ALLOWED})
            record = record.updated({"gateway_state": ADMITTED})
        outcome = await self.gateway.send(record, e164)
        if outcome.sent is not None:
            return Outcome({**outcome.written, **outcome.sent}), Outcome()
        if outcome.refused:
            failed: MessageChanges = {
                **outcome.written,
                "gateway_state": "refused",
                "gateway_error": outcome.refused,
                "attempts": record.attempts + 1,
                "failure_reason": R.FAILURE_REASON_NOT_CONNECTED
                if outcome.refused in UNREACHABLE
                else R.FAILURE_REASON_GATEWAY_FAILED,
            }
            return None, Outcome(failed)
        tried = record.updated({"attempts": record.attempts + 1})
        out = retry(tried, outcome.retry_after, self.clock.now(), self.settings)
        out.changes = {**outcome.written, **out.changes}
        return out, Outcome()

    async def _sms_rung(self, record: MessageRecord, e164: str) -> tuple[Outcome | None, Outcome]:
        if not record.sms_admitted:
            refusal = await self._admit_late(record, e164, SMS)
            if refusal is not None:
                return None, Outcome({"channel": SMS, "failure_reason": R.FAILURE_REASON_SMS_NOT_ALLOWED})
        return await self.legs.send_sms(record, e164), Outcome()

    async def _admit_late(self, record: MessageRecord, e164: str, channel: int) -> Outcome | None:
        """A paid leg decided only at dispatch time: the same admission; a refusal ends the rung."""
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
            admitted = await self.sms_admission.admit(leg, policy, origin, record.billed, record.purpose, channel)
        except ServiceError as refusal:
            log.info("paid_leg_refused", message_id=record.id, channel=CHANNEL_NAMES[channel], reason=refusal.reason)
            return Outcome({"failure_reason": R.FAILURE_REASON_SMS_NOT_ALLOWED})
        await self.fraud.record_sms(record.id, leg, record.phone_index, admitted)
        return None


async def at_most(limit: int, calls: Sequence[Awaitable[T]]) -> list[T]:
    """Await `calls` with at most `limit` running at once; their results in order. Every call runs
    to its end even when one fails (each holds a claim it must write and release); the first
    failure is raised after."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def _fallback_due(record: MessageRecord) -> bool:
    return record.status == SENT and record.channel == GATEWAY and record.fallback_at is not None

"""The delivery domain: SendMessage, hold release, reads and cancel, reachability, the dispatcher pass.

SendMessage: validate -> client policy -> idempotent repeat? (answered before any limit
counts it) -> rate limits -> SMS leg admission (sms_admission.py) -> persist (text and phone
sealed) -> dispatch inline (dispatch.py). A message that cannot go out at once stays QUEUED
with next_attempt_at; the dispatcher pass (dispatch_due_once) claims due messages and tries
again until the ttl. Routing, the legs, the hold and status notifications have their modules.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
from otpgate.botgateway.v1 import botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2_grpc

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.errors import (
    ServiceError,
    Violations,
    aborted,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
)
from services.core.ids import new_id
from services.core.logging import get_logger
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.delivery import metrics
from services.delivery.bots import BotCatalog
from services.delivery.claims import Claim, Claims
from services.delivery.dispatch import Dispatcher
from services.delivery.fraud import FraudGuard, SmsLeg
from services.delivery.hold import ConfirmationHold, confirmation_due
from services.delivery.legs import Legs
from services.delivery.limits import Hit, Limiter, RateLimited
from services.delivery.message_crypto import MessageCrypto
from services.delivery.notify import StatusNotifier
from services.delivery.policy import Policy, PolicyStore
from services.delivery.record import (
    AUTO,
    CANCELED,
    CHANNEL_NAMES,
    DELIVERED,
    EPOCH,
    FAILED,
    HELD,
    OPEN_STATUSES,
    P_CONFIRMATION,
    P_MESSAGE,
    P_VERIFICATION,
    QUEUED,
    SMS,
    STATUS_NAMES,
    TELEGRAM,
    MessageChanges,
    MessageRecord,
)
from services.delivery.routing import Router
from services.delivery.settings import EngineSettings
from services.delivery.sms import DELIVERED as SMS_DELIVERED
from services.delivery.sms import FAILED as SMS_FAILED
from services.delivery.sms import PENDING, SandboxSmsProvider, SmsError, SmsProvider
from services.delivery.sms_admission import SmsAdmission, captcha_required
from services.delivery.store import RequestInProgress, Store
from services.delivery.webhooks import UnsafeTarget, WebhookOutbox, check_url

__all__ = ["Engine", "EngineSettings"]

log = get_logger(__name__)

MAX_TEXT = 4096
MAX_DELETE_AFTER = 48 * 3600


class Engine:
    def __init__(
        self,
        store: Store,
        policies: PolicyStore,
        limiter: Limiter,
        fraud: FraudGuard,
        claims: Claims,
        bots: BotCatalog,
        directory: directory_pb2_grpc.DirectoryServiceAsyncStub,
        botgateway: botgateway_pb2_grpc.BotGatewayServiceAsyncStub,
        verification: verification_pb2_grpc.VerificationServiceAsyncStub,
        sms: SmsProvider,
        sandbox: SandboxSmsProvider | None,
        webhooks: WebhookOutbox,
        keyring: Keyring,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.policies = policies
        self.limiter = limiter
        self.fraud = fraud
        self.claims = claims
        self.sms = sms
        self.sandbox = sandbox
        self.webhooks = webhooks
        self.keyring = keyring
        self.clock = clock
        self.settings = settings
        self.crypto = MessageCrypto(keyring)
        self.router = Router(bots, directory)
        self.sms_admission = SmsAdmission(limiter, fraud, self.crypto, settings)
        self.notifier = StatusNotifier(store, webhooks, clock)
        self.dispatcher = Dispatcher(
            store,
            claims,
            self.router,
            Legs(botgateway, sms, self.crypto, clock, settings),
            ConfirmationHold(store, verification, self.crypto, clock, settings),
            self.sms_admission,
            policies,
            fraud,
            self.notifier,
            self.crypto,
            clock,
            settings,
        )

    # SendMessage ----------------------------------------------------------------------------

    async def send_message(self, request: delivery_pb2.SendMessageRequest) -> delivery_pb2.SendMessageResponse:
        phone, ttl = self._validate(request)
        if request.callback_url:
            try:
                await check_url(request.callback_url, dev=self.settings.dev)
            except UnsafeTarget as exc:
                raise invalid_argument([("callback_url", str(exc))]) from None
        client_id = request.client_id
        purpose = request.purpose or P_MESSAGE
        channel = request.channel or AUTO
        policy = await self.policies.get(client_id)
        self._check_policy(request, policy, phone, purpose)
        bot_owner = await self.router.bot_owner(request.bot, client_id) if request.bot else ""
        # Idempotent repeat: answered before any limit counts it again. The key is taken with one
        # insert before anything is counted, and given back if this request stores no message.
        idem = f"{client_id}\x1f{request.request_id}" if request.request_id else ""
        fingerprint = self._fingerprint(request, phone.e164)
        message_id = new_id(int(self.clock.now().timestamp() * 1000))
        if idem:
            try:
                existing = await self.store.reserve_idem(idem, message_id, self.settings.lease)
            except RequestInProgress:
                raise aborted(
                    "a request with this request_id is still being processed; retry shortly",
                    reason="REQUEST_IN_PROGRESS",
                ) from None
            if existing is not None:
                return self._replay(existing, fingerprint)
        try:
            await self._limits(request, policy, phone, purpose, channel)
            sms_fallback = request.sms_fallback if request.HasField("sms_fallback") else policy.sms_fallback
            if purpose == P_CONFIRMATION:
                confirm_days = 0
            elif request.HasField("confirm_days"):
                confirm_days = request.confirm_days
            else:
                confirm_days = policy.default_confirm_days
            resolution: directory_pb2.ResolvePhoneResponse | None = None
            sms_leg = channel == SMS
            if channel == AUTO and sms_fallback:
                # Decide now whether this is an SMS leg, so a refusal is an error, not a stored message.
                try:
                    resolution = await self.router.resolve(phone.e164, request.bot)
                    sms_leg = not await self.router.candidates(resolution, request.bot, bot_owner, client_id)
                except grpc.aio.AioRpcError:
                    resolution = None  # the dispatcher routes it later
            # A re-confirmation prompt is ours, not billed, unless it goes through the client's own bot.
            billed = purpose != P_CONFIRMATION or (bool(bot_owner) and bot_owner == client_id)
            if sms_leg:
                leg = SmsLeg(
                    phone=phone,
                    client_id=client_id,
                    purpose=purpose,
                    captcha_verified=request.origin.captcha_verified,
                    captcha_possible=purpose != P_CONFIRMATION,
                    fraud_mode=policy.fraud_mode,
                )
                await self.sms_admission.admit(leg, policy, request.origin, billed, purpose)
            now = self.clock.now()
            claim = self.claims.implicit("message", message_id)
            record = MessageRecord(
                id=message_id,
                idem=idem or f"\x1f{message_id}",
                fingerprint=fingerprint,
                client_id=client_id,
                request_id=request.request_id,
                purpose=purpose,
                phone_sealed=self.crypto.seal_phone(message_id, phone.e164),
                phone_index=self.crypto.phone_index(phone.e164),
                phone_masked=phone.masked,
                region=phone.region,
                text_sealed=self.crypto.seal_text(message_id, request.text),
                requested_channel=channel,
                channel=SMS if channel == SMS else 0,
                requested_bot=request.bot,
                bot_owner=bot_owner,
                bot_id="",
                status=QUEUED,
                failure_reason=0,
                confirm_days=confirm_days,
                sms_fallback=sms_fallback,
                sms_admitted=sms_leg,
                billed=billed,
                protect_content=request.protect_content,
                delete_after=int(request.delete_after.seconds),
                callback_url=request.callback_url,
                captcha_verified=request.origin.captcha_verified,
                created_at=now,
                updated_at=now,
                expire_at=now + timedelta(seconds=ttl),
                next_attempt_at=now,
                lease_until=claim.lease_until,
                claim_seq=claim.seq,
                attempts=0,
                telegram_user_id=0,
                confirmation_started=False,
                released_at=None,
                sms_poll_at=None,
                purge_at=None,
            )
            existing = await self.store.insert(record)
        except BaseException:
            if idem:
                await asyncio.shield(self.store.release_idem(idem, message_id))
            raise
        if existing is not None:  # stored before its key had a pointer: found by the unique idem index
            await self.claims.release(claim)
            if idem:
                await self.store.release_idem(idem, message_id)
            return self._replay(existing, fingerprint)
        if sms_leg:
            await self.fraud.record_sms(message_id, leg, record.phone_index)
        metrics.messages_total.labels("QUEUED", CHANNEL_NAMES[channel], request.bot or "").inc()
        log.info(
            "message_accepted",
            message_id=message_id,
            client_id=client_id,
            channel=CHANNEL_NAMES[channel],
            purpose=purpose,
        )
        if self.settings.inline_dispatch:
            record = await self.dispatcher.run_claimed(record, claim, resolution)
        else:
            await self.store.write(message_id, {"lease_until": EPOCH, "next_attempt_at": now})
            await self.claims.release(claim)
            record = record.updated({"lease_until": EPOCH})
        return delivery_pb2.SendMessageResponse(message=record.to_proto(self.clock.now()))

    def _validate(self, request: delivery_pb2.SendMessageRequest) -> tuple[Phone, float]:
        """The number and the ttl in seconds; raises INVALID_ARGUMENT with every violation."""
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        phone: Phone | None = None
        try:
            phone = parse_phone(request.phone)
        except InvalidPhoneError as exc:
            problems.add("phone", str(exc))
        problems.check(1 <= len(request.text) <= MAX_TEXT, "text", f"must be 1 to {MAX_TEXT} characters")
        problems.check(request.channel in (0, AUTO, TELEGRAM, SMS), "channel", "unknown channel")
        problems.check(request.purpose in (0, P_MESSAGE, P_CONFIRMATION, P_VERIFICATION), "purpose", "unknown purpose")
        ttl = self.settings.default_ttl
        if request.HasField("ttl"):
            ttl = request.ttl.seconds + request.ttl.nanos / 1e9
            problems.check(
                self.settings.min_ttl <= ttl <= self.settings.max_ttl,
                "ttl",
                f"must be between {self.settings.min_ttl:g} and {self.settings.max_ttl:g} seconds",
            )
        if request.HasField("confirm_days"):
            problems.check(0 <= request.confirm_days <= 3650, "confirm_days", "must be between 0 and 3650")
        if request.HasField("delete_after"):
            seconds = request.delete_after.seconds
            problems.check(0 <= seconds <= MAX_DELETE_AFTER, "delete_after", "must be at most 48 hours")
        problems.check(len(request.request_id) <= 128, "request_id", "must be at most 128 characters")
        problems.check(len(request.bot) <= 64, "bot", "must be at most 64 characters")
        problems.raise_if_any()
        assert phone is not None
        return phone, ttl

    def _check_policy(
        self, request: delivery_pb2.SendMessageRequest, policy: Policy, phone: Phone, purpose: int
    ) -> None:
        if not policy.country_allowed(phone.region):
            raise permission_denied("COUNTRY_NOT_ALLOWED", "numbers of this country are not allowed for this client")
        if request.callback_url and not (policy.webhook_secret_sealed or self.settings.webhook_default_secret):
            raise failed_precondition(
                "WEBHOOK_SECRET_NOT_SET",
                "set a webhook secret in the client policy before using callback_url",
                [("WEBHOOK_SECRET", "policy.webhook_secret", "not set")],
            )
        if (
            policy.captcha_rule == common_pb2.CAPTCHA_RULE_ALWAYS
            and purpose != P_CONFIRMATION
            and not request.origin.captcha_verified
        ):
            raise captcha_required()

    def _fingerprint(self, request: delivery_pb2.SendMessageRequest, e164: str) -> str:
        """What makes two requests under one request_id the same message."""
        return self.crypto.request_fingerprint(
            [
                e164,
                request.text,
                str(request.channel or AUTO),
                request.bot,
                str(request.confirm_days) if request.HasField("confirm_days") else "-",
                str(request.sms_fallback) if request.HasField("sms_fallback") else "-",
                str(request.protect_content),
                str(request.delete_after.seconds),
                request.callback_url,
                str(request.purpose or P_MESSAGE),
                str(request.ttl.seconds) if request.HasField("ttl") else "-",
            ]
        )

    def _replay(self, existing: MessageRecord, fingerprint: str) -> delivery_pb2.SendMessageResponse:
        if existing.fingerprint != fingerprint:
            raise aborted("request_id was already used for a different message", reason="IDEMPOTENCY_CONFLICT")
        return delivery_pb2.SendMessageResponse(message=existing.to_proto(self.clock.now()), replayed=True)

    async def _limits(
        self, request: delivery_pb2.SendMessageRequest, policy: Policy, phone: Phone, purpose: int, channel: int
    ) -> None:
        rate = self.settings.rate
        key = self.crypto.limit_key
        hits = [
            Hit("client", key(request.client_id), rate(policy, "client"), subject="client"),
            Hit("global", "all", self.settings.limits["global"], subject="global"),
        ]
        # The bot prompt of a re-confirmation is ours, not the client's traffic.
        if not (purpose == P_CONFIRMATION and channel != SMS):
            phone_key = key("phone:" + phone.e164)
            hits.append(Hit("phone_short", phone_key, rate(policy, "phone_short"), subject="phone"))
            hits.append(Hit("phone_daily", phone_key, rate(policy, "phone_daily"), subject="phone"))
        if request.origin.session_id:
            session_key = key("session:" + request.origin.session_id)
            hits.append(Hit("session", session_key, rate(policy, "session"), subject="origin.session_id"))
        try:
            await self.limiter.acquire(hits)
        except RateLimited as exc:
            log.info("rate_limited", limit=exc.hit.limit_name, client_id=request.client_id, retry_after=exc.retry_after)
            raise exc.to_error() from None

    # Held messages ----------------------------------------------------------------------------

    async def release_held(self, telegram_user_id: int, phone_raw: str) -> int:
        """How many held messages were released (and dispatched)."""
        try:
            phone = parse_phone(phone_raw)
        except InvalidPhoneError as exc:
            raise invalid_argument([("phone", str(exc))]) from None
        index = self.crypto.phone_index(phone.e164)
        await self.fraud.record_confirmed_phone(index)
        released = 0
        for record in await self.store.held_for_phone(index):
            if record.telegram_user_id != telegram_user_id:
                continue
            claim = await self.dispatcher.claim(record)
            if claim is None:
                continue
            fresh = await self.store.get(record.id)
            if fresh is None or fresh.status != HELD or fresh.expire_at <= self.clock.now():
                if fresh is not None:
                    await self.dispatcher.run_claimed(fresh, claim)  # writes EXPIRED if it ran out
                else:
                    await self.claims.release(claim)
                continue
            now = self.clock.now()
            changes: MessageChanges = {"status": QUEUED, "released_at": now, "next_attempt_at": now}
            await self.store.write(record.id, changes)
            released += 1
            await self.dispatcher.run_claimed(fresh.updated(changes), claim)
        log.info("held_messages_released", released=released)
        return released

    # Reads and cancel -------------------------------------------------------------------------

    async def _own(self, client_id: str, message_id: str) -> MessageRecord:
        record = await self.store.get_for_client(client_id, message_id) if client_id and message_id else None
        if record is None:
            raise not_found("message", "MESSAGE_NOT_FOUND")
        return record

    async def get_message(self, client_id: str, message_id: str) -> common_pb2.Message:
        return (await self._own(client_id, message_id)).to_proto(self.clock.now())

    async def cancel_message(self, client_id: str, message_id: str) -> common_pb2.Message:
        record = await self._own(client_id, message_id)
        status, _ = record.status_at(self.clock.now())
        if status not in OPEN_STATUSES:
            raise _not_cancelable(status)
        claim = await self.dispatcher.claim(record)
        if claim is None:
            raise aborted("the message is being sent right now; read it again", reason="MESSAGE_BUSY")
        fresh = await self.store.get(message_id)
        assert fresh is not None
        status, _ = fresh.status_at(self.clock.now())
        if status not in OPEN_STATUSES:
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
        await self.claims.release(claim)
        canceled = fresh.updated(changes)
        await self.notifier.changed(canceled)
        return canceled.to_proto(now)

    async def record_conversion(self, client_id: str, message_id: str) -> None:
        """The code this message carried was entered: feeds the fraud guard's conversion rates."""
        await self._own(client_id, message_id)
        await self.fraud.record_conversion(message_id)

    async def webhook_secret(self, client_id: str) -> str:
        policy = await self.policies.get(client_id)
        return policy.webhook_secret(self.keyring) or self.settings.webhook_default_secret

    # The dispatcher loop, SMS reports, purge ----------------------------------------------------

    async def claim_due(self, limit: int | None = None) -> list[tuple[MessageRecord, Claim]]:
        return await self.dispatcher.claim_due(limit)

    async def dispatch_due_once(self) -> int:
        """One pass of the dispatcher: due messages, expiries, SMS reports, webhooks. Returns messages tried."""
        claimed = await self.dispatcher.claim_due()
        for record, claim in claimed:
            await self.dispatcher.run_claimed(record, claim)
        await self.expire_due_once()
        await self.poll_sms_once()
        await self.webhooks.deliver_due_once()
        return len(claimed)

    async def expire_due_once(self) -> int:
        """Write EXPIRED on open messages past their ttl (reads already show them expired)."""
        count = 0
        for record in await self.store.expired_open(self.clock.now(), self.settings.batch):
            claim = await self.dispatcher.claim(record)
            if claim is None:
                continue
            fresh = await self.store.get(record.id)
            if fresh is None:
                await self.claims.release(claim)
                continue
            await self.dispatcher.run_claimed(fresh, claim)
            count += 1
        return count

    async def purge_once(self) -> None:
        now = self.clock.now()
        # Sealed texts and numbers: text_retention after the end (longer while SMS reports are asked for).
        await self.store.purge_texts(now)
        # Messages no longer open created more than message_retention ago, and idempotency keys as old.
        await self.store.purge_messages(now - timedelta(seconds=self.settings.message_retention))
        await self.limiter.purge()  # rate-limit slots of windows that no longer count
        await self.fraud.purge()  # SMS events and conversions older than twice the guard's windows
        await self.claims.purge(now - timedelta(days=1))  # released claims after a day, any after two
        await self.webhooks.purge(now - timedelta(days=30))  # finished webhook events
        if self.sandbox is not None:
            await self.sandbox.purge(now - timedelta(days=7))  # the sandbox SMS inbox

    async def poll_sms_once(self) -> int:
        """Ask the SMS provider for delivery reports of SENT SMS. Returns how many were asked."""
        count = 0
        now = self.clock.now()
        for record in await self.store.sms_to_poll(now, self.settings.batch):
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
            await self.claims.release(claim)
            if "status" in changes:
                await self.notifier.changed(record.updated(changes))
            count += 1
        return count

    async def apply_sms_report(self, provider_id: str, delivered: bool, code: str) -> bool:
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
        await self.claims.release(claim)
        await self.notifier.changed(record.updated(changes))
        return True

    # CheckReachability ------------------------------------------------------------------------

    async def check_reachability(
        self, request: delivery_pb2.CheckReachabilityRequest
    ) -> delivery_pb2.CheckReachabilityResponse:
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        phone: Phone | None = None
        try:
            phone = parse_phone(request.phone)
        except InvalidPhoneError as exc:
            problems.add("phone", str(exc))
        problems.raise_if_any()
        assert phone is not None
        policy = await self.policies.get(request.client_id)
        rate = self.settings.rate(policy, "reachability")
        try:
            await self.limiter.acquire(
                [Hit("reachability", self.crypto.limit_key(request.client_id), rate, subject="client")]
            )
        except RateLimited as exc:
            raise exc.to_error() from None
        bot_owner = await self.router.bot_owner(request.bot, request.client_id) if request.bot else ""
        try:
            resolution = await self.router.resolve(phone.e164, request.bot)
        except grpc.aio.AioRpcError as error:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "DIRECTORY_UNAVAILABLE", "cannot check now; retry"
            ) from error
        candidates = await self.router.candidates(resolution, request.bot, bot_owner, request.client_id)
        days = policy.default_confirm_days
        return delivery_pb2.CheckReachabilityResponse(
            reachable=bool(candidates),
            bot_id=candidates[0] if candidates else "",
            confirmation_required=bool(candidates)
            and days > 0
            and confirmation_due(resolution, days, self.clock.now()),
            confirmed=resolution.found and resolution.HasField("confirm_time"),
        )


def _not_cancelable(status: int) -> ServiceError:
    return failed_precondition(
        "MESSAGE_NOT_CANCELABLE", f"the message is {STATUS_NAMES[status]} and can no longer be canceled"
    )

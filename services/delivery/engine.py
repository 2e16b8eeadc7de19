"""The delivery domain: SendMessage pipeline, routing, dispatch, hold/release, expiry, purge.

SendMessage: validate -> client policy -> idempotent repeat? (answered before any limit
counts it) -> rate limits -> SMS leg admission (policy, CAPTCHA rule, fraud guard, IP
limit, daily cap) -> persist (text and phone sealed) -> route and dispatch inline.
A message that cannot go out at once stays QUEUED with next_attempt_at; the dispatcher
loop (dispatch_due_once) claims due messages and tries again until the ttl.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import Any

import grpc
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc

from services.core.clock import Clock, as_utc
from services.core.crypto import Keyring, SealContext
from services.core.errors import (
    ServiceError,
    Violations,
    aborted,
    failed_precondition,
    not_found,
    parse_rpc_error,
    permission_denied,
    resource_exhausted,
)
from services.core.ids import new_id
from services.core.logging import get_logger
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.delivery import metrics
from services.delivery.bots import BotCatalog
from services.delivery.claims import Claim, Claims
from services.delivery.fraud import BLOCK, CAPTCHA, FraudGuard, SmsLeg
from services.delivery.limits import Hit, Limiter, Rate, RateLimited
from services.delivery.policy import Policy, PolicyStore
from services.delivery.record import (
    CANCELED,
    CHANNEL_NAMES,
    DELIVERED,
    EPOCH,
    EXPIRED,
    FAILED,
    FINAL_STATUSES,
    HELD,
    OPEN_STATUSES,
    QUEUED,
    SENT,
    STATUS_NAMES,
    MessageChanges,
    MessageRecord,
)
from services.delivery.sms import DELIVERED as SMS_DELIVERED
from services.delivery.sms import FAILED as SMS_FAILED
from services.delivery.sms import PENDING, SandboxSmsProvider, SmsError, SmsProvider, count_outcome
from services.delivery.store import RequestInProgress, Store
from services.delivery.webhooks import UnsafeTarget, WebhookOutbox, check_url, event_payload

log = get_logger(__name__)

AUTO, TELEGRAM, SMS = common_pb2.CHANNEL_AUTO, common_pb2.CHANNEL_TELEGRAM, common_pb2.CHANNEL_SMS
P_MESSAGE = delivery_pb2.MESSAGE_PURPOSE_MESSAGE
P_CONFIRMATION = delivery_pb2.MESSAGE_PURPOSE_CONFIRMATION
P_VERIFICATION = delivery_pb2.MESSAGE_PURPOSE_VERIFICATION
R = common_pb2  # failure reasons
MAX_TEXT = 4096
MAX_DELETE_AFTER = 48 * 3600
RU_LOCALE_REGIONS = frozenset({"RU", "BY", "KZ", "KG", "UA", "UZ", "TJ", "AM", "AZ", "MD"})


@dataclass(frozen=True)
class EngineSettings:
    default_ttl: float = 600.0
    min_ttl: float = 10.0
    max_ttl: float = 7 * 86400.0
    lease: float = 30.0
    batch: int = 50
    backoff_base: float = 2.0
    backoff_max: float = 120.0
    inline_dispatch: bool = True
    # How long one SendBotMessage may wait for the gateway's rate limits before we reschedule.
    bot_send_timeout: float = 3.0
    text_retention: float = 86400.0
    message_retention: float = 90 * 86400.0
    sms_sender: str = "otpgate"
    sms_poll_interval: float = 30.0
    sms_poll_for: float = 86400.0
    sms_countries: tuple[str, ...] = ()  # service-wide allow-list for every SMS; empty: any
    dev: bool = False
    webhook_default_secret: str = ""
    limits: dict[str, Rate] = field(
        default_factory=lambda: {
            "client": Rate(1000, 60),
            "phone_short": Rate(5, 600),
            "phone_daily": Rate(20, 86400),
            "ip_sms": Rate(5, 1800),
            "session": Rate(10, 600),
            "global": Rate(20000, 60),
            "reachability": Rate(60, 60),
        }
    )


@dataclass
class Outcome:
    """What one dispatch attempt decided; written under the claim."""

    changes: MessageChanges = field(default_factory=lambda: MessageChanges())
    start_confirmation: bool = False


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
        self.bots = bots
        self.directory = directory
        self.botgateway = botgateway
        self.verification = verification
        self.sms = sms
        self.sandbox = sandbox
        self.webhooks = webhooks
        self.keyring = keyring
        self.clock = clock
        self.settings = settings

    # Helpers ---------------------------------------------------------------------------------

    def phone_index(self, e164: str) -> str:
        return self.keyring.blind_index("phone", e164)

    def _key(self, value: str) -> str:
        return self.keyring.blind_index("limit-key", value)[:32]

    def _rate(self, policy: Policy, name: str) -> Rate:
        return policy.rate_limits.get(name) or self.settings.limits[name]

    def _open_text(self, record: MessageRecord) -> str:
        if not record.text_sealed:
            raise ServiceError(grpc.StatusCode.INTERNAL, "TEXT_PURGED", "message text is no longer kept")
        return self.keyring.open_str(record.text_sealed, SealContext("messages", record.id, "text"))

    def _open_phone(self, record: MessageRecord) -> str:
        if not record.phone_sealed:
            raise ServiceError(grpc.StatusCode.INTERNAL, "PHONE_PURGED", "the message's number is no longer kept")
        return self.keyring.open_str(record.phone_sealed, SealContext("messages", record.id, "phone"))

    def _fingerprint(self, request: delivery_pb2.SendMessageRequest, e164: str) -> str:
        parts = [
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
        return self.keyring.blind_index("message-request", "\x1f".join(parts))

    # SendMessage -----------------------------------------------------------------------------

    def _validate(self, request: delivery_pb2.SendMessageRequest) -> tuple[Phone | None, float]:
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
        return phone, ttl

    async def send_message(self, request: delivery_pb2.SendMessageRequest) -> delivery_pb2.SendMessageResponse:
        phone, ttl = self._validate(request)
        assert phone is not None
        if request.callback_url:
            try:
                await check_url(request.callback_url, dev=self.settings.dev)
            except UnsafeTarget as exc:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_ARGUMENT",
                    f"callback_url: {exc}",
                    [_bad_request("callback_url", str(exc))],
                ) from None
        client_id = request.client_id
        purpose = request.purpose or P_MESSAGE
        channel = request.channel or AUTO
        policy = await self.policies.get(client_id)
        if not policy.country_allowed(phone.region):
            raise permission_denied("COUNTRY_NOT_ALLOWED", "numbers of this country are not allowed for this client")
        if request.callback_url and not (policy.webhook_secret_sealed or self.settings.webhook_default_secret):
            raise failed_precondition(
                "WEBHOOK_SECRET_NOT_SET",
                "set a webhook secret in the client policy before using callback_url",
                [("WEBHOOK_SECRET", "policy.webhook_secret", "not set")],
            )
        origin = request.origin
        if (
            policy.captcha_rule == common_pb2.CAPTCHA_RULE_ALWAYS
            and purpose != P_CONFIRMATION
            and not origin.captcha_verified
        ):
            raise _captcha_required()
        bot_owner = ""
        if request.bot:
            info = await self._bot_info(request.bot)
            if info is None or (not info.shared and info.owner_client_id != client_id):
                raise not_found("bot", "BOT_NOT_FOUND")
            bot_owner = info.owner_client_id if not info.shared else ""
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
                    resolution = await self.directory.ResolvePhone(
                        directory_pb2.ResolvePhoneRequest(phone=phone.e164, bot_id=request.bot)
                    )
                    sms_leg = not await self._candidates(resolution, request.bot, bot_owner, client_id)
                except grpc.aio.AioRpcError:
                    resolution = None  # the dispatcher routes it later
            billed = purpose != P_CONFIRMATION or (bool(bot_owner) and bot_owner == client_id)
            if sms_leg:
                leg = SmsLeg(
                    phone=phone,
                    client_id=client_id,
                    purpose=purpose,
                    captcha_verified=origin.captcha_verified,
                    captcha_possible=purpose != P_CONFIRMATION,
                    fraud_mode=policy.fraud_mode,
                )
                await self._admit_sms(leg, policy, origin, billed, purpose)
            now = self.clock.now()
            claim = self.claims.implicit("message", message_id)
            record = MessageRecord(
                id=message_id,
                idem=idem or f"\x1f{message_id}",
                fingerprint=fingerprint,
                client_id=client_id,
                request_id=request.request_id,
                purpose=purpose,
                phone_sealed=self.keyring.seal(phone.e164, SealContext("messages", message_id, "phone")),
                phone_index=self.phone_index(phone.e164),
                phone_masked=phone.masked,
                region=phone.region,
                text_sealed=self.keyring.seal(request.text, SealContext("messages", message_id, "text")),
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
                captcha_verified=origin.captcha_verified,
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
            record = await self._run_claimed(record, claim, resolution)
        else:
            await self.store.write(message_id, {"lease_until": EPOCH, "next_attempt_at": now})
            await self.claims.release(claim)
            record = record.updated({"lease_until": EPOCH})
        return delivery_pb2.SendMessageResponse(message=record.to_proto(self.clock.now()))

    def _replay(self, existing: MessageRecord, fingerprint: str) -> delivery_pb2.SendMessageResponse:
        if existing.fingerprint != fingerprint:
            raise aborted("request_id was already used for a different message", reason="IDEMPOTENCY_CONFLICT")
        return delivery_pb2.SendMessageResponse(message=existing.to_proto(self.clock.now()), replayed=True)

    async def _bot_info(self, bot_id: str) -> Any:
        try:
            return await self.bots.info(bot_id)
        except grpc.aio.AioRpcError as error:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "BOTGATEWAY_UNAVAILABLE", "cannot check the bot now"
            ) from error

    async def _limits(
        self, request: delivery_pb2.SendMessageRequest, policy: Policy, phone: Phone, purpose: int, channel: int
    ) -> None:
        hits = [
            Hit("client", self._key(request.client_id), self._rate(policy, "client"), subject="client"),
            Hit("global", "all", self.settings.limits["global"], subject="global"),
        ]
        # The bot prompt of a re-confirmation is ours, not the client's traffic.
        if not (purpose == P_CONFIRMATION and channel != SMS):
            pkey = self._key("phone:" + phone.e164)
            hits.append(Hit("phone_short", pkey, self._rate(policy, "phone_short"), subject="phone"))
            hits.append(Hit("phone_daily", pkey, self._rate(policy, "phone_daily"), subject="phone"))
        if request.origin.session_id:
            hits.append(
                Hit(
                    "session",
                    self._key("session:" + request.origin.session_id),
                    self._rate(policy, "session"),
                    subject="origin.session_id",
                )
            )
        try:
            await self.limiter.acquire(hits)
        except RateLimited as exc:
            log.info("rate_limited", limit=exc.hit.limit_name, client_id=request.client_id, retry_after=exc.retry_after)
            raise exc.to_error() from None

    async def _admit_sms(
        self, leg: SmsLeg, policy: Policy, origin: common_pb2.Origin, billed: bool, purpose: int
    ) -> None:
        region = leg.phone.region
        if self.settings.sms_countries and region not in self.settings.sms_countries:
            raise permission_denied("SMS_NOT_ALLOWED", "SMS to this country is not offered")
        if purpose != P_CONFIRMATION and not policy.sms_allowed(region):
            raise permission_denied("SMS_NOT_ALLOWED", "SMS to this country is not allowed for this client")
        if (
            policy.captcha_rule == common_pb2.CAPTCHA_RULE_SMS
            and purpose != P_CONFIRMATION
            and not origin.captcha_verified
        ):
            raise _captcha_required()
        decision = await self.fraud.evaluate(leg)
        if decision.decision == BLOCK:
            if decision.reason.startswith("LINE_TYPE"):
                raise permission_denied("SMS_NOT_ALLOWED", f"no SMS to this kind of number ({decision.reason})")
            raise permission_denied("FRAUD_SUSPECTED", f"SMS refused by the fraud guard ({decision.reason})")
        if decision.decision == CAPTCHA:
            raise _captcha_required()
        hits: list[Hit] = []
        if origin.ip:
            hits.append(Hit("ip_sms", self._key("ip:" + origin.ip), self._rate(policy, "ip_sms"), subject="origin.ip"))
        if billed and policy.daily_sms_cap > 0:
            hits.append(
                Hit(
                    "daily_sms_cap",
                    self._key(leg.client_id),
                    Rate(policy.daily_sms_cap, 86400),
                    sliding=False,
                    subject="client",
                )
            )
        try:
            await self.limiter.acquire(hits)
        except RateLimited as exc:
            if exc.hit.limit_name == "daily_sms_cap":
                raise resource_exhausted(
                    "SMS_CAP_REACHED",
                    "the client's daily SMS cap is reached",
                    exc.retry_after,
                    [("client", f"{policy.daily_sms_cap} SMS per UTC day")],
                ) from None
            raise exc.to_error() from None

    # Routing -------------------------------------------------------------------------------------

    async def _candidates(
        self, resolution: directory_pb2.ResolvePhoneResponse, requested: str, bot_owner: str, client_id: str
    ) -> list[str]:
        if not resolution.found:
            return []
        connected = list(resolution.connected_bot_ids)
        if requested and bot_owner:
            # A client's own bot: only that bot, only for its owner.
            return [requested] if requested in connected and bot_owner == client_id else []
        shared: list[str] = []
        for bot_id in [*resolution.shared_bot_ids, *connected]:
            if bot_id in shared:
                continue
            if bot_id in resolution.shared_bot_ids or await self.bots.is_shared(bot_id):
                shared.append(bot_id)
        blocked = set(resolution.blocked_bot_ids)
        shared = [b for b in shared if b not in blocked]
        if requested in shared:
            shared.remove(requested)
            shared.insert(0, requested)
        return shared

    # Dispatch --------------------------------------------------------------------------------

    async def _run_claimed(
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
            outcome = Outcome({"next_attempt_at": self.clock.now() + timedelta(seconds=self._backoff(record.attempts))})
        now = self.clock.now()
        changes: MessageChanges = {**outcome.changes, "lease_until": EPOCH, "claim_seq": claim.seq, "updated_at": now}
        status = changes.get("status", record.status)
        if status in FINAL_STATUSES or status == SENT:
            changes.setdefault("purge_at", now + timedelta(seconds=self.settings.text_retention))
        await self.store.write(record.id, changes)
        record = record.updated(changes)
        if outcome.start_confirmation:
            record = await self._start_confirmation(record)
            status = record.status
        await self.claims.release(claim)
        if status != started:
            await self._on_status(record)
        return record

    def _backoff(self, attempts: int) -> float:
        attempts = max(1, attempts)
        return float(min(self.settings.backoff_max, self.settings.backoff_base * (2 ** (attempts - 1))))

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
        e164 = self._open_phone(record)
        if record.requested_channel == SMS:
            return await self._send_sms(record, e164)
        if resolution is None:
            try:
                resolution = await self.directory.ResolvePhone(
                    directory_pb2.ResolvePhoneRequest(phone=e164, bot_id=record.requested_bot)
                )
            except grpc.aio.AioRpcError as error:
                log.warning("resolve_failed", message_id=record.id, status=error.code().name)
                return self._retry(record, None)
        candidates = await self._candidates(resolution, record.requested_bot, record.bot_owner, record.client_id)
        if not candidates:
            reason = R.FAILURE_REASON_NOT_CONNECTED
            if resolution.found and set(resolution.blocked_bot_ids) & (
                {record.requested_bot} if record.bot_owner else set(resolution.blocked_bot_ids)
            ):
                reason = R.FAILURE_REASON_BLOCKED_BY_USER
            return await self._fallback_or_fail(record, e164, reason)
        # Re-confirmation (never for purpose CONFIRMATION: confirm_days is 0 there).
        days = record.confirm_days
        if days > 0 and not record.released_at:
            confirmed = (
                as_utc(resolution.confirm_time.ToDatetime(tzinfo=UTC)) if resolution.HasField("confirm_time") else None
            )
            if confirmed is None or now - confirmed > timedelta(days=days):
                return Outcome(
                    {
                        "status": HELD,
                        "bot_id": candidates[0],
                        "channel": TELEGRAM,
                        "telegram_user_id": int(resolution.telegram_user_id),
                        "confirmation_started": False,
                    },
                    start_confirmation=True,
                )
        return await self._send_bot(record, e164, resolution, candidates)

    async def _send_bot(
        self,
        record: MessageRecord,
        e164: str,
        resolution: directory_pb2.ResolvePhoneResponse,
        candidates: list[str],
    ) -> Outcome:
        text = self._open_text(record)
        attempts = record.attempts
        retry_after: float | None = None
        final_reason = 0
        for bot_id in candidates:
            attempts += 1
            request = botgateway_pb2.SendBotMessageRequest(
                bot_id=bot_id,
                telegram_user_id=resolution.telegram_user_id,
                text=text,
                protect_content=record.protect_content,
            )
            if record.delete_after:
                request.delete_after.seconds = record.delete_after
            try:
                await self.botgateway.SendBotMessage(request, timeout=self.settings.bot_send_timeout)
            except grpc.aio.AioRpcError as error:
                failure = parse_rpc_error(error)
                log.info(
                    "bot_send_refused",
                    message_id=record.id,
                    bot=bot_id,
                    status=failure.code.name,
                    reason=failure.reason,
                )
                if failure.code == grpc.StatusCode.FAILED_PRECONDITION:
                    if failure.reason == "USER_DEACTIVATED":
                        final_reason = R.FAILURE_REASON_USER_DEACTIVATED
                        break
                    if failure.reason == "BLOCKED_BY_USER":
                        final_reason = R.FAILURE_REASON_BLOCKED_BY_USER
                    elif not final_reason:
                        final_reason = R.FAILURE_REASON_NOT_CONNECTED
                    continue
                if failure.code == grpc.StatusCode.NOT_FOUND:
                    final_reason = final_reason or R.FAILURE_REASON_BOT_UNAVAILABLE
                    continue
                # RESOURCE_EXHAUSTED (the bot's rate), UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL...:
                # try another bot, else retry when the soonest of them allows.
                wait = failure.retry_after if failure.retry_after is not None else self._backoff(attempts)
                retry_after = wait if retry_after is None else min(retry_after, wait)
                continue
            now = self.clock.now()
            return Outcome(
                {
                    "status": SENT,
                    "channel": TELEGRAM,
                    "bot_id": bot_id,
                    "attempts": attempts,
                    "sent_at": now,
                    "telegram_user_id": int(resolution.telegram_user_id),
                    "failure_reason": 0,
                }
            )
        tried = record.updated({"attempts": attempts})
        if retry_after is not None and final_reason != R.FAILURE_REASON_USER_DEACTIVATED:
            return self._retry(tried, retry_after)
        out = await self._fallback_or_fail(tried, e164, final_reason or R.FAILURE_REASON_NOT_CONNECTED)
        out.changes.setdefault("attempts", attempts)
        return out

    def _retry(self, record: MessageRecord, retry_after: float | None) -> Outcome:
        """Try again after `retry_after` (else the backoff), unless that is past the message's ttl."""
        now = self.clock.now()
        delay = retry_after if retry_after is not None else self._backoff(record.attempts)
        at = now + timedelta(seconds=max(0.0, delay))
        if at >= record.expire_at:
            return Outcome(
                {"status": EXPIRED, "failure_reason": R.FAILURE_REASON_TTL_EXPIRED, "attempts": record.attempts}
            )
        return Outcome({"next_attempt_at": at, "attempts": record.attempts})

    async def _fallback_or_fail(self, record: MessageRecord, e164: str, reason: int) -> Outcome:
        if record.requested_channel == AUTO and record.sms_fallback:
            if not record.sms_admitted:
                refusal = await self._admit_late(record, e164)
                if refusal is not None:
                    return refusal
            return await self._send_sms(record, e164)
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
        )
        try:
            await self._admit_sms(
                leg,
                policy,
                common_pb2.Origin(captcha_verified=leg.captcha_verified),
                record.billed,
                record.purpose,
            )
        except ServiceError as refusal:
            log.info("sms_leg_refused", message_id=record.id, reason=refusal.reason)
            return Outcome({"status": FAILED, "failure_reason": R.FAILURE_REASON_SMS_NOT_ALLOWED, "channel": SMS})
        await self.fraud.record_sms(record.id, leg, record.phone_index)
        return None

    async def _send_sms(self, record: MessageRecord, e164: str) -> Outcome:
        text = self._open_text(record)
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
            out = self._retry(record.updated({"attempts": attempts}), exc.retry_after)
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
            "bot_id": "",
        }
        if sent.delivered:
            changes["delivered_at"] = now
        else:
            changes["sms_poll_at"] = now + timedelta(seconds=self.settings.sms_poll_interval)
            changes["sms_poll_until"] = now + timedelta(seconds=self.settings.sms_poll_for)
            changes["purge_at"] = now + timedelta(seconds=max(self.settings.text_retention, self.settings.sms_poll_for))
        return Outcome(changes)

    async def _start_confirmation(self, record: MessageRecord) -> MessageRecord:
        request = verification_pb2.StartPhoneConfirmationRequest(
            phone=self._open_phone(record),
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
                    R.FAILURE_REASON_SMS_NOT_ALLOWED
                    if failure.code == grpc.StatusCode.PERMISSION_DENIED
                    else R.FAILURE_REASON_CONFIRMATION_FAILED
                )
                changes = {
                    "status": FAILED,
                    "failure_reason": reason,
                    "confirmation_started": False,
                    "updated_at": now,
                    "purge_at": now + timedelta(seconds=self.settings.text_retention),
                }
            else:
                delay = failure.retry_after if failure.retry_after else self._backoff(record.attempts)
                changes = {"confirmation_started": False, "next_attempt_at": now + timedelta(seconds=delay)}
        await self.store.write(record.id, changes)
        return record.updated(changes)

    async def _on_status(self, record: MessageRecord) -> None:
        status = record.status
        channel = record.channel or record.requested_channel
        metrics.messages_total.labels(STATUS_NAMES[status], CHANNEL_NAMES.get(channel, ""), record.bot_id).inc()
        now = self.clock.now()
        if status in (SENT, DELIVERED) and record.sent_at and record.attempts:
            if status == SENT or record.sms_provider == "sandbox":
                metrics.accept_to_sent_seconds.observe(max(0.0, (record.sent_at - record.created_at).total_seconds()))
            day = record.sent_at.strftime("%Y-%m-%d")
            await self.store.count_usage(record.id, record.client_id, day, channel, channel == SMS and record.billed)
        if status in (SENT, DELIVERED, FAILED, EXPIRED, CANCELED) and record.callback_url:
            message = record.to_proto(now)
            await self.webhooks.enqueue(
                record.client_id,
                record.callback_url,
                f"{record.id}:{STATUS_NAMES[status]}",
                event_payload(message, record.client_id, now),
            )
        log.info(
            "message_status",
            message_id=record.id,
            status=STATUS_NAMES[status],
            channel=CHANNEL_NAMES.get(channel, ""),
            bot=record.bot_id,
        )

    # The dispatcher loop ---------------------------------------------------------------------------

    async def _claim(self, record: MessageRecord) -> Claim | None:
        """The message's claim, unless another dispatcher holds it (None)."""
        return await self.claims.acquire("message", record.id, record.claim_seq, lease_until=record.lease_until)

    async def claim_due(self, limit: int | None = None) -> list[tuple[MessageRecord, Claim]]:
        """Claim due messages (QUEUED and due, or HELD whose confirmation must be started again)."""
        now = self.clock.now()
        batch = limit or self.settings.batch
        due = [*await self.store.due(now, batch), *await self.store.held_needing_confirmation(now, batch)]
        claimed: list[tuple[MessageRecord, Claim]] = []
        for record in due:
            claim = await self._claim(record)
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

    async def dispatch_due_once(self) -> int:
        """One pass of the dispatcher: due messages, expiries, SMS reports, webhooks. Returns messages tried."""
        claimed = await self.claim_due()
        for record, claim in claimed:
            await self._run_claimed(record, claim)
        await self.expire_due_once()
        await self.poll_sms_once()
        await self.webhooks.deliver_due_once()
        return len(claimed)

    async def expire_due_once(self) -> int:
        count = 0
        for record in await self.store.expired_open(self.clock.now(), self.settings.batch):
            claim = await self._claim(record)
            if claim is None:
                continue
            fresh = await self.store.get(record.id)
            if fresh is None:
                await self.claims.release(claim)
                continue
            await self._run_claimed(fresh, claim)
            count += 1
        return count

    async def poll_sms_once(self) -> int:
        """Ask the SMS provider for delivery reports of SENT SMS."""
        count = 0
        now = self.clock.now()
        for record in await self.store.sms_to_poll(now, self.settings.batch):
            claim = await self._claim(record)
            if claim is None:
                continue
            changes: MessageChanges = {"lease_until": EPOCH, "claim_seq": claim.seq}
            try:
                state, code = await self.sms.status(record.provider_id or "", self._open_phone(record))
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
                        "failure_reason": R.FAILURE_REASON_SMS_FAILED,
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
                await self._on_status(record.updated(changes))
            count += 1
        return count

    async def apply_sms_report(self, provider_id: str, delivered: bool, code: str) -> bool:
        """A delivery report pushed by a provider (same effect as a polled status)."""
        record = await self.store.sent_by_provider_id(provider_id)
        if record is None:
            return False
        claim = await self._claim(record)
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
            changes.update({"status": FAILED, "failure_reason": R.FAILURE_REASON_SMS_FAILED})
        await self.store.write(record.id, changes)
        await self.claims.release(claim)
        await self._on_status(record.updated(changes))
        return True

    async def purge_once(self) -> None:
        now = self.clock.now()
        await self.store.purge_texts(now)
        await self.store.purge_messages(now - timedelta(seconds=self.settings.message_retention))
        await self.limiter.purge()
        await self.fraud.purge()
        await self.claims.purge(now - timedelta(days=1))
        await self.webhooks.purge(now - timedelta(days=30))
        if self.sandbox is not None:
            await self.sandbox.purge(now - timedelta(days=7))

    # Held messages -----------------------------------------------------------------------------------

    async def release_held(self, telegram_user_id: int, phone_raw: str) -> int:
        try:
            phone = parse_phone(phone_raw)
        except InvalidPhoneError as exc:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", f"phone: {exc}", [_bad_request("phone", str(exc))]
            ) from None
        index = self.phone_index(phone.e164)
        await self.fraud.record_confirmed_phone(index)
        released = 0
        for record in await self.store.held_for_phone(index):
            if record.telegram_user_id != telegram_user_id:
                continue
            claim = await self._claim(record)
            if claim is None:
                continue
            fresh = await self.store.get(record.id)
            if fresh is None or fresh.status != HELD or fresh.expire_at <= self.clock.now():
                if fresh is not None:
                    await self._run_claimed(fresh, claim)  # writes EXPIRED if it ran out
                else:
                    await self.claims.release(claim)
                continue
            now = self.clock.now()
            changes: MessageChanges = {"status": QUEUED, "released_at": now, "next_attempt_at": now}
            await self.store.write(record.id, changes)
            released += 1
            await self._run_claimed(fresh.updated(changes), claim)
        log.info("held_messages_released", released=released)
        return released

    # Reads and cancel ------------------------------------------------------------------------------

    async def get_message(self, client_id: str, message_id: str) -> common_pb2.Message:
        record = await self.store.get_for_client(client_id, message_id) if client_id and message_id else None
        if record is None:
            raise not_found("message", "MESSAGE_NOT_FOUND")
        return record.to_proto(self.clock.now())

    async def cancel_message(self, client_id: str, message_id: str) -> common_pb2.Message:
        record = await self.store.get_for_client(client_id, message_id) if client_id and message_id else None
        if record is None:
            raise not_found("message", "MESSAGE_NOT_FOUND")
        status, _ = record.status_at(self.clock.now())
        if status not in OPEN_STATUSES:
            raise failed_precondition(
                "MESSAGE_NOT_CANCELABLE", f"the message is {STATUS_NAMES[status]} and can no longer be canceled"
            )
        claim = await self._claim(record)
        if claim is None:
            raise aborted("the message is being sent right now; read it again", reason="MESSAGE_BUSY")
        fresh = await self.store.get(message_id)
        assert fresh is not None
        status, _ = fresh.status_at(self.clock.now())
        if status not in OPEN_STATUSES:
            await self._run_claimed(fresh, claim)
            raise failed_precondition(
                "MESSAGE_NOT_CANCELABLE", f"the message is {STATUS_NAMES[status]} and can no longer be canceled"
            )
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
        await self._on_status(canceled)
        return canceled.to_proto(now)

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
        try:
            await self.limiter.acquire(
                [
                    Hit(
                        "reachability",
                        self._key(request.client_id),
                        self._rate(policy, "reachability"),
                        subject="client",
                    )
                ]
            )
        except RateLimited as exc:
            raise exc.to_error() from None
        bot_owner = ""
        if request.bot:
            info = await self._bot_info(request.bot)
            if info is None or (not info.shared and info.owner_client_id != request.client_id):
                raise not_found("bot", "BOT_NOT_FOUND")
            bot_owner = info.owner_client_id if not info.shared else ""
        try:
            resolution = await self.directory.ResolvePhone(
                directory_pb2.ResolvePhoneRequest(phone=phone.e164, bot_id=request.bot)
            )
        except grpc.aio.AioRpcError as error:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "DIRECTORY_UNAVAILABLE", "cannot check now; retry"
            ) from error
        candidates = await self._candidates(resolution, request.bot, bot_owner, request.client_id)
        confirmed = resolution.found and resolution.HasField("confirm_time")
        required = False
        if candidates and policy.default_confirm_days > 0:
            if not confirmed:
                required = True
            else:
                at = as_utc(resolution.confirm_time.ToDatetime(tzinfo=UTC))
                required = self.clock.now() - at > timedelta(days=policy.default_confirm_days)
        return delivery_pb2.CheckReachabilityResponse(
            reachable=bool(candidates),
            bot_id=candidates[0] if candidates else "",
            confirmation_required=required,
            confirmed=confirmed,
        )

    async def record_conversion(self, client_id: str, message_id: str) -> None:
        record = await self.store.get_for_client(client_id, message_id) if client_id and message_id else None
        if record is None:
            raise not_found("message", "MESSAGE_NOT_FOUND")
        await self.fraud.record_conversion(message_id)

    async def webhook_secret(self, client_id: str) -> str:
        policy = await self.policies.get(client_id)
        return policy.webhook_secret(self.keyring) or self.settings.webhook_default_secret


_CONFIRMATION_REFUSED = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)


def _captcha_required() -> ServiceError:
    return failed_precondition(
        "CAPTCHA_REQUIRED", "solve a CAPTCHA and send the request again", [("CAPTCHA", "captcha_token", "required")]
    )


def _bad_request(field_path: str, description: str) -> Any:
    from google.rpc import error_details_pb2

    return error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field_path, description=description)]
    )

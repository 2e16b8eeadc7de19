"""SendMessage: whether a message is accepted, and storing it.

In order, each step refusing with its own error before anything later is counted:
validate -> callback_url is a public address -> client policy (country allowed, a webhook secret
for callback_url, CAPTCHA rule ALWAYS) -> a named bot is shared or the client's own ->
idempotency key taken with one insert (a repeat is answered here, before any limit counts it;
the same request_id with other content is ABORTED IDEMPOTENCY_CONFLICT; the key is given back
if no message is stored) -> rate limits (client, global, phone short and daily, session) ->
paid leg admission when the message is one (channel SMS or TELEGRAM_GATEWAY, or AUTO without a
policy ladder, with sms_fallback and the directory naming no bot that can carry it;
sms_admission.py; a ladder's paid rungs are admitted when the message reaches them) -> the
message stored, its text, code and number sealed -> dispatched inline under the claim its insert holds (dispatch.py),
or left QUEUED for the dispatcher. The directory lookup of a bot rung sent inline runs alongside,
from the policy check on (`_early_lookup`).
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.directory.v1 import directory_pb2

from services.core.clock import Clock
from services.core.end_user import MAX_TEXT, check_origin, check_text
from services.core.errors import Violations, aborted, failed_precondition, invalid_argument, permission_denied
from services.core.ids import new_id
from services.core.logging import get_logger
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.delivery import metrics
from services.delivery.claims import Claims
from services.delivery.dispatch import Dispatcher
from services.delivery.fraud import Decision, FraudGuard, SmsLeg
from services.delivery.gateway_leg import ADMITTED, GatewayLeg
from services.delivery.limits import Hit, Limiter, RateLimited, throughput_lease
from services.delivery.message_crypto import MessageCrypto
from services.delivery.policy import Policy, PolicyStore
from services.delivery.record import (
    AUTO,
    CHANNEL_NAMES,
    EPOCH,
    GATEWAY,
    P_CONFIRMATION,
    P_MESSAGE,
    P_VERIFICATION,
    QUEUED,
    SMS,
    TELEGRAM,
    MessageRecord,
)
from services.delivery.routing import Router
from services.delivery.settings import EngineSettings
from services.delivery.sms_admission import SmsAdmission, captcha_required
from services.delivery.store import RequestInProgress, Store
from services.delivery.webhooks import UnsafeTarget, check_url

log = get_logger(__name__)

CODE = re.compile(r"^\d{4,8}$")
MAX_DELETE_AFTER = 48 * 3600


class Admission:
    def __init__(
        self,
        store: Store,
        policies: PolicyStore,
        limiter: Limiter,
        fraud: FraudGuard,
        claims: Claims,
        router: Router,
        sms_admission: SmsAdmission,
        dispatcher: Dispatcher,
        gateway: GatewayLeg,
        crypto: MessageCrypto,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.policies = policies
        self.limiter = limiter
        self.fraud = fraud
        self.claims = claims
        self.router = router
        self.sms_admission = sms_admission
        self.dispatcher = dispatcher
        self.gateway = gateway
        self.crypto = crypto
        self.clock = clock
        self.settings = settings

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
        lookup = self._early_lookup(request, channel, policy, phone.e164)
        # Idempotent repeat: answered before any limit counts it again. The key is taken with one
        # insert before anything is counted, and given back if this request stores no message.
        idem = f"{client_id}\x1f{request.request_id}" if request.request_id else ""
        fingerprint = self._fingerprint(request, phone.e164)
        message_id = new_id(int(self.clock.now().timestamp() * 1000))
        if idem:
            try:
                existing = await self.store.reserve_idem(idem, message_id, 2 * self.settings.request_timeout)
            except RequestInProgress:
                raise aborted(
                    "a request with this request_id is still being processed; retry shortly",
                    reason="REQUEST_IN_PROGRESS",
                    retry_after=1.0,
                ) from None
            if existing is not None:
                _drop(lookup)
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
            gateway_leg = channel == GATEWAY
            if channel == AUTO and sms_fallback and not policy.ladder:
                # Decide now whether this is an SMS leg, so a refusal is an error, not a stored message.
                try:
                    resolution = await (lookup or self.router.resolve(phone.e164, request.bot))
                    sms_leg = not await self.router.candidates(resolution, request.bot, bot_owner, client_id)
                except grpc.aio.AioRpcError:
                    resolution = None  # the dispatcher routes it later
            # A re-confirmation prompt is ours, not billed, unless it goes through the client's own bot.
            billed = purpose != P_CONFIRMATION or (bool(bot_owner) and bot_owner == client_id)
            leg = SmsLeg(
                phone=phone,
                client_id=client_id,
                purpose=purpose,
                captcha_verified=request.origin.captcha_verified,
                captcha_possible=request.origin.captcha_possible and purpose != P_CONFIRMATION,
                fraud_mode=policy.fraud_mode,
                ip=request.origin.ip,
                session_id=request.origin.session_id,
                user_agent=request.origin.user_agent,
            )
            if gateway_leg and not await self.gateway.available(client_id):
                raise failed_precondition(
                    "GATEWAY_NOT_CONFIGURED",
                    "no Telegram Gateway token for this client: set policy.telegram_gateway_token",
                    [("GATEWAY_TOKEN", "policy.telegram_gateway_token", "not set")],
                )
            admitted: Decision | None = None
            if sms_leg or gateway_leg:
                paid = SMS if sms_leg else GATEWAY
                admitted = await self.sms_admission.admit(leg, policy, request.origin, billed, purpose, paid)
            # A paid leg that may be decided at dispatch (an SMS fallback, a ladder's Gateway or SMS
            # rung) is judged with who asked for it.
            later_paid = channel == AUTO and not sms_leg and (sms_fallback or bool(policy.ladder))
            origin_keys = self.fraud.requester_keys(leg) if later_paid else None
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
                code_sealed=self.crypto.seal_code(message_id, request.code) if request.code else None,
                gateway_state=ADMITTED if gateway_leg else None,
                gateway_code_length=request.gateway_code_length or None,
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
                origin_keys=origin_keys or None,
            )
            existing = await self.store.insert(record)
        except BaseException:
            _drop(lookup)
            if idem:
                await asyncio.shield(self.store.release_idem(idem, message_id))
            raise
        if existing is not None:  # stored before its key had a pointer: found by the unique idem index
            _drop(lookup)
            await self.claims.release(claim)
            if idem:
                await self.store.release_idem(idem, message_id)
            return self._replay(existing, fingerprint)
        if admitted is not None:
            await self.fraud.record_sms(message_id, leg, record.phone_index, admitted)
        metrics.messages_total.labels("QUEUED", CHANNEL_NAMES[channel], request.bot or "").inc()
        log.info(
            "message_accepted",
            message_id=message_id,
            client_id=client_id,
            channel=CHANNEL_NAMES[channel],
            purpose=purpose,
        )
        if self.settings.inline_dispatch:
            if resolution is None and lookup is not None:
                resolution = await _looked_up(lookup)
            record = await self.dispatcher.run_claimed(record, claim, resolution)
        else:
            await self.store.write(message_id, {"lease_until": EPOCH, "next_attempt_at": now})
            await self.claims.release(claim)
            record = record.updated({"lease_until": EPOCH})
        return delivery_pb2.SendMessageResponse(message=record.to_proto(self.clock.now()))

    def _early_lookup(
        self, request: delivery_pb2.SendMessageRequest, channel: int, policy: Policy, e164: str
    ) -> asyncio.Task[directory_pb2.ResolvePhoneResponse] | None:
        """The directory's answer for a message sent inline whose first rung is a bot, asked now:
        it is a read, so it runs while the message is admitted and stored, one hop off its
        latency; a request refused meanwhile only wasted it (cancelled where it is seen to be, and a
        failure nobody awaits is consumed by the task itself, on every way out)."""
        first_is_bot = channel == TELEGRAM or (
            channel == AUTO and (not policy.ladder or policy.ladder[0].channel == TELEGRAM)
        )
        if not (self.settings.inline_dispatch and first_is_bot):
            return None
        lookup = asyncio.create_task(self.router.resolve(e164, request.bot))
        lookup.add_done_callback(_consume_failure)
        return lookup

    def _validate(self, request: delivery_pb2.SendMessageRequest) -> tuple[Phone, float]:
        """The number and the ttl in seconds; raises INVALID_ARGUMENT with every violation."""
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        phone: Phone | None = None
        try:
            phone = parse_phone(request.phone)
        except InvalidPhoneError as exc:
            problems.add("phone", str(exc))
        generated = request.gateway_code_length != 0
        if generated and request.channel != GATEWAY:
            problems.add("gateway_code_length", "is for channel TELEGRAM_GATEWAY only")
        elif generated and not 4 <= request.gateway_code_length <= 8:
            problems.add("gateway_code_length", "must be 4 to 8 (Telegram's limit)")
        elif generated and request.code:
            problems.add("gateway_code_length", "must not be set with code (the Gateway makes the code)")
        if not (generated and not request.text):
            check_text(problems, "text", request.text, MAX_TEXT)
        check_origin(problems, request.origin)
        problems.check(request.channel in (0, AUTO, TELEGRAM, SMS, GATEWAY), "channel", "unknown channel")
        if request.code and not CODE.match(request.code):
            problems.add("code", "must be 4 to 8 digits (what the Telegram Gateway sends)")
        if request.channel == GATEWAY and not request.code and not generated:
            problems.add("code", "is required with channel TELEGRAM_GATEWAY (the Gateway sends codes, not texts)")
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
                request.code,
                str(request.gateway_code_length),
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
        client_rate, global_rate = rate(policy, "client"), self.settings.limits["global"]
        hits = [
            Hit("client", key(request.client_id), client_rate, subject="client", lease=throughput_lease(client_rate)),
            Hit("global", "all", global_rate, subject="global", lease=throughput_lease(global_rate)),
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


async def _looked_up(
    lookup: asyncio.Task[directory_pb2.ResolvePhoneResponse],
) -> directory_pb2.ResolvePhoneResponse | None:
    """The early lookup's answer; None when it failed in any way: the attempt then asks again and
    handles that failure as its own (the message is stored by now, so it must not fail the call)."""
    try:
        return await lookup
    except Exception:
        return None


def _drop(lookup: asyncio.Task[directory_pb2.ResolvePhoneResponse] | None) -> None:
    """An early lookup no longer wanted: cancelled if still running."""
    if lookup is not None:
        lookup.cancel()


def _consume_failure(lookup: asyncio.Task[directory_pb2.ResolvePhoneResponse]) -> None:
    """Marks an early lookup's failure as seen: whoever wants the answer asks again."""
    if not lookup.cancelled():
        lookup.exception()

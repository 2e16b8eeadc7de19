"""The client Verify API: start (and re-send the same code), check, cancel, read.

A verification is scoped to its client: another client's id reads exactly like an unknown
one. Every code goes out through delivery.SendMessage (purpose VERIFICATION, confirm_days=0),
so delivery's limits, fraud guard and routing apply; its refusals reach the caller unchanged,
and a refused start leaves no pending verification behind.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.verification.v1 import verification_pb2

from services.core.clock import Clock, as_utc
from services.core.counters import Full
from services.core.crypto import Keyring, constant_time_equals
from services.core.end_user import check_origin
from services.core.errors import (
    ServiceError,
    Violations,
    aborted,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
    resource_exhausted,
)
from services.core.ids import is_id, new_id
from services.core.logging import get_logger
from services.core.mongo import Document
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.verification import metrics, templates
from services.verification.codes import (
    DEFAULT_CODE_LENGTH,
    MAX_CODE_LENGTH,
    MIN_CODE_LENGTH,
    CheckOutcome,
    CodeEngine,
    SendRefusal,
    View,
    expire_at,
    generate_code,
    is_code_shaped,
    normalize_typed_code,
)
from services.verification.config import VerifyPolicy
from services.verification.downstream import DownstreamError, call, duration, timestamp
from services.verification.store import CANCELED, PENDING, PHONE_INDEX, Store

log = get_logger(__name__)
GATEWAY_MAX_CODE_LENGTH = 8

MAX_REQUEST_ID = 128
MAX_BOT_ID = 64
_STATUS = {
    "PENDING": common_pb2.VERIFICATION_STATUS_PENDING,
    "APPROVED": common_pb2.VERIFICATION_STATUS_APPROVED,
    "CANCELED": common_pb2.VERIFICATION_STATUS_CANCELED,
    "EXPIRED": common_pb2.VERIFICATION_STATUS_EXPIRED,
    "MAX_ATTEMPTS_REACHED": common_pb2.VERIFICATION_STATUS_MAX_ATTEMPTS_REACHED,
}


def verification_not_found() -> ServiceError:
    return not_found("verification", reason="VERIFICATION_NOT_FOUND")


def requested_channel(view: View) -> int:
    """The channel the latest send asked for (a re-send may ask for another than the start)."""
    return int((view.last_send or {}).get("requested_channel") or view.record["requested_channel"])


@dataclass(frozen=True)
class StartInput:
    client_id: str
    phone: Phone
    channel: int
    code_length: int
    ttl: int
    locale: str
    bot: str
    request_id: str
    origin: common_pb2.Origin
    custom_code: str
    gateway_code: bool = False  # the Telegram Gateway makes the code and checks it


class Verifier:
    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        clock: Clock,
        policy: VerifyPolicy,
        delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.clock = clock
        self.policy = policy
        self.delivery = delivery
        self.engine = CodeEngine(store, store.verifications, keyring, clock)
        self.failed_checks = store.failed_check_counter(clock, policy.failed_checks_per_hour)
        # Clients whose policy allowed custom codes, and when delivery said so.
        self._custom_code_allowed: dict[str, float] = {}

    # Validation --------------------------------------------------------------------------

    def validate_start(self, request: verification_pb2.StartVerificationRequest) -> StartInput:
        v = Violations()
        v.check(bool(request.client_id), "client_id", "required")
        phone: Phone | None = None
        try:
            phone = parse_phone(request.phone)
        except InvalidPhoneError as exc:
            v.add("phone", str(exc))
        channel = request.channel or common_pb2.CHANNEL_AUTO
        v.check(channel in common_pb2.Channel.values(), "channel", "must be AUTO, TELEGRAM, SMS or TELEGRAM_GATEWAY")
        custom = normalize_typed_code(request.custom_code) if request.custom_code else ""
        if custom and not is_code_shaped(custom):
            v.add("custom_code", f"must be {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} digits")
        code_length = request.code_length or (len(custom) if custom else DEFAULT_CODE_LENGTH)
        if not MIN_CODE_LENGTH <= code_length <= MAX_CODE_LENGTH:
            v.add("code_length", f"must be {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH}")
        elif custom and is_code_shaped(custom) and len(custom) != code_length:
            v.add("code_length", "must equal the length of custom_code")
        elif channel == common_pb2.CHANNEL_TELEGRAM_GATEWAY and code_length > GATEWAY_MAX_CODE_LENGTH:
            v.add("code_length", f"must be at most {GATEWAY_MAX_CODE_LENGTH} for TELEGRAM_GATEWAY (Telegram's limit)")
        if request.gateway_code and channel != common_pb2.CHANNEL_TELEGRAM_GATEWAY:
            v.add("gateway_code", "needs channel TELEGRAM_GATEWAY (only the Gateway makes its own codes)")
        if request.gateway_code and custom:
            v.add("gateway_code", "must not be set with custom_code")
        ttl = self.policy.default_ttl
        if request.HasField("ttl"):
            seconds = request.ttl.seconds + request.ttl.nanos / 1e9
            if not self.policy.min_ttl <= seconds <= self.policy.max_ttl or request.ttl.nanos:
                v.add("ttl", f"must be whole seconds from {self.policy.min_ttl} s to {self.policy.max_ttl} s")
            ttl = int(seconds)
        locale = request.locale or templates.DEFAULT_LOCALE
        if not templates.is_supported_locale(locale):
            v.add("locale", f"must be one of {', '.join(sorted(templates.LOCALES))}")
        v.check(len(request.request_id) <= MAX_REQUEST_ID, "request_id", f"at most {MAX_REQUEST_ID} characters")
        v.check(len(request.bot) <= MAX_BOT_ID, "bot", f"at most {MAX_BOT_ID} characters")
        check_origin(v, request.origin)
        v.raise_if_any()
        assert phone is not None
        return StartInput(
            client_id=request.client_id,
            phone=phone,
            channel=channel,
            code_length=code_length,
            ttl=ttl,
            locale=templates.normalize_locale(locale),
            bot=request.bot,
            request_id=request.request_id,
            origin=request.origin,
            custom_code=custom,
            gateway_code=request.gateway_code,
        )

    def fingerprint(self, start: StartInput) -> str:
        """What makes two starts with one request_id "the same request" (keyed, no plaintext)."""
        parts = [
            start.phone.e164,
            str(start.channel),
            str(start.code_length),
            str(start.ttl),
            start.locale,
            start.bot,
            start.custom_code,
            str(start.gateway_code),
        ]
        return self.keyring.blind_index("verification/request", "\x1f".join(parts))

    # Start -------------------------------------------------------------------------------

    async def start(
        self, request: verification_pb2.StartVerificationRequest
    ) -> verification_pb2.StartVerificationResponse:
        start = self.validate_start(request)
        if start.custom_code:
            await self._require_custom_code_allowed(start.client_id)
        now = self.clock.now()
        planned = new_id(int(now.timestamp() * 1000))
        if not start.request_id:
            view = await self._start_or_resend(start, planned)
            return verification_pb2.StartVerificationResponse(verification=self.to_proto(view))
        # The claim names the verification this request will create, so the common outcome needs
        # no write of the claim after it: the record's first send recorded is what completes it.
        earlier = await self.store.claim_request(
            start.client_id, start.request_id, self.fingerprint(start), now, planned, self._first_send_recorded
        )
        if earlier is not None:
            return await self._replay(start, earlier)
        try:
            view = await self._start_or_resend(start, planned)
        except BaseException:
            await self.store.release_request(start.client_id, start.request_id)
            raise
        if view.id != planned:  # the number's pending verification was re-sent instead
            await self.store.complete_request(start.client_id, start.request_id, view.id)
        return verification_pb2.StartVerificationResponse(verification=self.to_proto(view))

    async def _first_send_recorded(self, record_id: str) -> bool:
        """Whether the verification a request claim planned exists and its first send went out."""
        view = await self.engine.load(record_id) if record_id else None
        return view is not None and bool(view.last_message_id)

    async def _replay(self, start: StartInput, earlier: Document) -> verification_pb2.StartVerificationResponse:
        if not constant_time_equals(str(earlier.get("fingerprint", "")), self.fingerprint(start)):
            metrics.verifications.labels("idempotency_conflict").inc()
            raise aborted(
                "request_id was already used for a different verification request", reason="IDEMPOTENCY_CONFLICT"
            )
        verification_id = earlier.get("verification_id")
        if verification_id:
            view = await self.engine.load(str(verification_id), {"client_id": start.client_id})
            if view is None:  # purged after retention
                raise verification_not_found()
        else:
            planned = str(earlier.get("planned_id") or "")
            view = await self.engine.load(planned, {"client_id": start.client_id}) if planned else None
            if view is None or not view.last_message_id:  # not created yet, or its send not out yet
                raise aborted(
                    "a request with this request_id is still in progress; retry",
                    reason="REQUEST_IN_PROGRESS",
                    retry_after=1.0,
                )
        metrics.verifications.labels("replayed").inc()
        return verification_pb2.StartVerificationResponse(verification=self.to_proto(view))

    async def _require_custom_code_allowed(self, client_id: str) -> None:
        """A permission is trusted for `custom_code_policy_ttl` seconds; a refusal is asked again
        every time, so a permission just granted applies at once."""
        now = self.clock.now().timestamp()
        allowed_at = self._custom_code_allowed.get(client_id)
        if allowed_at is not None and now - allowed_at < self.policy.custom_code_policy_ttl:
            return
        try:
            reply = await call(
                lambda: self.delivery.GetClientPolicy(delivery_pb2.GetClientPolicyRequest(client_id=client_id))
            )
        except DownstreamError as err:
            raise err.service_error() from None
        if not reply.policy.allow_custom_code:
            self._custom_code_allowed.pop(client_id, None)
            raise permission_denied("CUSTOM_CODE_NOT_ALLOWED", "the client's policy does not allow custom codes")
        if len(self._custom_code_allowed) > 10_000:
            self._custom_code_allowed.clear()
        self._custom_code_allowed[client_id] = now

    def keys(self, start: StartInput) -> tuple[str, str]:
        """(phone blind index, pending key): one pending verification per client and number."""
        phone_bi = self.keyring.blind_index(PHONE_INDEX, start.phone.e164)
        return phone_bi, f"{start.client_id}\x1f{phone_bi}"

    async def _start_or_resend(self, start: StartInput, record_id: str) -> View:
        """A new verification, created as `record_id`, or the number's pending one re-sent."""
        _, pending_key = self.keys(start)
        for _ in range(5):
            # A new verification first: the unique pending_key index refuses it while one is
            # pending for the number, and only then is that one looked up, by the same index.
            created = await self._create(start, record_id)
            if created is not None:
                return created
            existing = await self.store.holding(self.store.verifications, pending_key)
            if existing is None:
                continue  # it ended between the refused insert and the lookup: create again
            view = self.engine.view(existing)
            if view.record["status"] == PENDING and self.engine.is_lapsed(view.record):
                view = await self.engine.settle_lapsed(view)
            if view.pending:
                if start.custom_code and not self.keyring.code_matches(
                    str(view.record["code_hash"]), view.id, start.custom_code
                ):
                    raise failed_precondition(
                        "VERIFICATION_PENDING",
                        "a verification for this number is pending with another code; cancel it first",
                        [("VERIFICATION", "custom_code", "another code is pending for this number")],
                    )
                resent = await self._resend(view, start)
                if resent is not None:
                    return resent
        raise aborted("the verification changed concurrently; retry", reason="CONFLICT")

    async def issue(self, start: StartInput, record_id: str = "") -> tuple[Document, str] | None:
        """Store a new pending verification (as `record_id`, else a new id) and its code, not
        sent yet. None if one is pending."""
        phone_bi, pending_key = self.keys(start)
        now = self.clock.now()
        record_id = record_id or new_id(int(now.timestamp() * 1000))
        # A Gateway-made code is Telegram's alone: nothing of it is stored here.
        code = "" if start.gateway_code else start.custom_code or generate_code(start.code_length)
        record: Document = {
            "_id": record_id,
            "client_id": start.client_id,
            "request_id": start.request_id,
            "pending_key": pending_key,
            "phone_bi": phone_bi,
            "phone": self.engine.seal_phone(record_id, start.phone.e164),
            "phone_masked": start.phone.masked,
            "region": start.phone.region,
            "requested_channel": start.channel,
            "bot": start.bot,
            "status": PENDING,
            "code_length": start.code_length,
            "custom_code": bool(start.custom_code),
            "locale": start.locale,
            "ttl": start.ttl,
            **({"gateway_code": True} if start.gateway_code else self.engine.code_fields(record_id, code)),
            "max_attempts": self.policy.max_checks,
            "max_sends": self.policy.max_sends,
            "created_at": now,
            "updated_at": now,
            "expire_at": now + timedelta(seconds=start.ttl),
        }
        await self.store.feed.append(start.client_id, record_id, now)  # first: listed once it exists
        if not await self.engine.insert(record):
            return None  # one is pending for the number: re-send that instead
        return record, code

    async def _create(self, start: StartInput, record_id: str) -> View | None:
        issued = await self.issue(start, record_id)
        if issued is None:
            return None
        record, code = issued
        record_id = str(record["_id"])
        try:
            message = await self._send(record, code, start, 1)
        except BaseException as exc:
            await self._discard(record)
            if isinstance(exc, DownstreamError):
                metrics.verifications.labels("refused").inc()
                log.info("verification_refused", verification_id=record_id, reason=exc.reason)
                raise exc.service_error() from None
            raise
        view = await self.engine.record_send(
            self.engine.view(record), {"message_id": message.id, "channel": message.channel}
        )
        metrics.verifications.labels("started").inc()
        log.info(
            "verification_started",
            verification_id=record_id,
            client_id=start.client_id,
            channel=common_pb2.Channel.Name(message.channel),
            message_id=message.id,
        )
        return view

    async def _discard(self, record: Document) -> None:
        """A start that delivery refused leaves nothing behind."""
        await self.store.verifications.delete_one({"_id": record["_id"], "status": PENDING})

    async def _resend(self, view: View, start: StartInput) -> View | None:
        reservation = await self.engine.reserve_send(view, self.policy.resend_cooldown)
        if reservation.refusal is SendRefusal.NOT_PENDING:
            return None
        if reservation.refusal is SendRefusal.MAX_SENDS:
            metrics.verifications.labels("max_sends").inc()
            raise resource_exhausted(
                "MAX_SENDS_REACHED",
                "the code was sent the maximum number of times; check it or wait for it to expire",
                reservation.retry_after,
                [("verification", f"at most {self.policy.max_sends} sends per verification")],
            )
        if reservation.refusal is SendRefusal.TOO_SOON:
            metrics.verifications.labels("resend_too_soon").inc()
            raise resource_exhausted(
                "RESEND_TOO_SOON",
                "the code was sent moments ago; retry later",
                reservation.retry_after,
                [("verification", f"one send per {math.ceil(self.policy.resend_cooldown)} s")],
            )
        number = reservation.number
        record = reservation.view.record
        try:
            # A Gateway-made code: each send is a new one, and the check asks about the latest.
            code = "" if record.get("gateway_code") else self.engine.open_code(record)
            message = await self._send(record, code, start, number)
        except BaseException as exc:
            await self.engine.undo_send(view, number)
            if isinstance(exc, DownstreamError):
                metrics.verifications.labels("refused").inc()
                log.info("verification_resend_refused", verification_id=view.id, reason=exc.reason)
                raise exc.service_error() from None
            raise
        sent = {"message_id": message.id, "channel": message.channel, "requested_channel": start.channel}
        resent = await self.engine.record_send(reservation.view, sent)
        metrics.verifications.labels("resent").inc()
        log.info("verification_resent", verification_id=view.id, send_count=number, message_id=message.id)
        return resent

    async def _send(self, record: Document, code: str, start: StartInput, send_number: int) -> common_pb2.Message:
        remaining = (expire_at(record) - self.clock.now()).total_seconds()
        request = delivery_pb2.SendMessageRequest(
            client_id=start.client_id,
            phone=start.phone.e164,
            text=templates.verification_text(str(record["locale"]), code, remaining) if code else "",
            # The bare code too: the Telegram Gateway sends codes of 4 to 8 digits, not texts.
            code=code if len(code) <= GATEWAY_MAX_CODE_LENGTH else "",
            gateway_code_length=0 if code else int(record["code_length"]),
            channel=start.channel,  # type: ignore[arg-type]
            bot=start.bot or str(record.get("bot", "")),
            confirm_days=0,
            ttl=duration(max(1, math.floor(remaining))),
            protect_content=True,
            request_id=f"verification:{record['_id']}:{send_number}",
            origin=start.origin,
            purpose=delivery_pb2.MESSAGE_PURPOSE_VERIFICATION,
        )
        reply = await call(lambda: self.delivery.SendMessage(request))
        return reply.message

    # Check, cancel, get --------------------------------------------------------------------

    async def _owned(self, client_id: str, verification_id: str) -> View:
        if not client_id:
            raise invalid_argument([("client_id", "required")])
        if not verification_id or not is_id(verification_id):
            raise verification_not_found()
        view = await self.engine.load(verification_id, {"client_id": client_id})
        if view is None:
            raise verification_not_found()
        return view

    async def check(self, client_id: str, verification_id: str, raw_code: str) -> tuple[View, bool]:
        code = normalize_typed_code(raw_code)
        if not is_code_shaped(code):
            raise invalid_argument([("code", f"must be {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} digits")])
        view = await self._owned(client_id, verification_id)
        matcher = self._gateway_matcher(view) if view.record.get("gateway_code") else None
        result = await self.engine.check_capped(view, code, self.failed_checks, str(view.record["phone_bi"]), matcher)
        if isinstance(result, Full):
            metrics.verifications.labels("too_many_failed_checks").inc()
            raise resource_exhausted(
                "TOO_MANY_FAILED_CHECKS",
                "too many wrong codes for this number; retry later",
                result.retry_after,
                [("phone", f"at most {self.policy.failed_checks_per_hour} failed checks per hour")],
            )
        outcome = {
            CheckOutcome.APPROVED: "approved",
            CheckOutcome.WRONG_CODE: "wrong_code",
            CheckOutcome.EXHAUSTED: "max_attempts",
            CheckOutcome.EXPIRED: "expired",
            CheckOutcome.FINAL: "not_pending",
        }[result.outcome]
        metrics.verifications.labels(outcome).inc()
        log.info(
            "verification_checked", verification_id=verification_id, outcome=outcome, attempts_left=result.attempts_left
        )
        approved = result.outcome is CheckOutcome.APPROVED
        if approved:
            await self._record_conversion(result.view)
        return result.view, approved

    def _gateway_matcher(self, view: View) -> Callable[[str], Awaitable[bool]]:
        """Asks the Telegram Gateway about a code it made (its latest send's message)."""
        message_id = view.last_message_id
        client_id = str(view.record["client_id"])

        async def matches(code: str) -> bool:
            request = delivery_pb2.CheckGatewayCodeRequest(client_id=client_id, message_id=message_id, code=code)
            try:
                reply = await call(lambda: self.delivery.CheckGatewayCode(request))
            except DownstreamError as err:  # UNAVAILABLE with retry guidance while the Gateway is away
                raise err.service_error() from None
            return reply.valid

        return matches

    async def _record_conversion(self, view: View) -> None:
        message_id = view.last_message_id
        # A code sent by a bot alone (channel TELEGRAM: no other rung, nothing paid) is no
        # sample for the fraud guard, which counts the codes of SMS and Gateway legs.
        if not message_id or requested_channel(view) == common_pb2.CHANNEL_TELEGRAM:
            return
        request = delivery_pb2.RecordConversionRequest(client_id=str(view.record["client_id"]), message_id=message_id)
        try:
            await call(lambda: self.delivery.RecordConversion(request))
        except DownstreamError as err:
            # The approval stands; the fraud guard only misses one conversion sample.
            log.warning("conversion_not_recorded", verification_id=view.id, reason=err.reason)

    async def cancel(self, client_id: str, verification_id: str) -> View:
        view = await self._owned(client_id, verification_id)
        if view.pending:
            won, after = await self.engine.decide(verification_id, CANCELED)
            view = after or view
            if won:
                metrics.verifications.labels("canceled").inc()
                log.info("verification_canceled", verification_id=verification_id)
                await self._withdraw(view)
                return view
        view = await self.engine.settle_lapsed(view)
        if view.status == CANCELED:
            return view
        raise failed_precondition(
            "VERIFICATION_NOT_PENDING",
            f"the verification is {view.status.lower().replace('_', ' ')}",
            [("STATUS", "verification", "only a pending verification can be canceled")],
        )

    async def _withdraw(self, view: View) -> None:
        """The code's message is canceled too: one still queued is not sent, a Telegram Gateway code
        not yet delivered is revoked. A message past that (a bot sent it, an SMS went out) stays."""
        message_id = view.last_message_id
        if not message_id:
            return
        request = delivery_pb2.CancelMessageRequest(client_id=str(view.record["client_id"]), id=message_id)
        try:
            await call(lambda: self.delivery.CancelMessage(request))
        except DownstreamError as err:
            log.info("verification_message_not_canceled", verification_id=view.id, reason=err.reason)

    async def get(self, client_id: str, verification_id: str) -> View:
        return await self.engine.settle_lapsed(await self._owned(client_id, verification_id))

    # Presentation ------------------------------------------------------------------------

    def to_proto(self, view: View) -> common_pb2.Verification:
        record = view.record
        send = view.last_send or {}
        out = common_pb2.Verification(
            id=view.id,
            request_id=str(record.get("request_id", "")),
            phone_masked=str(record["phone_masked"]),
            requested_channel=requested_channel(view),  # type: ignore[arg-type]
            channel=int(send.get("channel", 0)),  # type: ignore[arg-type]
            status=_STATUS[view.status],
            code_length=int(record["code_length"]),
            locale=str(record["locale"]),
            send_count=view.send_count,
            check_attempts_left=view.attempts_left if view.pending else 0,
            message_id=str(send.get("message_id", "")),
        )
        out.create_time.CopyFrom(timestamp(as_utc(record["created_at"])))
        out.update_time.CopyFrom(timestamp(max(as_utc(record["updated_at"]), view.last_send_at)))
        out.expire_time.CopyFrom(timestamp(expire_at(record)))
        if view.pending and view.send_count < int(record["max_sends"]):
            out.resend_time.CopyFrom(timestamp(view.last_send_at + timedelta(seconds=self.policy.resend_cooldown)))
        return out

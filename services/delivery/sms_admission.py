"""Whether a paid leg may go out: the checks every SMS, and every Telegram Gateway code, passes
before it is stored or sent.

In order: for SMS the service's SMS countries and the client's SMS countries (not for the
re-confirmation SMS, which is ours); then for both the client's CAPTCHA rule SMS (a paid send), the
fraud guard (fraud.py: line type, rules, the scored signals; a pumping attack costs on either leg;
its refusals name the deciding signal in ErrorInfo metadata), then the rate limits of the end
user's IP and, for SMS, the client's daily SMS cap (billed SMS only; the limiter counts both or
neither). A refusal is a ServiceError for the caller to answer (SendMessage) or to
record on the message (a leg decided at dispatch). A ladder rung's own daily cap is `take_rung_cap`.
"""

from __future__ import annotations

from otpgate.common.v1 import common_pb2

from services.core.end_user import canonical_ip
from services.core.errors import ServiceError, failed_precondition, permission_denied, resource_exhausted
from services.delivery.fraud import BLOCK, CAPTCHA, LINE_TYPE_REFUSALS, Decision, FraudGuard, SmsLeg
from services.delivery.ladder import cap_name
from services.delivery.limits import Hit, Limiter, Rate, RateLimited
from services.delivery.message_crypto import MessageCrypto
from services.delivery.policy import Policy
from services.delivery.record import P_CONFIRMATION
from services.delivery.settings import EngineSettings


class SmsAdmission:
    def __init__(self, limiter: Limiter, fraud: FraudGuard, crypto: MessageCrypto, settings: EngineSettings) -> None:
        self.limiter = limiter
        self.fraud = fraud
        self.crypto = crypto
        self.settings = settings

    async def admit(
        self,
        leg: SmsLeg,
        policy: Policy,
        origin: common_pb2.Origin,
        billed: bool,
        purpose: int,
        channel: int = common_pb2.CHANNEL_SMS,
    ) -> Decision:
        """The fraud guard's decision to let it through (hand it to record_sms with the stored message);
        raises the refusal (PERMISSION_DENIED, FAILED_PRECONDITION CAPTCHA_REQUIRED, RESOURCE_EXHAUSTED)."""
        region = leg.phone.region
        sms = channel == common_pb2.CHANNEL_SMS
        what = "SMS" if sms else "Telegram Gateway code"
        denied = "SMS_NOT_ALLOWED" if sms else "GATEWAY_NOT_ALLOWED"
        if sms and self.settings.sms_countries and region not in self.settings.sms_countries:
            raise permission_denied("SMS_NOT_ALLOWED", "SMS to this country is not offered")
        if sms and purpose != P_CONFIRMATION and not policy.sms_allowed(region):
            raise permission_denied("SMS_NOT_ALLOWED", "SMS to this country is not allowed for this client")
        if (
            policy.captcha_rule == common_pb2.CAPTCHA_RULE_SMS
            and purpose != P_CONFIRMATION
            and not origin.captcha_verified
        ):
            raise captcha_required()
        decision = await self.fraud.evaluate(leg)
        if decision.decision == BLOCK:
            if decision.reason in LINE_TYPE_REFUSALS:
                refusal = permission_denied(denied, f"no {what} to this kind of number ({decision.reason})")
            else:
                refusal = permission_denied(
                    "FRAUD_SUSPECTED", f"{what} refused by the fraud guard: {decision.detail} ({decision.reason})"
                )
            refusal.metadata = decision.metadata
            raise refusal
        if decision.decision == CAPTCHA:
            refusal = captcha_required(f"{decision.detail} ({decision.reason})")
            refusal.metadata = decision.metadata
            raise refusal
        hits: list[Hit] = []
        if origin.ip:
            rate = self.settings.rate(policy, "ip_sms")
            ip = canonical_ip(origin.ip)
            hits.append(Hit("ip_sms", self.crypto.limit_key("ip:" + ip), rate, subject="origin.ip"))
        if sms and billed and policy.daily_sms_cap > 0:
            hits.append(
                Hit(
                    "daily_sms_cap",
                    self.crypto.limit_key(leg.client_id),
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
        return decision

    async def take_rung_cap(self, client_id: str, channel: int, cap: int) -> float | None:
        """Counts one message against a ladder rung's daily cap; the seconds until the cap frees
        up when it is reached (None: counted)."""
        hit = Hit(
            cap_name(channel), self.crypto.limit_key(client_id), Rate(cap, 86400), sliding=False, subject="client"
        )
        try:
            await self.limiter.acquire([hit])
        except RateLimited as exc:
            return exc.retry_after
        return None


def captcha_required(why: str = "") -> ServiceError:
    message = "solve a CAPTCHA and send the request again" + (f": {why}" if why else "")
    return failed_precondition("CAPTCHA_REQUIRED", message, [("CAPTCHA", "captcha_token", "required")])

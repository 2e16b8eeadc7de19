"""Whether an SMS leg may go out: the checks every SMS passes before it is stored or sent.

In order: the service's SMS countries, the client's SMS countries (not for the re-confirmation
SMS, which is ours), the client's CAPTCHA rule SMS, the fraud guard (fraud.py: line type, rules,
the scored signals; its refusals name the deciding signal in ErrorInfo metadata), then one insert of rate-limit slots for the end user's IP and the client's daily SMS
cap (billed SMS only; the limiter takes both slots or neither). A refusal is a ServiceError for the
caller to answer (SendMessage) or to record on the message (an SMS fallback decided at dispatch).
"""

from __future__ import annotations

from otpgate.common.v1 import common_pb2

from services.core.end_user import canonical_ip
from services.core.errors import ServiceError, failed_precondition, permission_denied, resource_exhausted
from services.delivery.fraud import BLOCK, CAPTCHA, LINE_TYPE_REFUSALS, Decision, FraudGuard, SmsLeg
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
        self, leg: SmsLeg, policy: Policy, origin: common_pb2.Origin, billed: bool, purpose: int
    ) -> Decision:
        """The fraud guard's decision to let it through (hand it to record_sms with the stored message);
        raises the refusal (PERMISSION_DENIED, FAILED_PRECONDITION CAPTCHA_REQUIRED, RESOURCE_EXHAUSTED)."""
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
            raise captcha_required()
        decision = await self.fraud.evaluate(leg)
        if decision.decision == BLOCK:
            if decision.reason in LINE_TYPE_REFUSALS:
                refusal = permission_denied("SMS_NOT_ALLOWED", f"no SMS to this kind of number ({decision.reason})")
            else:
                refusal = permission_denied(
                    "FRAUD_SUSPECTED", f"SMS refused by the fraud guard: {decision.detail} ({decision.reason})"
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
        if billed and policy.daily_sms_cap > 0:
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


def captcha_required(why: str = "") -> ServiceError:
    message = "solve a CAPTCHA and send the request again" + (f": {why}" if why else "")
    return failed_precondition("CAPTCHA_REQUIRED", message, [("CAPTCHA", "captcha_token", "required")])

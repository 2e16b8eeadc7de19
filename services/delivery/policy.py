"""Client delivery policies: defaults, validation, FieldMask updates, storage form.

SMS countries mean what they say: a list replaces "any" (setting sms_countries without
sms_countries_any turns "any" off; both at once is refused), and until an operator sets them a
client has the service's default, read fresh each time: no country in production, any in
sandbox mode. A policy says which it is (sms_countries_source) and which service-wide list
narrows it (service_sms_countries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from otpgate.common.v1 import common_pb2
from pymongo.asynchronous.collection import AsyncCollection

from services.core.clock import Clock, as_utc
from services.core.crypto import Keyring, SealContext
from services.core.errors import Violations, invalid_argument
from services.core.mongo import Document
from services.delivery.limits import Rate

_REGION = re.compile(r"^[A-Z]{2}$")
LADDER_CHANNELS = (common_pb2.CHANNEL_TELEGRAM, common_pb2.CHANNEL_TELEGRAM_GATEWAY, common_pb2.CHANNEL_SMS)


@dataclass(frozen=True)
class Rung:
    """One rung of a client's ladder: a channel, the regions it serves (empty: any), a daily cap,
    and (the Gateway rung) how long a code may stay undelivered before the message climbs."""

    channel: int
    countries: tuple[str, ...] = ()
    daily_cap: int = 0
    fallback_after: float = 0.0  # seconds; 0: wait for the ttl

    def serves(self, region: str) -> bool:
        return not self.countries or region in self.countries


# A Gateway rung's fallback_after, s: Telegram's shortest ttl is 30 s and its longest 3600 s; a
# code is usually delivered within seconds when the person's device is online.
FALLBACK_AFTER = (15.0, 3600.0)


def _step(rung: Rung) -> common_pb2.LadderStep:
    step = common_pb2.LadderStep(channel=rung.channel, countries=list(rung.countries), daily_cap=rung.daily_cap)  # type: ignore[arg-type]
    if rung.fallback_after:
        step.fallback_after.FromNanoseconds(round(rung.fallback_after * 1e9))
    return step


RATE_LIMIT_FIELDS = ("client", "phone_short", "phone_daily", "ip_sms", "session", "reachability")
MAX_WINDOW_SECONDS = 31 * 86400


@dataclass(frozen=True)
class Policy:
    client_id: str
    allowed_countries: tuple[str, ...] = ()
    sms_countries: tuple[str, ...] = ()
    sms_countries_any: bool = False
    # Whether an operator set sms_countries / sms_countries_any (else they are the service default).
    sms_countries_set: bool = False
    sms_fallback: bool = False
    default_confirm_days: int = 0
    captcha_rule: int = common_pb2.CAPTCHA_RULE_ON_RISK
    daily_sms_cap: int = 0
    # Overrides by name (see RATE_LIMIT_FIELDS); absent: service default.
    rate_limits: dict[str, Rate] = field(default_factory=dict)
    fraud_mode: int = common_pb2.FRAUD_MODE_UNSPECIFIED
    allow_custom_code: bool = False
    webhook_secret_sealed: bytes | None = None
    update_time: datetime | None = None
    stored: bool = False
    ladder: tuple[Rung, ...] = ()
    gateway_token_sealed: bytes | None = None

    def country_allowed(self, region: str) -> bool:
        return not self.allowed_countries or region in self.allowed_countries

    def sms_allowed(self, region: str) -> bool:
        return self.sms_countries_any or region in self.sms_countries

    def webhook_secret(self, keyring: Keyring) -> str:
        if not self.webhook_secret_sealed:
            return ""
        return keyring.open_str(self.webhook_secret_sealed, SealContext("policies", self.client_id, "webhook_secret"))

    def gateway_token(self, keyring: Keyring) -> str:
        """The client's own Telegram Gateway token, "" when it uses the service's."""
        if not self.gateway_token_sealed:
            return ""
        return keyring.open_str(
            self.gateway_token_sealed, SealContext("policies", self.client_id, "telegram_gateway_token")
        )

    def to_proto(self) -> common_pb2.ClientPolicy:
        limits = common_pb2.RateLimits()
        for name, rate in self.rate_limits.items():
            target = getattr(limits, name)
            target.limit = rate.limit
            target.window.CopyFrom(duration_pb2.Duration(seconds=int(rate.window)))
        out = common_pb2.ClientPolicy(
            client_id=self.client_id,
            allowed_countries=list(self.allowed_countries),
            sms_countries=list(self.sms_countries),
            sms_countries_any=self.sms_countries_any,
            sms_fallback=self.sms_fallback,
            default_confirm_days=self.default_confirm_days,
            captcha_rule=self.captcha_rule,  # type: ignore[arg-type]
            daily_sms_cap=self.daily_sms_cap,
            rate_limits=limits,
            fraud_mode=self.fraud_mode,  # type: ignore[arg-type]
            allow_custom_code=self.allow_custom_code,
            webhook_secret_set=bool(self.webhook_secret_sealed),
            ladder=[_step(r) for r in self.ladder],
            telegram_gateway_token_set=bool(self.gateway_token_sealed),
        )
        if self.update_time is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(self.update_time)
            out.update_time.CopyFrom(stamp)
        return out


def default_policy(client_id: str, sms_any: bool) -> Policy:
    return Policy(client_id=client_id, sms_countries_any=sms_any)


def _from_doc(doc: Document) -> Policy:
    sms_countries = tuple(doc.get("sms_countries", ()))
    sms_any = bool(doc.get("sms_countries_any", False))
    # Policies stored before the field existed: what they name was somebody's choice.
    chosen = bool(doc["sms_countries_set"]) if "sms_countries_set" in doc else bool(sms_countries) or sms_any
    return Policy(
        client_id=str(doc["_id"]),
        allowed_countries=tuple(doc.get("allowed_countries", ())),
        sms_countries=sms_countries,
        sms_countries_any=sms_any,
        sms_countries_set=chosen,
        sms_fallback=bool(doc.get("sms_fallback", False)),
        default_confirm_days=int(doc.get("default_confirm_days", 0)),
        captcha_rule=int(doc.get("captcha_rule", common_pb2.CAPTCHA_RULE_ON_RISK)),
        daily_sms_cap=int(doc.get("daily_sms_cap", 0)),
        rate_limits={k: Rate(int(v["limit"]), float(v["window"])) for k, v in (doc.get("rate_limits") or {}).items()},
        fraud_mode=int(doc.get("fraud_mode", 0)),
        allow_custom_code=bool(doc.get("allow_custom_code", False)),
        webhook_secret_sealed=bytes(doc["webhook_secret"]) if doc.get("webhook_secret") else None,
        update_time=as_utc(doc["update_time"]) if doc.get("update_time") else None,
        stored=True,
        ladder=tuple(
            Rung(
                int(r["channel"]),
                tuple(r.get("countries", ())),
                int(r.get("daily_cap", 0)),
                float(r.get("fallback_after", 0.0)),
            )
            for r in doc.get("ladder") or ()
        ),
        gateway_token_sealed=bytes(doc["telegram_gateway_token"]) if doc.get("telegram_gateway_token") else None,
    )


def _to_doc(policy: Policy) -> Document:
    return {
        "_id": policy.client_id,
        "allowed_countries": list(policy.allowed_countries),
        "sms_countries": list(policy.sms_countries),
        "sms_countries_any": policy.sms_countries_any,
        "sms_countries_set": policy.sms_countries_set,
        "sms_fallback": policy.sms_fallback,
        "default_confirm_days": policy.default_confirm_days,
        "captcha_rule": policy.captcha_rule,
        "daily_sms_cap": policy.daily_sms_cap,
        "rate_limits": {k: {"limit": r.limit, "window": r.window} for k, r in policy.rate_limits.items()},
        "fraud_mode": policy.fraud_mode,
        "allow_custom_code": policy.allow_custom_code,
        "webhook_secret": policy.webhook_secret_sealed,
        "update_time": policy.update_time,
        "ladder": [
            {
                "channel": r.channel,
                "countries": list(r.countries),
                "daily_cap": r.daily_cap,
                **({"fallback_after": r.fallback_after} if r.fallback_after else {}),
            }
            for r in policy.ladder
        ],
        "telegram_gateway_token": policy.gateway_token_sealed,
    }


_TOP_FIELDS = {f.name for f in common_pb2.ClientPolicy.DESCRIPTOR.fields} - {
    "client_id",
    "webhook_secret_set",
    "telegram_gateway_token_set",
    "update_time",
    "sms_countries_source",
    "service_sms_countries",
}


def _validate(proto: common_pb2.ClientPolicy, paths: set[str]) -> None:
    problems = Violations()
    for name in ("allowed_countries", "sms_countries"):
        if name in paths:
            for i, region in enumerate(getattr(proto, name)):
                if not _REGION.match(region.upper()):
                    problems.add(f"policy.{name}[{i}]", "must be an ISO 3166-1 alpha-2 region, e.g. DE")
    if "default_confirm_days" in paths and not 0 <= proto.default_confirm_days <= 3650:
        problems.add("policy.default_confirm_days", "must be between 0 and 3650")
    if "daily_sms_cap" in paths and proto.daily_sms_cap < 0:
        problems.add("policy.daily_sms_cap", "must be >= 0")
    if "captcha_rule" in paths and proto.captcha_rule not in common_pb2.CaptchaRule.values():
        problems.add("policy.captcha_rule", "unknown value")
    if "fraud_mode" in paths and proto.fraud_mode not in common_pb2.FraudMode.values():
        problems.add("policy.fraud_mode", "unknown value")
    for name in RATE_LIMIT_FIELDS:
        if f"rate_limits.{name}" in paths or "rate_limits" in paths:
            rate = getattr(proto.rate_limits, name)
            seconds = rate.window.seconds + rate.window.nanos / 1e9
            if rate.limit < 0:
                problems.add(f"policy.rate_limits.{name}.limit", "must be >= 0")
            if rate.limit > 0 and not 1 <= seconds <= MAX_WINDOW_SECONDS:
                problems.add(f"policy.rate_limits.{name}.window", "must be between 1 second and 31 days")
    if {"sms_countries", "sms_countries_any"} <= paths and proto.sms_countries_any and proto.sms_countries:
        problems.add("policy.sms_countries_any", "cannot be true while sms_countries names countries")
    if "webhook_secret" in paths and proto.webhook_secret and len(proto.webhook_secret) < 16:
        problems.add("policy.webhook_secret", "must be at least 16 characters")
    if "telegram_gateway_token" in paths and proto.telegram_gateway_token:
        token = proto.telegram_gateway_token
        if not 16 <= len(token) <= 256 or not token.isascii() or not token.isprintable() or " " in token:
            problems.add(
                "policy.telegram_gateway_token", "must be the Gateway API token (16 to 256 printable characters)"
            )
    if "ladder" in paths:
        seen: set[int] = set()
        problems.check(len(proto.ladder) <= len(LADDER_CHANNELS), "policy.ladder", "at most one rung per channel")
        for i, step in enumerate(proto.ladder):
            if step.channel not in LADDER_CHANNELS:
                problems.add(f"policy.ladder[{i}].channel", "must be TELEGRAM, TELEGRAM_GATEWAY or SMS")
            elif step.channel in seen:
                problems.add(f"policy.ladder[{i}].channel", "is already a rung of the ladder")
            seen.add(step.channel)
            if step.daily_cap < 0:
                problems.add(f"policy.ladder[{i}].daily_cap", "must be >= 0")
            if step.HasField("fallback_after"):
                after = step.fallback_after.seconds + step.fallback_after.nanos / 1e9
                if step.channel != common_pb2.CHANNEL_TELEGRAM_GATEWAY:
                    problems.add(
                        f"policy.ladder[{i}].fallback_after",
                        "only the TELEGRAM_GATEWAY rung can fall back on a timeout (it alone says a message "
                        "was not delivered, and can revoke it)",
                    )
                elif i == len(proto.ladder) - 1:
                    problems.add(f"policy.ladder[{i}].fallback_after", "needs a rung after it to fall back to")
                elif not FALLBACK_AFTER[0] <= after <= FALLBACK_AFTER[1]:
                    problems.add(f"policy.ladder[{i}].fallback_after", "must be between 15 seconds and 1 hour")
            for j, region in enumerate(step.countries):
                if not _REGION.match(region.upper()):
                    problems.add(f"policy.ladder[{i}].countries[{j}]", "must be an ISO 3166-1 alpha-2 region, e.g. DE")
    problems.raise_if_any()


def apply_update(
    current: Policy,
    proto: common_pb2.ClientPolicy,
    mask: field_mask_pb2.FieldMask,
    keyring: Keyring,
    now: datetime,
) -> Policy:
    paths = set(mask.paths) if mask.paths else set(_TOP_FIELDS)
    unknown = [
        p
        for p in paths
        if p.split(".")[0] not in _TOP_FIELDS
        or (p.startswith("rate_limits.") and p.split(".")[1] not in RATE_LIMIT_FIELDS)
    ]
    if unknown:
        raise invalid_argument([("update_mask", f"unknown or read-only field {p!r}") for p in sorted(unknown)])
    _validate(proto, paths)
    updated = current
    simple = (
        "sms_countries_any",
        "sms_fallback",
        "default_confirm_days",
        "captcha_rule",
        "daily_sms_cap",
        "fraud_mode",
        "allow_custom_code",
    )
    for name in simple:
        if name in paths:
            changes: dict[str, Any] = {name: getattr(proto, name)}
            updated = replace(updated, **changes)
    if "allowed_countries" in paths:
        updated = replace(updated, allowed_countries=tuple(sorted({r.upper() for r in proto.allowed_countries})))
    if "sms_countries" in paths:
        updated = replace(updated, sms_countries=tuple(sorted({r.upper() for r in proto.sms_countries})))
        if "sms_countries_any" not in paths:
            updated = replace(updated, sms_countries_any=False)  # a list replaces "any"
    if "sms_countries_any" in paths and proto.sms_countries_any and "sms_countries" not in paths:
        updated = replace(updated, sms_countries=())  # "any" replaces a list
    if {"sms_countries", "sms_countries_any"} & paths:
        updated = replace(updated, sms_countries_set=True)
    limits = dict(updated.rate_limits)
    for name in RATE_LIMIT_FIELDS:
        if "rate_limits" in paths or f"rate_limits.{name}" in paths:
            rate = getattr(proto.rate_limits, name)
            if rate.limit == 0:
                limits.pop(name, None)
            else:
                limits[name] = Rate(rate.limit, float(rate.window.seconds + rate.window.nanos / 1e9))
    updated = replace(updated, rate_limits=limits)
    if "webhook_secret" in paths:
        sealed = (
            keyring.seal(proto.webhook_secret, SealContext("policies", current.client_id, "webhook_secret"))
            if proto.webhook_secret
            else None
        )
        updated = replace(updated, webhook_secret_sealed=sealed)
    if "telegram_gateway_token" in paths:
        token = proto.telegram_gateway_token
        context = SealContext("policies", current.client_id, "telegram_gateway_token")
        updated = replace(updated, gateway_token_sealed=keyring.seal(token, context) if token else None)
    if "ladder" in paths:
        ladder = tuple(
            Rung(
                int(step.channel),
                tuple(sorted({r.upper() for r in step.countries})),
                int(step.daily_cap),
                step.fallback_after.seconds + step.fallback_after.nanos / 1e9,
            )
            for step in proto.ladder
        )
        updated = replace(updated, ladder=ladder)
    return replace(updated, update_time=now, stored=True)


class PolicyStore:
    """Client policies, read on every message: kept in memory for `cache_ttl` seconds, so a change
    made through another replica applies here within that time (at once through this one)."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        clock: Clock,
        sms_any_default: bool,
        cache_ttl: float = 0.0,
        *,
        sandbox: bool = False,
        service_sms_countries: tuple[str, ...] = (),
    ) -> None:
        self._coll = collection
        self._clock = clock
        self._sms_any_default = sms_any_default
        self._cache_ttl = cache_ttl
        self._sandbox = sandbox
        self._service_sms_countries = service_sms_countries
        self._cache: dict[str, tuple[float, Policy]] = {}

    async def get(self, client_id: str) -> Policy:
        now = self._clock.now().timestamp()
        cached = self._cache.get(client_id)
        if cached is not None and now - cached[0] < self._cache_ttl:
            return cached[1]
        policy = await self._read(client_id)
        if self._cache_ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[client_id] = (now, policy)
        return policy

    async def _read(self, client_id: str) -> Policy:
        doc = await self._coll.find_one({"_id": client_id})
        policy = _from_doc(doc) if doc else default_policy(client_id, self._sms_any_default)
        if not policy.sms_countries_set:  # the default applies as it is now, not as it was stored
            policy = replace(policy, sms_countries=(), sms_countries_any=self._sms_any_default)
        return policy

    def to_proto(self, policy: Policy) -> common_pb2.ClientPolicy:
        """The policy as clients and operators read it: with where its SMS countries come from."""
        out = policy.to_proto()
        if policy.sms_countries_set:
            out.sms_countries_source = common_pb2.SMS_COUNTRIES_SOURCE_POLICY
        elif self._sandbox and policy.sms_countries_any:
            out.sms_countries_source = common_pb2.SMS_COUNTRIES_SOURCE_SANDBOX_DEFAULT
        else:
            out.sms_countries_source = common_pb2.SMS_COUNTRIES_SOURCE_SERVICE_DEFAULT
        out.service_sms_countries.extend(self._service_sms_countries)
        return out

    async def update(self, proto: common_pb2.ClientPolicy, mask: field_mask_pb2.FieldMask, keyring: Keyring) -> Policy:
        self._cache.pop(proto.client_id, None)
        current = await self._read(proto.client_id)
        updated = apply_update(current, proto, mask, keyring, self._clock.now())
        await self._coll.replace_one({"_id": updated.client_id}, _to_doc(updated), upsert=True)
        self._cache.pop(updated.client_id, None)
        return updated

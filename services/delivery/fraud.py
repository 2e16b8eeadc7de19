"""The SMS fraud guard (SMS pumping defence), applied to every SMS leg.

Checks, in order: line type (premium-rate, shared-cost, VoIP, unknown never get SMS),
safe list, prefix velocity (SMS to one prefix — the number without its last 4 digits —
in a short window against its own longer baseline), conversion per prefix and per
country (codes entered vs SMS sent, from RecordConversion and confirmations).
Statistics live in MongoDB (one event document per SMS, one per conversion), so
every replica sees the same numbers. Prefixes are stored only as keyed hashes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from otpgate.common.v1 import common_pb2
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.logging import get_logger
from services.core.mongo import Document, ensure_index
from services.core.phone import LineType, Phone
from services.delivery import metrics

log = get_logger(__name__)

ALLOW, BLOCK, CAPTCHA, MONITOR = "allow", "block", "captcha", "monitor"
_LINE_REASONS = {
    LineType.PREMIUM_RATE: "LINE_TYPE_PREMIUM_RATE",
    LineType.SHARED_COST: "LINE_TYPE_SHARED_COST",
    LineType.VOIP: "LINE_TYPE_VOIP",
    LineType.UNKNOWN: "LINE_TYPE_UNKNOWN",
}
# Never sent, even to a safe-listed prefix: they cost the sender money by design.
_ALWAYS_REFUSED = frozenset({LineType.PREMIUM_RATE, LineType.SHARED_COST})


@dataclass(frozen=True)
class FraudSettings:
    mode: str = "block"  # block | monitor | off (service default; a client policy may override)
    safe_prefixes: tuple[str, ...] = ()
    velocity_window: float = 600.0
    baseline_window: float = 86400.0
    velocity_min: int = 20
    velocity_factor: float = 5.0
    conversion_window: float = 86400.0
    conversion_grace: float = 300.0
    prefix_min_volume: int = 20
    country_min_volume: int = 200
    captcha_below: float = 0.2
    block_below: float = 0.05


@dataclass(frozen=True)
class Decision:
    decision: str
    reason: str

    @property
    def allowed(self) -> bool:
        return self.decision in (ALLOW, MONITOR)


@dataclass(frozen=True)
class SmsLeg:
    phone: Phone
    client_id: str
    purpose: int
    captcha_verified: bool
    # Whether the caller can show a CAPTCHA (requests from an end user through the edge).
    captcha_possible: bool
    fraud_mode: int = common_pb2.FRAUD_MODE_UNSPECIFIED


class FraudGuard:
    def __init__(
        self,
        events: AsyncCollection[Document],
        conversions: AsyncCollection[Document],
        keyring: Keyring,
        clock: Clock,
        settings: FraudSettings,
    ) -> None:
        self._events = events
        self._conversions = conversions
        self._keyring = keyring
        self._clock = clock
        self.settings = settings

    async def create_indexes(self) -> None:
        await ensure_index(self._events, [("p", 1), ("at", 1)])
        await ensure_index(self._events, [("r", 1), ("at", 1)])
        await ensure_index(self._events, [("b", 1), ("at", 1)])
        await ensure_index(self._conversions, [("p", 1), ("at", 1)])
        await ensure_index(self._conversions, [("r", 1), ("at", 1)])

    def prefix_hash(self, phone: Phone) -> str:
        return self._keyring.blind_index("sms-prefix", phone.prefix)

    def _mode(self, leg: SmsLeg) -> str:
        if leg.fraud_mode == common_pb2.FRAUD_MODE_BLOCK:
            return "block"
        if leg.fraud_mode == common_pb2.FRAUD_MODE_MONITOR:
            return "monitor"
        if leg.fraud_mode == common_pb2.FRAUD_MODE_OFF:
            return "off"
        return self.settings.mode

    async def evaluate(self, leg: SmsLeg) -> Decision:
        decision = await self._evaluate(leg)
        metrics.fraud_decisions_total.labels(decision.decision, decision.reason).inc()
        log.info(
            "fraud_decision",
            decision=decision.decision,
            reason=decision.reason,
            region=leg.phone.region,
            client_id=leg.client_id,
            purpose=int(leg.purpose),
            prefix_id=self.prefix_hash(leg.phone)[:12],
        )
        return decision

    async def _evaluate(self, leg: SmsLeg) -> Decision:
        phone = leg.phone
        line = _LINE_REASONS.get(phone.line_type)
        safe = any(phone.e164.startswith(p) for p in self.settings.safe_prefixes)
        if phone.line_type in _ALWAYS_REFUSED or (line and not safe):
            return Decision(BLOCK, line or "LINE_TYPE")
        if safe:
            return Decision(ALLOW, "SAFE_LIST")
        mode = self._mode(leg)
        if mode == "off":
            return Decision(ALLOW, "MODE_OFF")
        verdict = await self._statistics(leg)
        if verdict.decision == ALLOW:
            return verdict
        if mode == "monitor":
            return Decision(MONITOR, verdict.reason)
        return verdict

    async def _statistics(self, leg: SmsLeg) -> Decision:
        s = self.settings
        now = self._clock.now()
        prefix = self.prefix_hash(leg.phone)
        # Prefix velocity against the prefix's own baseline.
        recent = await self._events.count_documents(
            {"p": prefix, "at": {"$gt": now - timedelta(seconds=s.velocity_window)}}
        )
        if recent + 1 >= s.velocity_min:
            older = await self._events.count_documents(
                {
                    "p": prefix,
                    "at": {
                        "$gt": now - timedelta(seconds=s.baseline_window),
                        "$lte": now - timedelta(seconds=s.velocity_window),
                    },
                }
            )
            windows = max(1.0, (s.baseline_window - s.velocity_window) / s.velocity_window)
            baseline = older / windows
            if recent + 1 > max(float(s.velocity_min), baseline * s.velocity_factor):
                return Decision(BLOCK, "PREFIX_VELOCITY")
        # Conversion: only SMS old enough that the code could have been entered.
        for field, key, volume, reason in (
            ("p", prefix, s.prefix_min_volume, "LOW_CONVERSION_PREFIX"),
            ("r", leg.phone.region, s.country_min_volume, "LOW_CONVERSION_COUNTRY"),
        ):
            rate = await self._conversion(field, key, volume, now)
            if rate is None:
                continue
            if rate < s.block_below:
                return Decision(BLOCK, reason)
            if rate < s.captcha_below:
                if leg.captcha_verified:
                    return Decision(ALLOW, "CAPTCHA_PASSED")
                return Decision(CAPTCHA, reason) if leg.captcha_possible else Decision(BLOCK, reason)
        return Decision(ALLOW, "OK")

    async def _conversion(self, field: str, key: str, volume: int, now: datetime) -> float | None:
        s = self.settings
        window = {
            "$gt": now - timedelta(seconds=s.conversion_window),
            "$lte": now - timedelta(seconds=s.conversion_grace),
        }
        sent = await self._events.count_documents({field: key, "at": window, "conv": True})
        if sent < volume:
            return None
        converted = await self._conversions.count_documents({field: key, "at": window})
        return converted / sent

    async def record_sms(self, message_id: str, leg: SmsLeg, phone_index: str) -> None:
        """Count one SMS leg that was let through."""
        tracked = leg.purpose in (2, 3)  # CONFIRMATION, VERIFICATION: their codes report conversions
        doc = {
            "_id": message_id,
            "p": self.prefix_hash(leg.phone),
            "r": leg.phone.region,
            "b": phone_index,
            "c": leg.client_id,
            "conv": tracked,
            "at": self._clock.now(),
        }
        with contextlib.suppress(DuplicateKeyError):
            await self._events.insert_one(doc)

    async def record_conversion(self, message_id: str) -> bool:
        """A code sent by this SMS was entered correctly. Idempotent; False if no SMS event."""
        event = await self._events.find_one({"_id": message_id})
        if event is None:
            return False
        with contextlib.suppress(DuplicateKeyError):
            await self._conversions.insert_one(
                {"_id": message_id, "p": event["p"], "r": event["r"], "at": event["at"], "done": self._clock.now()}
            )
        return True

    async def record_confirmed_phone(self, phone_index: str, since: timedelta = timedelta(hours=1)) -> None:
        """The person typed the confirmation code: the latest SMS to that number converted."""
        cursor = self._events.find({"b": phone_index, "at": {"$gt": self._clock.now() - since}, "conv": True})
        async for event in cursor.sort("at", -1).limit(1):
            await self.record_conversion(str(event["_id"]))

    async def purge(self) -> None:
        cutoff = self._clock.now() - timedelta(
            seconds=max(self.settings.baseline_window, self.settings.conversion_window) * 2
        )
        await self._events.delete_many({"at": {"$lt": cutoff}})
        await self._conversions.delete_many({"at": {"$lt": cutoff}})

"""The SMS fraud guard (SMS pumping defence), applied to every SMS leg before it is stored or sent.

In order:
1. premium-rate and shared-cost numbers are refused (they cost the sender by design);
2. an operator's rule for the number's longest prefix (fraud_rules.py): the block list refuses,
   the safe list lets through;
3. with the guard off (FRAUD_MODE_OFF) only VoIP and unknown lines are refused;
4. otherwise the request's keys are scored (fraud_score.py) on the shared statistics
   (fraud_stats.py), and the request is counted whatever is decided:
   - below `captcha_at`: allowed;
   - above it, without a solved CAPTCHA: a CAPTCHA is asked for where the caller can show one,
     else refused;
   - above it with a solved CAPTCHA: allowed, unless the requester itself (its IP, network,
     session or device) is past `attack_at` (it keeps asking for many numbers, CAPTCHAs or not),
     or the number's range is past `attack_at` and its CAPTCHA budget is spent: at most
     `attacked_budget` SMS an hour behind solved CAPTCHAs whose code nobody entered (a unit comes
     back when its code is entered), so the people of an attacked range keep getting codes while
     an attacker who buys CAPTCHA solutions gets almost none;
   - in monitor mode the decision is logged and counted, and the request allowed.
Every decision is counted by signal (otpgate_fraud_decisions_total) and logged with the masked
number; ranges and segments that need CAPTCHAs or are refused become guard events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from otpgate.common.v1 import common_pb2
from pymongo.asynchronous.collection import AsyncCollection

from services.core.clock import Clock
from services.core.counters import CappedCounter, Full, Reservation
from services.core.crypto import Keyring
from services.core.end_user import canonical_ip, ip_network
from services.core.logging import get_logger
from services.core.mongo import Document, ensure_index, put_by_id
from services.core.phone import LineType, Phone
from services.delivery import metrics
from services.delivery.fraud_rules import ALLOW as RULE_ALLOW
from services.delivery.fraud_rules import FraudEvent, FraudEvents, FraudRules
from services.delivery.fraud_score import SUFFIX_BLOCK, KeyStats, Kind, Request, Score, Scorer, ScoreSettings
from services.delivery.fraud_stats import FraudStats, LegKeys

log = get_logger(__name__)

ALLOW, BLOCK, CAPTCHA, MONITOR = "allow", "block", "captcha", "monitor"
_ALWAYS_REFUSED = {LineType.PREMIUM_RATE: "LINE_TYPE_PREMIUM_RATE", LineType.SHARED_COST: "LINE_TYPE_SHARED_COST"}
_UNWEIGHED = {LineType.VOIP: "LINE_TYPE_VOIP", LineType.UNKNOWN: "LINE_TYPE_UNKNOWN"}
# Refusals for the kind of number rather than for what the guard saw.
LINE_TYPE_REFUSALS = frozenset({*_ALWAYS_REFUSED.values(), *_UNWEIGHED.values()})
P_CONFIRMATION, P_VERIFICATION = 2, 3  # delivery's MessagePurpose: their codes report being entered

# Who or what a signal's key is, for the refusal's message.
SIGNAL_SUBJECTS = {
    "PREFIX": ("for", "numbers in this range"),
    "RANGE": ("for", "numbers in this wider range"),
    "IP": ("from", "this IP address"),
    "NETWORK": ("from", "this IP network"),
    "SESSION": ("from", "this session"),
    "DEVICE": ("from", "this device"),
    "CLIENT_COUNTRY": ("for", "this client's numbers in this country"),
    "COUNTRY": ("for", "numbers in this country"),
}


@dataclass(frozen=True)
class FraudSettings:
    mode: str = "block"  # block | monitor | off (service default; a client policy may override)
    safe_prefixes: tuple[str, ...] = ()
    attacked_budget: int = 2  # solved CAPTCHAs per attacked range and hour that still get an SMS
    score: ScoreSettings = field(default_factory=ScoreSettings)


@dataclass(frozen=True)
class Decision:
    decision: str
    reason: str  # the deciding signal (PREFIX_VELOCITY, LINE_TYPE_VOIP, BLOCK_LIST, ...) or OK
    score: float = 0.0
    detail: str = ""
    # A unit of an attacked range's CAPTCHA budget this SMS took (given back when its code is entered).
    budget: Reservation | None = None

    @property
    def allowed(self) -> bool:
        return self.decision in (ALLOW, MONITOR)

    @property
    def metadata(self) -> dict[str, str]:
        """ErrorInfo metadata of a refusal: which signal decided, with how much evidence."""
        return {"signal": self.reason, "score": f"{self.score:.1f}"}


@dataclass(frozen=True)
class SmsLeg:
    phone: Phone
    client_id: str
    purpose: int
    captcha_verified: bool
    # Whether the caller can show a CAPTCHA (Origin.captcha_possible: a request through the edge).
    captcha_possible: bool
    fraud_mode: int = common_pb2.FRAUD_MODE_UNSPECIFIED
    ip: str = ""
    session_id: str = ""
    user_agent: str = ""
    # The requester's keys as stored with a message (an SMS leg decided at dispatch time).
    requester_keys: Mapping[str, str] | None = None


class FraudGuard:
    def __init__(
        self,
        counters: AsyncCollection[Document],
        sms: AsyncCollection[Document],
        rules: AsyncCollection[Document],
        events: AsyncCollection[Document],
        budgets: AsyncCollection[Document],
        keyring: Keyring,
        clock: Clock,
        settings: FraudSettings,
    ) -> None:
        self._keyring = keyring
        self._clock = clock
        self.settings = settings
        self.stats = FraudStats(counters, sms, clock)
        self.rules = FraudRules(rules, clock, settings.safe_prefixes)
        self.events = FraudEvents(events, clock)
        self.scorer = Scorer(settings.score)
        self._sms = sms
        self._budgets = budgets
        self._budget = CappedCounter(budgets, clock, "attacked", settings.attacked_budget, 3600.0)

    async def create_indexes(self) -> None:
        await self.stats.create_indexes()
        await self.events.create_indexes()
        await ensure_index(self._budgets, [("at", 1)])

    # Keys -------------------------------------------------------------------------------------

    def _hash(self, kind: str, value: str) -> str:
        return self._keyring.blind_index(f"fraud/{kind}", value)[:24]

    def requester_keys(self, leg: SmsLeg) -> dict[str, str]:
        """The hashed keys of who asked (kept with a message, for a leg decided later)."""
        if leg.requester_keys is not None:
            return dict(leg.requester_keys)
        keys: dict[str, str] = {}
        if leg.ip:
            ip = canonical_ip(leg.ip)
            network = ip_network(ip)
            keys[Kind.IP] = self._hash(Kind.IP, ip)
            keys[Kind.NETWORK] = self._hash(Kind.NETWORK, network)
            if leg.user_agent:
                keys[Kind.DEVICE] = self._hash(Kind.DEVICE, f"{network}|{leg.user_agent}")
        if leg.session_id:
            keys[Kind.SESSION] = self._hash(Kind.SESSION, f"{leg.client_id}|{leg.session_id}")
        return keys

    def keys(self, leg: SmsLeg) -> LegKeys:
        phone = leg.phone
        prefix, number_range = phone.e164[:-4], phone.e164[:-6]
        keys: dict[Kind, str] = {
            Kind.PREFIX: self._hash(Kind.PREFIX, prefix),
            Kind.RANGE: self._hash(Kind.RANGE, number_range),
            Kind.CLIENT_COUNTRY: self._hash(Kind.CLIENT_COUNTRY, f"{leg.client_id}|{phone.region}"),
            Kind.COUNTRY: self._hash(Kind.COUNTRY, phone.region),
        }
        keys.update({Kind(kind): key for kind, key in self.requester_keys(leg).items()})
        # The last four digits, shifted by a keyed offset of their prefix: distances survive.
        offset = int(self._keyring.blind_index("fraud/suffix", prefix)[:8], 16) % 10_000
        shifted = (int(phone.e164[-4:]) + offset) % 10_000
        return LegKeys(keys, self._hash("number", phone.e164), shifted // SUFFIX_BLOCK)

    # Deciding ---------------------------------------------------------------------------------

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
            score=round(decision.score, 1),
            phone_masked=leg.phone.masked,
            region=leg.phone.region,
            client_id=leg.client_id,
            purpose=int(leg.purpose),
            captcha_verified=leg.captcha_verified,
        )
        return decision

    async def _evaluate(self, leg: SmsLeg) -> Decision:
        phone = leg.phone
        if phone.line_type in _ALWAYS_REFUSED:
            return Decision(BLOCK, _ALWAYS_REFUSED[phone.line_type], detail="no SMS to this kind of number")
        mode = self._mode(leg)
        if mode == "off":
            rule = await self.rules.match(phone.e164, leg.client_id)
            if rule is not None:
                return self._by_rule(rule.action)
            if phone.line_type in _UNWEIGHED:
                return Decision(BLOCK, _UNWEIGHED[phone.line_type], detail="no SMS to this kind of number")
            return Decision(ALLOW, "MODE_OFF")
        keys = self.keys(leg)
        rule, reading = await asyncio.gather(self.rules.match(phone.e164, leg.client_id), self.stats.read(keys))
        if rule is not None:
            return self._by_rule(rule.action)
        await self.stats.count_request(keys, reading.repeat)
        request = Request(phone.region, phone.line_type.value, keys.suffix_block, reading.repeat)
        score = self.scorer.score(request, reading.stats)
        verdict = await self._decide(score, leg, keys)
        await self._report(score, verdict, leg, reading.stats)
        if verdict.decision != ALLOW and mode == "monitor":
            return Decision(MONITOR, verdict.reason, verdict.score, verdict.detail)
        return verdict

    @staticmethod
    def _by_rule(action: str) -> Decision:
        if action == RULE_ALLOW:
            return Decision(ALLOW, "SAFE_LIST")
        return Decision(BLOCK, "BLOCK_LIST", detail="an operator blocked SMS to this range")

    async def _decide(self, score: Score, leg: SmsLeg, keys: LegKeys) -> Decision:
        s = self.settings.score
        signal = score.deciding
        if score.total < s.captcha_at:
            return Decision(ALLOW, "OK", score.total)
        detail = _describe(signal)
        if not leg.captcha_verified:
            if leg.captcha_possible:
                return Decision(CAPTCHA, signal, score.total, detail)
            return Decision(BLOCK, signal, score.total, detail)
        if score.requester >= s.attack_at:
            requester_signal = score.strongest("requester")
            return Decision(BLOCK, requester_signal, score.total, _describe(requester_signal))
        if score.number >= s.attack_at and score.number_kind is not None:
            budget = await self._budget.reserve(keys.keys[score.number_kind])
            if isinstance(budget, Full):
                return Decision(
                    BLOCK,
                    score.strongest("number"),
                    score.total,
                    "this range is under attack and its CAPTCHA allowance for the hour is spent",
                )
            return Decision(ALLOW, "CAPTCHA_PASSED", score.total, budget=budget)
        return Decision(ALLOW, "CAPTCHA_PASSED", score.total)

    async def _report(self, score: Score, decision: Decision, leg: SmsLeg, stats: Mapping[Kind, KeyStats]) -> None:
        """Ranges and segments that ask for CAPTCHAs or refuse become guard events."""
        s = self.settings.score
        if decision.decision == ALLOW and score.total < s.captcha_at:
            return
        state = "block" if score.number >= s.attack_at or decision.decision == BLOCK else "captcha"
        phone = leg.phone
        now = self._clock.now()
        candidates: list[tuple[str, str, float, Kind]] = []
        if score.number_kind is not None and score.number >= s.captcha_at:
            value = phone.e164[:-4] if score.number_kind == Kind.PREFIX else phone.e164[:-6]
            candidates.append((score.number_kind.value, value, score.number, score.number_kind))
        if score.segment >= s.captcha_at:
            candidates.append(("client_country", f"{leg.client_id}|{phone.region}", score.segment, Kind.CLIENT_COUNTRY))
        for kind, value, evidence, key_kind in candidates:
            recent = stats[key_kind].recent if key_kind in stats else None
            await self.events.seen(
                FraudEvent(
                    kind=kind,
                    value=value,
                    client_id=leg.client_id,
                    region=phone.region,
                    state=state if evidence >= s.attack_at or decision.decision == BLOCK else "captcha",
                    signal=decision.reason,
                    score=evidence,
                    requests=round(recent.requests) + 1 if recent else 1,
                    sms=round(recent.sms) if recent else 0,
                    entered=round(recent.entered) if recent else 0,
                    since=now,
                    last_seen=now,
                )
            )

    # Counting what happened -------------------------------------------------------------------

    async def record_sms(
        self, message_id: str, leg: SmsLeg, phone_index: str, decision: Decision | None = None
    ) -> None:
        """Count one SMS leg that was let through (once per message)."""
        if self._mode(leg) == "off":
            return
        converts = leg.purpose in (P_CONFIRMATION, P_VERIFICATION)
        budget = decision.budget.window_id if decision is not None and decision.budget is not None else None
        await self.stats.count_sms(message_id, self.keys(leg), converts, budget)
        if leg.purpose == P_CONFIRMATION:
            # The person types a re-confirmation code to a bot: delivery learns it by number.
            await put_by_id(self._sms, f"phone|{phone_index}", {"message_id": message_id, "exp": self._expiry()})

    async def record_conversion(self, message_id: str) -> bool:
        """A code sent by this SMS was entered correctly. Idempotent; False if no SMS is known."""
        converted = await self.stats.convert(message_id)
        if converted is not None and converted.budget:
            await self._budget.give_back(Reservation(converted.budget, 0))  # a person, not an attacker
        return converted is not None

    async def record_confirmed_phone(self, phone_index: str) -> None:
        """The person typed the re-confirmation code: the latest confirmation SMS to them converted."""
        pointer = await self._sms.find_one({"_id": f"phone|{phone_index}"})
        if pointer is not None:
            await self.record_conversion(str(pointer["message_id"]))

    async def purge(self) -> None:
        await self.stats.purge()
        await self.events.purge()
        await self._budgets.delete_many({"at": {"$lt": self._clock.now()}})

    def _expiry(self) -> datetime:
        return self._clock.now() + timedelta(hours=2)


def _describe(signal: str) -> str:
    """What a signal saw, in words for the refusal's message."""
    if signal == "SEQUENTIAL_NUMBERS":
        return "many recent requests are for near-sequential numbers"
    if signal.startswith("LINE_TYPE_"):
        return f"this is a {signal.removeprefix('LINE_TYPE_').lower()} number"
    if signal == "COUNTRY_RISK":
        return "an operator marked this country as risky"
    subject, _, what = signal.rpartition("_")
    preposition, text = SIGNAL_SUBJECTS.get(subject, ("for", subject.lower()))
    if what == "VELOCITY":
        return f"many recent requests {preposition} {text} got no code entered"
    return f"codes sent {'to' if preposition == 'for' else 'on requests from'} {text} are rarely entered"

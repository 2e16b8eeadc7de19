"""The fraud guard's scorer: how much evidence a request gives that it is SMS pumping, in nats.

Pumping sends codes nobody enters, to numbers someone is paid for, usually many at a time into
the same ranges; people enter most of the codes they ask for. So every signal is read as
evidence, the natural log of how much likelier the observation is under an attack than under
ordinary traffic, and evidence adds up. 3 nats (odds of 20 to 1) asks for a CAPTCHA, 9 nats
(8,000 to 1) is an attack. Nothing is allowed for free: a prefix's second unanswered request is
already weighed, against what that prefix could expect.

For each key a request has (the number's prefix and range, the end user's IP address, network,
session and device, the client in that country, the country) the statistics (fraud_stats.py)
give requests `a`, SMS `s` and codes entered `c`, in the last ten minutes ("recent") and in the
forty minutes before, when every code has had time to be entered ("settled"):

- pressure: the numbers asked for in the last ten minutes whose code was not entered yet
  (U = a - c; a number asking again within twenty minutes is one case and counts once),
  against the number an ordinary key gets, λ. Evidence: -ln P(N >= U) for N ~ Poisson(λ), how
  surprising so many open requests are. λ is the larger of a floor, the key's own history (codes
  entered there lately: a key people answer from, a carrier NAT say, always has some still being
  typed) and, for prefixes and ranges, a global budget: their share of the country's recent
  requests, so a campaign that multiplies a country's traffic multiplies every prefix's
  allowance while a burst into one prefix stands out.
- conversion: the settled SMS, each entered code weighing ln(r0/ra) against the key and each
  code never entered ln((1-ra)/(1-r0)) for it (legitimate traffic enters a share r0 of its
  codes, pumping about ra). A good history credits at most `credit` nats.
- near-sequential numbers (prefix only): how many recent requests in the prefix fall within 32
  of this number's last four digits, against the chance that random numbers would.
- line type (VoIP, unknown) and an operator-set country risk add fixed evidence; premium-rate
  and shared-cost numbers are refused before any of this (fraud.py).

Keys overlap (a range holds its prefixes, a network its addresses), so within each group only
the strongest key counts: the number (prefix or range, plus runs, line type and country risk),
the requester (IP, network, session, device) and the segment (client in the country, country).
The score is their sum; the signal that decided is the single largest contribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    """What a key is about; each kind belongs to one group."""

    PREFIX = "prefix"  # the number without its last 4 digits
    RANGE = "range"  # the number without its last 6 digits
    IP = "ip"
    NETWORK = "net"  # the IP address's /24 or /48
    SESSION = "session"
    DEVICE = "device"  # the device string within the network
    CLIENT_COUNTRY = "client_country"
    COUNTRY = "country"


NUMBER = (Kind.PREFIX, Kind.RANGE)
REQUESTER = (Kind.IP, Kind.NETWORK, Kind.SESSION, Kind.DEVICE)
SEGMENT = (Kind.CLIENT_COUNTRY, Kind.COUNTRY)
# How many near-sequential blocks a number is compared with (its own and both neighbours) of 32.
SUFFIX_BLOCK = 32
SUFFIX_SPACE = 10_000


@dataclass(frozen=True)
class Counts:
    requests: float = 0.0
    sms: float = 0.0
    entered: float = 0.0

    @property
    def open(self) -> float:
        """Requests whose code was not entered (yet)."""
        return max(0.0, self.requests - self.entered)


@dataclass(frozen=True)
class KeyStats:
    recent: Counts = Counts()
    settled: Counts = Counts()
    # Prefix keys: recent requests per block of SUFFIX_BLOCK last-four-digit values.
    blocks: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreSettings:
    captcha_at: float = 3.0
    attack_at: float = 9.0
    legit_conversion: float = 0.7  # r0: a low estimate of the share of codes people enter
    attack_conversion: float = 0.05  # ra
    credit: float = 6.0  # at most this much evidence is taken off for a good history
    # λ floors per ten minutes, and the shares of their country's traffic prefixes and ranges expect.
    floors: Mapping[Kind, float] = field(
        default_factory=lambda: {
            Kind.PREFIX: 0.02,
            Kind.RANGE: 0.3,
            Kind.IP: 0.5,
            Kind.NETWORK: 1.0,
            Kind.SESSION: 0.5,
            Kind.DEVICE: 0.5,
        }
    )
    shares: Mapping[Kind, float] = field(default_factory=lambda: {Kind.PREFIX: 0.0005, Kind.RANGE: 0.005})
    history_weight: float = 0.3  # open requests a key may expect per settled conversion per ten minutes
    voip_evidence: float = 3.5
    unknown_line_evidence: float = 3.5
    country_risk: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    total: float
    number: float
    requester: float
    segment: float
    # Every contribution, by signal (e.g. PREFIX_VELOCITY, IP_CONVERSION, SEQUENTIAL_NUMBERS),
    # and the group each belongs to ("number", "requester", "segment").
    signals: Mapping[str, float]
    groups: Mapping[str, str]
    # The number-side key that carried the number's evidence (for budgets and guard events).
    number_kind: Kind | None = None

    @property
    def deciding(self) -> str:
        return max(self.signals.items(), key=lambda item: item[1])[0] if self.signals else "NONE"

    def strongest(self, group: str) -> str:
        """The largest signal of one group ("NONE" when it has none)."""
        mine = [(value, name) for name, value in self.signals.items() if self.groups[name] == group]
        return max(mine)[1] if mine else "NONE"


@dataclass(frozen=True)
class Request:
    """What the scorer knows about one request besides the statistics."""

    region: str
    line_type: str  # services.core.phone.LineType value
    suffix_block: int | None  # the number's last four digits (keyed shift) // SUFFIX_BLOCK
    # The number asked before, moments ago (fraud_stats.py "cases"): its own earlier request is
    # in the counts and is not held against it.
    repeat: bool = False


def poisson_surprise(count: float, rate: float) -> float:
    """-ln P(N >= count) for N ~ Poisson(rate): 0 for nothing open, growing fast past the rate."""
    n = math.floor(count + 1e-9)
    if n <= 0:
        return 0.0
    rate = max(rate, 1e-9)
    # P(N >= n) = 1 - sum_{k<n} e^-λ λ^k / k!, summed in logs to stay exact in the far tail.
    term = math.exp(-rate)
    below = 0.0
    for k in range(n):
        below += term
        term *= rate / (k + 1)
    tail = max(1.0 - below, 0.0)
    if tail > 1e-12:
        return -math.log(tail)
    # Far tail: P(N >= n) ~ e^-λ λ^n / n! (the first term dominates).
    return rate - n * math.log(rate) + math.lgamma(n + 1)


def binomial_surprise(hits: float, trials: float, p: float) -> float:
    """-ln P(X >= hits) for X ~ Binomial(trials, p), with hits <= trials."""
    k, n = math.floor(hits + 1e-9), math.floor(trials + 1e-9)
    if k <= 0 or n <= 0:
        return 0.0
    k = min(k, n)
    tail = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
    if tail > 1e-300:
        return -math.log(tail)
    return -(math.log(math.comb(n, k)) + k * math.log(p) + (n - k) * math.log1p(-p))


class Scorer:
    def __init__(self, settings: ScoreSettings) -> None:
        self.settings = settings
        r0, ra = settings.legit_conversion, settings.attack_conversion
        self._per_entered = math.log(r0 / ra)  # evidence against pumping per entered code
        self._per_unentered = math.log((1 - ra) / (1 - r0))  # evidence for it per unentered code

    def expected_open(self, kind: Kind, stats: KeyStats, country_recent: float) -> float:
        """λ: the open requests an ordinary key of this kind has in ten minutes."""
        s = self.settings
        rate = s.floors.get(kind, 0.5)
        rate = max(rate, s.shares.get(kind, 0.0) * country_recent)
        # People answer: a key whose codes are entered (behind a carrier NAT, say) has as many open
        # at any moment as are still being typed, in proportion. Its busiest recent ten minutes count.
        answered = max(stats.settled.entered / 4.0, stats.recent.entered)
        return max(rate, s.history_weight * answered)

    def conversion(self, stats: KeyStats) -> float:
        settled = stats.settled
        unentered = max(0.0, settled.sms - settled.entered)
        evidence = unentered * self._per_unentered - settled.entered * self._per_entered
        return max(evidence, -self.settings.credit)

    def score(self, request: Request, keys: Mapping[Kind, KeyStats]) -> Score:
        s = self.settings
        country_recent = keys[Kind.COUNTRY].recent.requests if Kind.COUNTRY in keys else 0.0
        signals: dict[str, float] = {}
        groups: dict[str, str] = {}
        per_key: dict[Kind, float] = {}
        for kind, stats in keys.items():
            velocity = 0.0
            if kind not in SEGMENT:
                others = stats.recent.open - (1.0 if request.repeat else 0.0)
                velocity = poisson_surprise(others, self.expected_open(kind, stats, country_recent))
            conversion = self.conversion(stats)
            per_key[kind] = max(0.0, velocity + conversion)
            group = "number" if kind in NUMBER else "requester" if kind in REQUESTER else "segment"
            for name, value in ((f"{kind.name}_VELOCITY", velocity), (f"{kind.name}_CONVERSION", conversion)):
                if value > 0:
                    signals[name] = value
                    groups[name] = group

        number_kind = max((k for k in NUMBER if k in per_key), key=lambda k: per_key[k], default=None)
        number = per_key[number_kind] if number_kind else 0.0
        for kind in NUMBER:  # only the strongest number key counts: drop the other's signals
            if kind != number_kind:
                signals.pop(f"{kind.name}_VELOCITY", None)
                signals.pop(f"{kind.name}_CONVERSION", None)
        runs = self.runs(request, keys.get(Kind.PREFIX))
        extras = {
            "SEQUENTIAL_NUMBERS": runs,
            "LINE_TYPE_VOIP": s.voip_evidence if request.line_type == "voip" else 0.0,
            "LINE_TYPE_UNKNOWN": s.unknown_line_evidence if request.line_type == "unknown" else 0.0,
            "COUNTRY_RISK": s.country_risk.get(request.region, 0.0),
        }
        for name, value in extras.items():
            if value > 0:
                signals[name] = value
                groups[name] = "number"
                number += value
        requester = self._strongest(REQUESTER, per_key, signals)
        segment = self._strongest(SEGMENT, per_key, signals)
        return Score(number + requester + segment, number, requester, segment, signals, groups, number_kind)

    @staticmethod
    def _strongest(group: tuple[Kind, ...], per_key: Mapping[Kind, float], signals: dict[str, float]) -> float:
        best = max((k for k in group if k in per_key), key=lambda k: per_key[k], default=None)
        for kind in group:
            if kind != best:
                signals.pop(f"{kind.name}_VELOCITY", None)
                signals.pop(f"{kind.name}_CONVERSION", None)
        return per_key[best] if best else 0.0

    @staticmethod
    def runs(request: Request, prefix: KeyStats | None) -> float:
        """Evidence that recent requests in the prefix run near this number's last digits."""
        if prefix is None or request.suffix_block is None:
            return 0.0
        block = request.suffix_block
        blocks = SUFFIX_SPACE // SUFFIX_BLOCK + 1
        own = 1.0 if request.repeat else 0.0
        near = sum(prefix.blocks.get((block + d) % blocks, 0.0) for d in (-1, 0, 1)) - own
        total = sum(prefix.blocks.values()) - own
        return binomial_surprise(near, total, 3 * SUFFIX_BLOCK / SUFFIX_SPACE)

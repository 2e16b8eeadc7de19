"""Synthetic Verify traffic for the fraud bench: legitimate people and five kinds of SMS pumping.

Everything is drawn from one `random.Random(seed)`; a traffic is a list of actors, each a
schedule of requests in simulated seconds. Numbers are real mobile (or premium-rate) numbers of
their country by the numbering plan (phonenumbers), drawn over the whole mobile space, so
prefixes and ranges are as spread as real traffic is.

Legitimate people (four countries, 1.5 a second together; a campaign adds 2 a second in one
country for eight minutes): a fresh number, an address of their own ISP (a quarter behind one of
200 carrier NAT addresses per country, shared), a common browser, a session of their own. 85 %
type the code within a minute or so (log-normal, median 25 s); of the others 40 % ask again
after 45-120 s, and 60 % of those type the second code. Asked for a CAPTCHA, a person solves it.

Attacks, each for the whole run, none ever typing a code:
- sequential_prefix: consecutive numbers in one mobile prefix, a new residential proxy address
  each time, every 2 s;
- premium_rate: premium-rate numbers of the four countries, proxy addresses, every 4 s;
- ip_hammer: one address, one session and device, random mobile numbers, every second;
- slow_spread: random numbers in three ranges (1,000,000 numbers each) of two countries, from
  300 datacenter addresses in 60 networks, every 4 s;
- captcha_solver: random numbers in six prefixes of one range, a new proxy address each time,
  and 40 % of the CAPTCHAs it is asked for solved (a solving service), every 2 s.
"""

from __future__ import annotations

import ipaddress
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import PhoneNumberType

LEGIT = "legitimate"
ATTACKS = ("sequential_prefix", "premium_rate", "ip_hammer", "slow_spread", "captcha_solver")
COUNTRIES = {"DE": 0.35, "FR": 0.25, "GB": 0.25, "ES": 0.15}
CAMPAIGN_COUNTRY = "FR"
# (calling code, leading national digits, national number lengths) of each country's mobile space.
MOBILE = {
    "DE": ("49", ("15", "16", "17"), (10, 11)),
    "FR": ("33", ("6", "7"), (9,)),
    "GB": ("44", ("7",), (10,)),
    "ES": ("34", ("6", "7"), (9,)),
}
PREMIUM = {
    "DE": ("49", ("900",), (10, 11)),
    "FR": ("33", ("89",), (9,)),
    "GB": ("44", ("9",), (10,)),
    "ES": ("34", ("80", "90"), (9,)),
}
BROWSERS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 15; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Linux; Android 13; M2101K6G) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/129.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "MyShopApp/4.12 (iPhone15,3; iOS 18.1)",
    "MyShopApp/4.12 (samsung SM-A546B; Android 14)",
)
# First octets of address space that ISPs hand to homes and phones (no private or reserved blocks).
PUBLIC_FIRST_OCTETS: tuple[int, ...] = (2, 5, 31, 37, 46, 62, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87)
PUBLIC_FIRST_OCTETS += (88, 89, 90, 91, 92, 93, 94, 95, 109, 151, 176, 178, 185, 188, 193, 194, 195, 212, 213, 217)


@dataclass
class Request:
    """One ask for a code: who, for which number, and what the asker does when met with a CAPTCHA."""

    kind: str
    phone: str
    ip: str
    user_agent: str
    session_id: str
    solves_captcha: float  # the chance the asker solves a CAPTCHA it is shown
    solve_delay: float  # seconds a solved CAPTCHA takes
    enters_code: float = 0.0  # the chance the code is typed
    enter_delay: float = 0.0
    # What the person does if they do not type the code: ask again after this long (None: nothing).
    asks_again_after: float | None = None
    second_enters: float = 0.0


@dataclass
class Traffic:
    seed: int
    seconds: float
    schedule: list[tuple[float, Request]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for _, r in self.schedule if r.kind == kind)


class Numbers:
    """Valid numbers of a country's numbering plan, by rejection sampling."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def draw(self, region: str, plan: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = MOBILE) -> str:
        code, leads, lengths = plan[region]
        wanted: tuple[int, ...] = (PhoneNumberType.PREMIUM_RATE,) if plan is PREMIUM else (PhoneNumberType.MOBILE,)
        wanted += () if plan is PREMIUM else (PhoneNumberType.FIXED_LINE_OR_MOBILE,)
        for _ in range(10_000):
            lead = self.rng.choice(leads)
            length = self.rng.choice(lengths)
            national = lead + "".join(self.rng.choice("0123456789") for _ in range(length - len(lead)))
            number = f"+{code}{national}"
            # Of this region itself (+44 7... is also Jersey's, Guernsey's and the Isle of Man's).
            if valid(number, wanted) and region_of(number) == region:
                return number
        raise RuntimeError(f"no valid number found for {region}")

    def in_prefix(self, prefix: str) -> str:
        """A valid number of `prefix` (the number without its last 4 digits)."""
        for _ in range(10_000):
            number = prefix + f"{self.rng.randrange(10_000):04d}"
            if valid(number):
                return number
        raise RuntimeError("no valid number in the prefix")

    def in_range(self, number_range: str) -> str:
        for _ in range(10_000):
            number = number_range + f"{self.rng.randrange(1_000_000):06d}"
            if valid(number):
                return number
        raise RuntimeError("no valid number in the range")


def valid(number: str, types: tuple[int, ...] = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)) -> bool:
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(parsed) and phonenumbers.number_type(parsed) in types


def region_of(number: str) -> str:
    return phonenumbers.region_code_for_number(phonenumbers.parse(number, None)) or ""


def public_ip(rng: random.Random, first: int | None = None, second: int | None = None, third: int | None = None) -> str:
    while True:
        octets = (
            first if first is not None else rng.choice(PUBLIC_FIRST_OCTETS),
            second if second is not None else rng.randrange(256),
            third if third is not None else rng.randrange(256),
            rng.randrange(1, 255),
        )
        address = ipaddress.ip_address(".".join(map(str, octets)))
        if address.is_global:
            return str(address)


def poisson_times(rng: random.Random, rate: float, start: float, end: float) -> Iterator[float]:
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return
        yield t


def generate(seed: int, seconds: float = 1800.0, scale: float = 1.0) -> Traffic:
    """The whole run's traffic for one seed (`scale` multiplies every rate, for quick runs)."""
    rng = random.Random(seed)
    numbers = Numbers(rng)
    traffic = Traffic(seed, seconds)
    add = traffic.schedule.append
    carrier_nat = {region: [public_ip(rng) for _ in range(200)] for region in COUNTRIES}

    # Legitimate people.
    def person(t: float, region: str) -> None:
        ip = rng.choice(carrier_nat[region]) if rng.random() < 0.25 else public_ip(rng)
        add(
            (
                t,
                Request(
                    kind=LEGIT,
                    phone=numbers.draw(region),
                    ip=ip,
                    user_agent=rng.choice(BROWSERS),
                    session_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                    solves_captcha=1.0,
                    solve_delay=rng.uniform(6, 20),
                    enters_code=0.85,
                    enter_delay=min(300.0, rng.lognormvariate(math.log(25), 0.6)),
                    asks_again_after=rng.uniform(45, 120) if rng.random() < 0.4 else None,
                    second_enters=0.6,
                ),
            )
        )

    for region, share in COUNTRIES.items():
        for t in poisson_times(rng, 1.5 * share * scale, 0, seconds):
            person(t, region)
    campaign = (0.4 * seconds, min(seconds, 0.4 * seconds + 480))
    for t in poisson_times(rng, 2.0 * scale, *campaign):
        person(t, CAMPAIGN_COUNTRY)

    def attacker(kind: str, t: float, phone: str, ip: str, agent: str, session: str = "", solves: float = 0.0) -> None:
        add((t, Request(kind, phone, ip, agent, session, solves, rng.uniform(10, 30))))

    # sequential_prefix: consecutive numbers of one prefix.
    prefix = numbers.draw("DE")[:-4]
    start = rng.randrange(10_000)
    for n, t in enumerate(_every(rng, 2.0 / scale, seconds)):
        number = f"{prefix}{(start + n) % 10_000:04d}"
        if valid(number):
            attacker("sequential_prefix", t, number, public_ip(rng), rng.choice(BROWSERS))
    # premium_rate.
    for t in _every(rng, 4.0 / scale, seconds):
        region = rng.choice(tuple(COUNTRIES))
        attacker("premium_rate", t, numbers.draw(region, PREMIUM), public_ip(rng), rng.choice(BROWSERS))
    # ip_hammer: one address, one session, one device.
    hammer_ip, hammer_session = public_ip(rng), uuid.UUID(int=rng.getrandbits(128)).hex
    for t in _every(rng, 1.0 / scale, seconds):
        region = rng.choice(tuple(COUNTRIES))
        attacker("ip_hammer", t, numbers.draw(region), hammer_ip, "python-requests/2.32.3", hammer_session)
    # slow_spread: three ranges, 300 datacenter addresses in 60 networks.
    ranges = [numbers.draw(region)[:-6] for region in ("GB", "GB", "DE")]
    networks = [(rng.choice(PUBLIC_FIRST_OCTETS), rng.randrange(256), rng.randrange(256)) for _ in range(60)]
    pool = [public_ip(rng, *networks[i % 60]) for i in range(300)]
    for t in _every(rng, 4.0 / scale, seconds):
        attacker("slow_spread", t, numbers.in_range(rng.choice(ranges)), rng.choice(pool), rng.choice(BROWSERS))
    # captcha_solver: six prefixes of one range, a new address each time, 40 % of CAPTCHAs solved.
    base = numbers.draw("ES")
    prefixes = list({base[:-6] + f"{rng.randrange(100):02d}" for _ in range(6)})
    for t in _every(rng, 2.0 / scale, seconds):
        number = numbers.in_prefix(rng.choice(prefixes)) if prefixes else base
        attacker("captcha_solver", t, number, public_ip(rng), rng.choice(BROWSERS), solves=0.4)

    traffic.schedule.sort(key=lambda item: item[0])
    return traffic


def _every(rng: random.Random, interval: float, seconds: float) -> Iterator[float]:
    """About every `interval` seconds (jittered by a fifth), from a random start in the first interval."""
    t = rng.uniform(0, interval)
    while t < seconds:
        yield t
        t += interval * rng.uniform(0.8, 1.2)

"""The fraud bench's traffic: reproducible per seed, real numbers of each kind, attacks shaped as
bench/fraud_traffic.py says, and its report's table and summary line."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import phonenumbers

from bench.fraud import summary_line, table
from bench.fraud_traffic import ATTACKS, LEGIT, generate


def _type(number: str) -> int:
    return phonenumbers.number_type(phonenumbers.parse(number, None))


def test_a_seed_is_one_traffic_and_another_seed_another() -> None:
    one, again, other = generate(7, 120), generate(7, 120), generate(8, 120)
    assert [(t, r.phone, r.ip) for t, r in one.schedule] == [(t, r.phone, r.ip) for t, r in again.schedule]
    assert [r.phone for _, r in one.schedule] != [r.phone for _, r in other.schedule]


def test_the_kinds_look_like_what_they_are() -> None:
    traffic = generate(3, 600)
    by_kind: dict[str, list[object]] = {}
    for _, request in traffic.schedule:
        by_kind.setdefault(request.kind, []).append(request)
    assert set(by_kind) == {LEGIT, *ATTACKS}
    people = by_kind[LEGIT]
    assert all(_type(r.phone) in (1, 2) for r in people)  # mobile (or fixed-or-mobile)
    assert len({r.phone for r in people}) == len(people) and all(r.solves_captcha == 1.0 for r in people)
    regions = Counter(phonenumbers.region_code_for_number(phonenumbers.parse(r.phone, None)) for r in people)
    assert set(regions) == {"DE", "FR", "GB", "ES"} and regions.most_common(1)[0][0] == "FR"  # the campaign
    assert all(_type(r.phone) == phonenumbers.PhoneNumberType.PREMIUM_RATE for r in by_kind["premium_rate"])
    sequential = [int(r.phone[-4:]) for r in by_kind["sequential_prefix"]]
    assert len({r.phone[:-4] for r in by_kind["sequential_prefix"]}) == 1
    assert all((b - a) % 10_000 in (1, 2, 3) for a, b in itertools.pairwise(sequential))
    hammer = by_kind["ip_hammer"]
    assert len({(r.ip, r.session_id, r.user_agent) for r in hammer}) == 1 and len({r.phone for r in hammer}) > 500
    assert len({r.phone[:-6] for r in by_kind["slow_spread"]}) <= 3 and len({r.ip for r in by_kind["slow_spread"]}) > 50
    solver = by_kind["captcha_solver"]
    assert len({r.phone[:-4] for r in solver}) <= 6 and all(r.solves_captcha == 0.4 for r in solver)
    assert all(r.enters_code == 0 for kind in ATTACKS for r in by_kind[kind])


def test_the_report_shows_every_kind_and_the_spread() -> None:
    kinds = {kind: {"requests": 100, "sms_share": 0.01, "refused_share": 0.0, "captcha_share": 0.5, "reasons": {},
                    "codes_not_approved": {}} for kind in (LEGIT, *ATTACKS)}  # fmt: skip
    kinds[LEGIT] = {
        **kinds[LEGIT],
        "reasons": {"FRAUD_SUSPECTED:RANGE_VELOCITY": 1},
        "codes_not_approved": {"EXPIRED": 1},
    }
    runs = [
        {"seed": 1, "kinds": kinds, "attack_sms_share": 0.002, "legit_refused_share": 0.001},
        {"seed": 2, "kinds": kinds, "attack_sms_share": 0.004, "legit_refused_share": 0.0},
    ]
    text = table(runs)
    assert all(kind in text for kind in (LEGIT, *ATTACKS)) and "max 0.40 %" in text
    # Refusals and codes typed too late are told apart, summed over the seeds.
    assert "people refused by reason (all seeds): FRAUD_SUSPECTED:RANGE_VELOCITY 2" in text
    assert "not approved, by the verification's status (all seeds): EXPIRED 2" in text
    line = summary_line(runs)
    assert line == "bench fraud: attack_sms=0.30% (max 0.40%) legit_refused=0.05% (max 0.10%) seeds=2"
    assert re.match(r"^bench fraud: attack_sms=", line)

"""The fraud scorer on its own: evidence in nats from counts, as fraud_score.py explains it."""

from __future__ import annotations

import math

import pytest

from services.delivery.fraud_score import (
    Counts,
    KeyStats,
    Kind,
    Request,
    Scorer,
    ScoreSettings,
    binomial_surprise,
    poisson_surprise,
)

SCORER = Scorer(ScoreSettings())
DE = Request(region="DE", line_type="mobile", suffix_block=100)


def keys(**open_requests: float) -> dict[Kind, KeyStats]:
    """Stats with `n` open requests (none entered) in the last ten minutes per named kind."""
    stats = {kind: KeyStats() for kind in Kind}
    for name, count in open_requests.items():
        stats[Kind(name)] = KeyStats(recent=Counts(requests=count))
    return stats


def test_surprise_of_counts() -> None:
    assert poisson_surprise(0, 0.5) == 0.0
    assert poisson_surprise(1, 0.5) == pytest.approx(-math.log(1 - math.exp(-0.5)))
    # Monotonic, and exact far into the tail where 1 - P(N < n) underflows.
    values = [poisson_surprise(n, 1.0) for n in range(1, 60)]
    assert values == sorted(values) and values[-1] > 150
    assert binomial_surprise(1, 1, 0.01) == pytest.approx(-math.log(0.01))
    assert binomial_surprise(0, 10, 0.01) == 0.0
    assert binomial_surprise(40, 40, 0.0096) > 150


def test_nothing_is_free_but_one_number_is_nothing() -> None:
    # The first request for a number in a fresh prefix carries no evidence ...
    assert SCORER.score(DE, keys()).total == 0.0
    # ... a second, unanswered, number in the same prefix within ten minutes already asks for a CAPTCHA.
    second = SCORER.score(DE, keys(prefix=1, range=1, country=1))
    assert second.total >= 3.0 and second.deciding == "PREFIX_VELOCITY"


def test_the_global_budget_grows_with_the_countrys_traffic() -> None:
    quiet = SCORER.score(DE, keys(prefix=2, range=2, country=20)).number
    campaign = SCORER.score(DE, keys(prefix=2, range=2, country=20_000)).number
    assert quiet > 6 and campaign < 1  # the same two numbers are surprising only in a quiet country


def test_entered_codes_are_credit_and_unentered_ones_evidence() -> None:
    stats = keys(prefix=2, range=2, country=20)
    answered = dict(stats)
    answered[Kind.PREFIX] = KeyStats(recent=Counts(requests=2), settled=Counts(requests=10, sms=10, entered=9))
    assert SCORER.score(DE, answered).number < SCORER.score(DE, stats).number
    unanswered = dict(stats)
    unanswered[Kind.CLIENT_COUNTRY] = KeyStats(settled=Counts(requests=40, sms=40, entered=4))
    score = SCORER.score(DE, unanswered)
    assert score.segment > 9 and score.strongest("segment") == "CLIENT_COUNTRY_CONVERSION"
    # A segment where people enter most codes is no evidence at all, however large.
    busy = dict(stats)
    busy[Kind.CLIENT_COUNTRY] = KeyStats(settled=Counts(requests=9000, sms=9000, entered=7900))
    assert SCORER.score(DE, busy).segment == 0.0


def test_a_requester_asking_for_many_numbers() -> None:
    few = SCORER.score(DE, keys(ip=1, net=1, country=20))
    many = SCORER.score(DE, keys(ip=8, net=8, device=8, country=20))
    assert few.total < 3 <= many.requester and many.strongest("requester") in {"IP_VELOCITY", "DEVICE_VELOCITY"}
    # Overlapping keys of one group do not add up: only the strongest counts.
    assert many.requester == pytest.approx(SCORER.score(DE, keys(ip=8, country=20)).requester)


def test_near_sequential_numbers() -> None:
    stats = keys(country=20)
    stats[Kind.PREFIX] = KeyStats(recent=Counts(requests=3), blocks={100: 2, 101: 1})
    run = SCORER.score(DE, stats)
    assert run.signals["SEQUENTIAL_NUMBERS"] > 9
    spread = dict(stats)
    spread[Kind.PREFIX] = KeyStats(recent=Counts(requests=3), blocks={7: 1, 150: 1, 290: 1})
    assert "SEQUENTIAL_NUMBERS" not in SCORER.score(DE, spread).signals


def test_a_repeat_is_not_held_against_its_own_number() -> None:
    again = Request(region="DE", line_type="mobile", suffix_block=100, repeat=True)
    stats = keys(prefix=1, range=1, ip=1, country=1)
    stats[Kind.PREFIX] = KeyStats(recent=Counts(requests=1), blocks={100: 1})
    assert SCORER.score(again, stats).total == 0.0


def test_line_type_and_country_risk() -> None:
    voip = SCORER.score(Request("DE", "voip", 1), keys())
    assert voip.deciding == "LINE_TYPE_VOIP" and voip.total >= 3
    risky = Scorer(ScoreSettings(country_risk={"XX": 4.0})).score(Request("XX", "mobile", 1), keys())
    assert risky.deciding == "COUNTRY_RISK" and risky.number == 4.0


def test_an_address_people_answer_from_may_have_more_codes_being_typed() -> None:
    hammer = keys(ip=5, country=20)
    nat = dict(hammer)
    nat[Kind.IP] = KeyStats(recent=Counts(requests=20, entered=15))  # 5 open, 15 typed: a carrier NAT
    assert SCORER.score(DE, hammer).requester > 6 > 2 > SCORER.score(DE, nat).requester

"""Rate limits and claims on the real dev database: exact under concurrency, shared by replicas."""

from __future__ import annotations

import asyncio

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.mongo import Document
from services.delivery.claims import Claims
from services.delivery.limits import Hit, Limiter, Rate, RateLimited


async def _admitted(limiter: Limiter, hits: list[Hit]) -> bool:
    try:
        await limiter.acquire(hits)
    except RateLimited:
        return False
    return True


async def test_concurrent_hits_from_two_replicas_admit_exactly_the_limit(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    a, b = Limiter(database["limits"], clock), Limiter(database["limits"], clock)
    await a.create_indexes()
    hit = Hit("phone_short", "k1", Rate(10, 600))
    results = await asyncio.gather(*[_admitted(a if i % 2 else b, [hit]) for i in range(40)])
    assert sum(results) == 10


async def test_many_limits_at_once_from_two_replicas_admit_exactly_the_tightest(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    a, b = Limiter(database["limits"], clock), Limiter(database["limits"], clock)
    hits = [
        Hit("client", "c", Rate(50, 600)),
        Hit("phone_short", "p", Rate(7, 600)),
        Hit("global", "all", Rate(90, 60)),
    ]
    results = await asyncio.gather(*[_admitted(a if i % 3 else b, hits) for i in range(30)])
    assert sum(results) == 7
    # Each key's document counts the admitted requests only: refused ones took their units back.
    for key, limit in (("c", "client"), ("p", "phone_short"), ("all", "global")):
        doc = await database["limits"].find_one({"_id": key})
        assert doc is not None and [v for f, v in doc.items() if f.startswith(f"{limit}|")] == [7]


async def test_fixed_window_rolls_over_and_says_when_to_retry(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    limiter = Limiter(database["limits"], clock)
    hit = Hit("client", "c", Rate(2, 60), sliding=False)
    assert await _admitted(limiter, [hit]) and await _admitted(limiter, [hit])
    clock.advance(10)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire([hit])
    assert 49 <= refused.value.retry_after <= 51
    error = refused.value.to_error()
    assert error.reason == "RATE_LIMITED"
    clock.advance(51)
    assert await _admitted(limiter, [hit])


async def test_sliding_window_weighs_the_previous_window(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    limiter = Limiter(database["limits"], clock)
    hit = Hit("phone_short", "p", Rate(4, 100))
    clock.set(clock.now().replace(minute=0, second=0))  # a window boundary (100 s divides an hour)
    for _ in range(4):
        assert await _admitted(limiter, [hit])
    clock.advance(100)  # next window, the previous one still weighs 4 * (1 - 0) = 4
    assert not await _admitted(limiter, [hit])
    clock.advance(50)  # previous weighs 2: two more fit
    assert await _admitted(limiter, [hit]) and await _admitted(limiter, [hit])
    assert not await _admitted(limiter, [hit])


async def test_a_fresh_replica_weighs_the_previous_window_another_filled(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    busy, fresh = Limiter(database["limits"], clock), Limiter(database["limits"], clock)
    hit = Hit("phone_short", "p", Rate(20, 100))
    clock.set(clock.now().replace(minute=0, second=0))
    for _ in range(13):
        assert await _admitted(busy, [hit])
    clock.advance(150)  # the previous window weighs 13 * 0.5 = 6.5: 13 more fit, not 14
    results = [await _admitted(fresh, [hit]) for _ in range(15)]
    assert sum(results) == 13 and not results[-1]


async def test_a_refused_request_gives_back_slots_taken_for_other_limits(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    limiter = Limiter(database["limits"], clock)
    wide, narrow = Hit("client", "c", Rate(3, 60), sliding=False), Hit("phone_short", "p", Rate(1, 60), sliding=False)
    assert await _admitted(limiter, [wide, narrow])
    assert not await _admitted(limiter, [wide, narrow])
    assert not await _admitted(limiter, [wide, narrow])
    # Only the first request counted against "client".
    assert await _admitted(limiter, [wide]) and await _admitted(limiter, [wide])
    assert not await _admitted(limiter, [wide])


async def test_zero_means_unlimited_and_rates_parse() -> None:
    assert Rate.parse("5/10m") == Rate(5, 600)
    assert Rate.parse("20/1d") == Rate(20, 86400)
    assert Rate.parse("3/45") == Rate(3, 45)
    assert Rate(5, 600).describe() == "5 per 10 minutes"
    with pytest.raises(ValueError):
        Rate.parse("five")


async def test_only_one_of_many_concurrent_claims_wins(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    replicas = [Claims(database["claims"], clock, f"r{i}", lease=30) for i in range(5)]
    results = await asyncio.gather(*[replicas[i % 5].acquire("message", "m1", 0) for i in range(20)])
    assert len([r for r in results if r is not None]) == 1


async def test_a_lapsed_lease_can_be_taken_over_and_a_released_claim_at_once(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    dead, survivor = Claims(database["claims"], clock, "dead", 30), Claims(database["claims"], clock, "alive", 30)
    first = await dead.acquire("message", "m", 0)
    assert first is not None
    assert await survivor.acquire("message", "m", 0) is None
    clock.advance(31)
    second = await survivor.acquire("message", "m", 0)
    assert second is not None and second.seq == 2
    await survivor.release(second)
    third = await dead.acquire("message", "m", 2)
    assert third is not None and third.seq == 3


async def test_the_limits_of_one_key_share_one_document(database: AsyncDatabase[Document], clock: ManualClock) -> None:
    limiter = Limiter(database["limits"], clock)
    short, daily = Hit("phone_short", "p", Rate(5, 600)), Hit("phone_daily", "p", Rate(20, 86400))
    for _ in range(3):
        assert await _admitted(limiter, [short, daily])
    docs = await database["limits"].find({}).to_list()
    assert len(docs) == 1 and docs[0]["_id"] == "p"
    assert sorted(v for f, v in docs[0].items() if "|" in f) == [3, 3]


async def test_a_leased_limit_counts_in_leases_and_one_burst_takes_one_at_a_time(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    limiter = Limiter(database["limits"], clock)
    hit = Hit("client", "c", Rate(1000, 60), sliding=False, lease=10)
    clock.set(clock.now().replace(second=0))
    for _ in range(25):
        assert await _admitted(limiter, [hit])
    assert await _count(database, "c", "client") == 30  # three leases of 10; five units left here
    assert all(await asyncio.gather(*[_admitted(limiter, [hit]) for _ in range(64)]))
    assert await _count(database, "c", "client") == 90  # 89 spent: six more leases, one after the other
    clock.advance(60)  # a new window: what is left of the old lease is not spent in it
    assert await _admitted(limiter, [hit])
    doc = await database["limits"].find_one({"_id": "c"})
    assert doc is not None and sorted(v for f, v in doc.items() if f.startswith("client|")) == [10, 90]


async def test_leases_of_two_replicas_never_admit_past_the_limit(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    a, b = Limiter(database["limits"], clock), Limiter(database["limits"], clock)
    hit = Hit("client", "c", Rate(25, 60), sliding=False, lease=10)
    clock.set(clock.now().replace(second=0))
    results = await asyncio.gather(*[_admitted(a if i % 2 else b, [hit]) for i in range(60)])
    # The last lease is cut to what is left (5 of 10): every unit counted is spent.
    assert sum(results) == 25 and await _count(database, "c", "client") == 25
    with pytest.raises(RateLimited) as refused:
        await a.acquire([hit])
    assert refused.value.retry_after == 60


async def test_purge_removes_documents_whose_windows_no_longer_weigh(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    limiter = Limiter(database["limits"], clock)
    await limiter.acquire([Hit("phone_short", "old", Rate(5, 600))])
    clock.advance(900)
    await limiter.acquire([Hit("phone_short", "new", Rate(5, 600))])
    clock.advance(400)  # "old": its window ended 1,300 s ago, beyond what weighs (two windows)
    assert await limiter.purge() == 1
    assert [doc["_id"] async for doc in database["limits"].find({})] == ["new"]


async def _count(database: AsyncDatabase[Document], key: str, limit: str) -> int:
    doc = await database["limits"].find_one({"_id": key})
    assert doc is not None
    return sum(int(v) for f, v in doc.items() if f.startswith(f"{limit}|"))


async def test_an_implicit_claim_keeps_others_away_until_its_lease_on_the_document_lapses(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    creator, other = Claims(database["claims"], clock, "creator", 30), Claims(database["claims"], clock, "other", 30)
    held = creator.implicit("message", "m")
    assert held.seq == 1 and held.implicit
    assert await other.acquire("message", "m", 1, lease_until=held.lease_until) is None
    clock.advance(31)  # the creator died holding it
    taken = await other.acquire("message", "m", 1, lease_until=held.lease_until)
    assert taken is not None and taken.seq == 2
    await creator.release(held)  # a no-op: there is no claim record
    assert await database["claims"].count_documents({}) == 1


async def test_a_key_found_full_is_refused_again_without_a_round_trip_until_it_may_free_up(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    limiter = Limiter(database["limits"], clock)
    hit = Hit("phone_short", "p", Rate(2, 60), sliding=False)
    clock.set(clock.now().replace(second=0))
    assert await _admitted(limiter, [hit]) and await _admitted(limiter, [hit])
    assert not await _admitted(limiter, [hit])
    await database["limits"].delete_many({})  # were it asked, the database would now admit
    clock.advance(30)
    with pytest.raises(RateLimited) as again:
        await limiter.acquire([hit])
    assert again.value.retry_after == 30
    assert await database["limits"].count_documents({}) == 0
    clock.advance(30)  # the next window: asked again
    assert await _admitted(limiter, [hit])


async def test_a_limit_raised_after_a_refusal_is_asked_again_at_once(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    limiter = Limiter(database["limits"], clock)
    clock.set(clock.now().replace(second=0))
    assert await _admitted(limiter, [Hit("phone_short", "p", Rate(1, 60), sliding=False)])
    assert not await _admitted(limiter, [Hit("phone_short", "p", Rate(1, 60), sliding=False)])
    assert await _admitted(limiter, [Hit("phone_short", "p", Rate(2, 60), sliding=False)])  # the policy now allows 2

"""Token buckets on virtual time: pacing, deadlines, per-chat limits and flood pauses."""

from __future__ import annotations

import asyncio

import pytest

from services.botgateway.limiter import FloodPaused, Rate, RateLimited, SendLimiter


class VirtualTime:
    """A monotonic clock that sleeping advances (so pacing is exact and instant)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def make(bot: Rate, chat: Rate) -> tuple[SendLimiter, VirtualTime]:
    vt = VirtualTime()
    return SendLimiter(bot, chat, now=vt.now, sleep=vt.sleep), vt


async def test_burst_to_one_bot_is_paced_at_the_configured_rate() -> None:
    limiter, vt = make(Rate(30, 10), Rate(1, 3))
    start = vt.t
    send_times = []
    for i in range(100):
        await limiter.acquire("bot_a", 1000 + i, None)  # different chats: only the bot bucket binds
        send_times.append(vt.t - start)
    # 10 at once (the burst), then one every 1/30 s: message n goes at (n - 9) / 30.
    assert send_times[:10] == [0.0] * 10
    for n in range(10, 100):
        assert send_times[n] == pytest.approx((n - 9) / 30, abs=1e-9)
    # Over any whole second after the burst, exactly 30 messages.
    assert sum(1 for t in send_times if 1.0 < t <= 2.0) == 30


async def test_chat_bucket_allows_a_small_burst_then_one_per_second() -> None:
    limiter, vt = make(Rate(30, 10), Rate(1, 3))
    start = vt.t
    times = []
    for _ in range(6):
        await limiter.acquire("bot_a", 42, None)
        times.append(round(vt.t - start, 6))
    assert times == [0, 0, 0, 1, 2, 3]


async def test_a_caller_never_waits_past_its_budget_and_takes_no_slot() -> None:
    limiter, vt = make(Rate(1, 1), Rate(100, 100))
    await limiter.acquire("bot_a", 1, 0.0)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire("bot_a", 2, 0.5)
    assert refused.value.scope == "bot"
    assert refused.value.retry_after == pytest.approx(1.0)
    assert vt.sleeps == []  # refused at once, no waiting
    # The refused call reserved nothing: the next one goes exactly one interval after the first.
    waited = await limiter.acquire("bot_a", 3, 1.0)
    assert waited == pytest.approx(1.0)


async def test_chat_scope_is_reported_when_the_chat_binds() -> None:
    limiter, _ = make(Rate(100, 100), Rate(1, 1))
    await limiter.acquire("bot_a", 7, None)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire("bot_a", 7, 0.1)
    assert refused.value.scope == "chat"


async def test_flood_pause_stops_one_bot_only() -> None:
    limiter, _ = make(Rate(30, 10), Rate(1, 3))
    limiter.pause("bot_a", 20)
    with pytest.raises(FloodPaused) as paused:
        await limiter.acquire("bot_a", 1, 5.0)
    assert paused.value.retry_after == pytest.approx(20)
    assert await limiter.acquire("bot_b", 1, 0.0) == 0.0  # other bots are not affected
    # Within the budget, the caller waits the pause out.
    waited = await limiter.acquire("bot_a", 1, 30.0)
    assert waited == pytest.approx(20)
    assert limiter.paused_for("bot_a") == 0


async def test_concurrent_callers_queue_behind_reservations() -> None:
    frozen = 500.0
    waits: list[float] = []

    async def record(seconds: float) -> None:  # time stands still: every caller decides at the same instant
        waits.append(seconds)
        await asyncio.sleep(0)

    limiter = SendLimiter(Rate(10, 1), Rate(100, 100), now=lambda: frozen, sleep=record)
    results = await asyncio.gather(*(limiter.acquire("bot_a", i, None) for i in range(5)))
    # Each reserved its own slot at once, so they go 0.1 s apart instead of all at the same time.
    assert sorted(round(r, 6) for r in results) == [0.0, 0.1, 0.2, 0.3, 0.4]


async def test_idle_chat_buckets_are_evicted() -> None:
    limiter, vt = make(Rate(1000, 1000), Rate(1, 1))
    limiter._max_chats = 10
    for i in range(50):
        await limiter.acquire("bot_a", i, None)
        vt.t += 2
    assert len(limiter._chats) <= 11

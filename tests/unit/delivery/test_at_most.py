"""A dispatcher pass claims and tries its messages side by side (dispatch.at_most): never more
than the limit at once, results in order, and every claimed message runs to its end (writes its
outcome, releases its claim) even when another one fails."""

from __future__ import annotations

import asyncio

import pytest

from services.delivery.dispatch import at_most


async def test_no_more_than_the_limit_run_at_once_and_results_keep_their_order() -> None:
    running = 0
    most = 0
    release = asyncio.Event()

    async def call(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return i * 10

    task = asyncio.create_task(at_most(3, [call(i) for i in range(8)]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert running == 3  # three started, the others wait for a slot
    release.set()
    assert await task == [i * 10 for i in range(8)]
    assert most == 3


async def test_every_call_finishes_when_one_fails_and_the_failure_is_raised() -> None:
    finished: list[int] = []

    async def call(i: int) -> int:
        await asyncio.sleep(0)
        if i == 1:
            raise RuntimeError("database gone")
        finished.append(i)
        return i

    with pytest.raises(RuntimeError, match="database gone"):
        await at_most(2, [call(i) for i in range(5)])
    assert sorted(finished) == [0, 2, 3, 4]

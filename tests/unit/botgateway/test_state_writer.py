"""The handled update state is written coalesced: one write in flight, at most one per spacing,
the newest state last, and a flush writes at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from services.botgateway.updates import StateWriter, UpdateState


def state(pts: int) -> UpdateState:
    return UpdateState(pts=pts, qts=0, date=datetime(2026, 12, 1, tzinfo=UTC), seq=0)


async def settled() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_states_submitted_within_the_spacing_are_written_once_and_a_flush_writes_the_newest_at_once() -> None:
    written: list[int] = []

    async def write(s: UpdateState) -> None:
        written.append(s.pts)

    writer = StateWriter(write, what="b", spacing=3600)
    writer.submit(state(1))
    await settled()
    assert written == [1]  # the first state is written at once
    for pts in range(2, 50):
        writer.submit(state(pts))
    await settled()
    assert written == [1]  # the rest waits out the spacing (an hour here) ...
    await asyncio.wait_for(writer.flush(), 1)
    assert written == [1, 49]  # ... unless flushed: then only the newest, without waiting
    writer.submit(state(50))
    await settled()
    assert written == [1, 49, 50]  # after a flush the writer is free again


async def test_without_spacing_every_state_that_was_newest_when_a_write_ended_is_written() -> None:
    written: list[int] = []
    release = asyncio.Event()

    async def write(s: UpdateState) -> None:
        written.append(s.pts)
        await release.wait()

    writer = StateWriter(write, what="b")
    writer.submit(state(1))
    await settled()
    writer.submit(state(2))
    writer.submit(state(3))  # while 1 is in flight: 2 is never written
    release.set()
    await asyncio.wait_for(writer.flush(), 1)
    assert written == [1, 3]


async def test_a_failed_write_is_retried_by_the_next_submit() -> None:
    written: list[int] = []
    fail = True

    async def write(s: UpdateState) -> None:
        if fail:
            raise ConnectionError("database unreachable")
        written.append(s.pts)

    writer = StateWriter(write, what="b", spacing=3600)
    writer.submit(state(1))
    await settled()
    fail = False
    writer.submit(state(2))
    await settled()
    assert written == [2]

"""The dispatcher's wakeup: idle waits end early when work is noted, and never spin."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from services.core.clock import ManualClock
from services.delivery.wakeup import Wakeup


async def test_noted_work_ends_an_idle_wait_at_once() -> None:
    clock = ManualClock()
    wakeup = Wakeup(clock)
    waiting = asyncio.create_task(wakeup.wait(idle=600, least=0.001))
    await asyncio.sleep(0)
    assert not waiting.done()
    wakeup.at(clock.now())  # e.g. a retry scheduled for now
    await asyncio.wait_for(waiting, 5)  # long before the 600 s idle interval


async def test_work_noted_for_later_does_not_end_the_wait_early() -> None:
    clock = ManualClock()
    wakeup = Wakeup(clock)
    wakeup.at(clock.now() + timedelta(minutes=10))
    waiting = asyncio.create_task(wakeup.wait(idle=600, least=0.001))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    wakeup.at(clock.now() + timedelta(hours=1))  # later than what is noted: changes nothing
    await asyncio.sleep(0.05)
    assert not waiting.done()
    wakeup.at(clock.now() - timedelta(seconds=1))  # overdue
    await asyncio.wait_for(waiting, 5)


async def test_after_a_wait_the_noted_time_is_forgotten() -> None:
    clock = ManualClock()
    wakeup = Wakeup(clock)
    wakeup.at(clock.now())
    await asyncio.wait_for(wakeup.wait(idle=600, least=0.001), 5)
    second = asyncio.create_task(wakeup.wait(idle=600, least=0.001))
    await asyncio.sleep(0.05)
    assert not second.done()  # nothing noted since: an idle wait, not a spin
    second.cancel()

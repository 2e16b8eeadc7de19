"""The random_id of a request, and the record of sends: a repeat is answered or joins the send in flight."""

from __future__ import annotations

import asyncio

import pytest

from services.botgateway.sends import SendRecord, Sent, send_random_id


def test_the_random_id_is_fixed_per_request_and_bot() -> None:
    first = send_random_id("smscodes_bot", "01MSG")
    assert first == send_random_id("smscodes_bot", "01MSG") and first != 0
    assert -(2**63) <= first < 2**63  # Telegram's long
    assert first != send_random_id("smsccode_bot", "01MSG")  # another bot account: another scope
    assert first != send_random_id("smscodes_bot", "01MSH")


async def test_a_repeat_joins_the_send_in_flight_and_later_ones_are_answered_from_the_record() -> None:
    record = SendRecord(size=2)
    released = asyncio.Event()
    calls = 0

    async def send() -> int:
        nonlocal calls
        calls += 1
        await released.wait()
        return 77

    key = ("bot", 1, 5)
    first = asyncio.ensure_future(record.once(key, send))
    await asyncio.sleep(0)
    repeat = asyncio.ensure_future(record.earlier(key))
    await asyncio.sleep(0)
    assert not repeat.done()  # waits for the send in flight instead of making another
    released.set()
    assert await first == Sent(77) and await repeat == Sent(77, already=True) and calls == 1
    assert await record.earlier(key) == Sent(77, already=True)
    # Bounded: the oldest is forgotten (Telegram's own deduplication answers then).
    for other in (("bot", 2, 5), ("bot", 3, 5)):
        await record.once(other, send)
    assert await record.earlier(key) is None


async def test_a_send_outlives_its_caller_and_a_failed_one_is_not_recorded() -> None:
    record = SendRecord()
    released = asyncio.Event()

    async def send() -> int:
        await released.wait()
        return 9

    caller = asyncio.ensure_future(record.once(("bot", 1, 1), send))
    await asyncio.sleep(0)
    caller.cancel()  # the caller's deadline passed
    released.set()
    await asyncio.sleep(0.01)
    assert await record.earlier(("bot", 1, 1)) == Sent(9, already=True)

    async def broken() -> int:
        raise OSError("connection lost")

    with pytest.raises(OSError):
        await record.once(("bot", 1, 2), broken)
    assert await record.earlier(("bot", 1, 2)) is None

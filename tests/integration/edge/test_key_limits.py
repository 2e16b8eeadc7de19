"""The per-key bucket counts requests when they arrive: a stalled database (the real dev database,
paused with SIGSTOP) holding up key lookups does not turn requests made at the allowed rate into
a burst of 429s when it answers, and a wrong secret does not use up a real key's bucket."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.devdb import DevDatabase
from services.core.mongo import connect
from tests.integration.edge.conftest import Edge, edge_stack

LIMITS = {"OTPGATE_EDGE_KEY_RATE": "1", "OTPGATE_EDGE_KEY_BURST": "1", "OTPGATE_EDGE_AUTH_CACHE_SECONDS": "60"}


@pytest.fixture
async def paused_database() -> AsyncIterator[DevDatabase]:
    devdb = DevDatabase()
    devdb.start()
    try:
        yield devdb
    finally:
        assert devdb.process is not None
        if devdb.process.poll() is None:
            os.kill(devdb.process.pid, signal.SIGCONT)
        devdb.stop()


async def _status(edge: Edge, key: str) -> int:
    async with edge.http.post(edge.url("/v1/messages"), headers=edge.auth(key), data=b"{") as reply:
        return reply.status


async def test_requests_during_a_database_stall_are_counted_when_they_came(
    paused_database: DevDatabase, keyring: Keyring, clock: ManualClock
) -> None:
    client = connect(paused_database.uri, "key-limits-test")
    try:
        async with edge_stack(client, keyring, clock=clock, overrides=LIMITS) as edge:
            key = await edge.new_key(edge.client_id, [])  # never looked up yet: the first request reads it
            assert paused_database.process is not None
            os.kill(paused_database.process.pid, signal.SIGSTOP)
            waiting = []
            for _ in range(4):  # one request per second: exactly the key's rate
                waiting.append(asyncio.create_task(_status(edge, key)))
                await asyncio.sleep(0.1)  # it has arrived and waits for the key lookup
                clock.advance(1.0)
            os.kill(paused_database.process.pid, signal.SIGCONT)
            statuses = await asyncio.gather(*waiting)
            # 400: authenticated, the body refused. None was refused for a rate it kept.
            assert statuses == [400, 400, 400, 400]
            # Over the rate, the refusal comes at once.
            assert [await _status(edge, key), await _status(edge, key)] == [400, 429]

            # Wrong secrets with this key's id give their token back: the real key still gets through.
            clock.advance(1.0)
            wrong = key[:-1] + ("a" if key[-1] != "a" else "b")
            assert [await _status(edge, wrong) for _ in range(3)] == [401, 401, 401]
            assert await _status(edge, key) == 400
    finally:
        await client.close()

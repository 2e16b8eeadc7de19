"""Faults under load: the database paused and killed, delivery and botgateway killed, each mid-traffic.

A client sends messages at a steady rate through the edge's HTTP API, as a well-behaved client
does: every message has its own request id, and a refusal that says when to retry (503 or 504 with
Retry-After, or 409 REQUEST_IN_PROGRESS with Retry-After while an earlier try of the same request
id is still being accepted) is retried with the same request id. Meanwhile one part of the system
fails and comes back. Afterwards every message is counted in the people's chats in the simulated
Telegram: accepted and lost (must be none), delivered twice (none), delivered but never accepted
(none); and every answer the client saw on the way must have been success or a retryable refusal
with Retry-After. The whole system runs as separate processes on a dev database of its own, so it
can be paused (SIGSTOP) and killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from services.core.devdb import DevDatabase, free_port
from tests.e2e.conftest import System, running_system

BOT = "smscodes_bot"
PEOPLE = 10
RATE = 20.0  # messages per second
LOAD_SECONDS = 4.0
RETRY_FOR = 45.0  # how long the client keeps retrying one message
RETRYABLE = (409, 503, 504)


@dataclass
class Faulty:
    system: System
    database: DevDatabase
    api_key: str

    async def pause_database(self, seconds: float) -> None:
        assert self.database.process is not None
        os.kill(self.database.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)  # the fault itself: the database hangs this long
        finally:
            os.kill(self.database.process.pid, signal.SIGCONT)

    async def kill_database(self, down_for: float) -> None:
        assert self.database.process is not None
        self.database.process.kill()
        self.database.process.wait()
        await asyncio.sleep(down_for)  # the fault itself: nothing listens this long
        await asyncio.to_thread(self.database.start)

    async def kill_service(self, name: str) -> None:
        """SIGKILL mid-load (no graceful stop), then start it again and wait until it serves."""
        stack = self.system.stack
        process = stack.processes[name]
        process.kill()
        await asyncio.to_thread(process.wait)
        stack.start_service(name)
        await stack.wait_healthy(timeout=60, names=(name,))
        if name == "botgateway":
            assert await stack.wait_bots(timeout=60) == [], "the bots' sessions did not come back"


@pytest.fixture(scope="module")
async def faulty(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Faulty]:
    work: Path = tmp_path_factory.mktemp("faults")
    database = DevDatabase(data_dir=work / "db", port=free_port())
    database.start()
    # Work left behind by a killed process is found within a second, and its claims and bot leases
    # lapse in seconds (not 30): the tests wait for that, not for production's margins. Each person
    # gets many messages, and retries come in bursts: limits are not what is tested.
    overrides = {
        "OTPGATE_SHARED_BOTS": BOT,
        "OTPGATE_DELIVERY_IDLE_POLL_INTERVAL": "1",
        "OTPGATE_DELIVERY_LEASE": "5",
        "OTPGATE_BOTGATEWAY_LEASE_TTL": "9",
        "OTPGATE_BOTGATEWAY_LEASE_RENEW": "1",
        "OTPGATE_DELIVERY_LIMIT_PHONE_SHORT": "100000/600",
        "OTPGATE_DELIVERY_LIMIT_PHONE_DAILY": "100000/86400",
        "OTPGATE_EDGE_IP_RATE": "100000",
        "OTPGATE_EDGE_IP_BURST": "100000",
        "OTPGATE_EDGE_KEY_RATE": "100000",
        "OTPGATE_EDGE_KEY_BURST": "100000",
    }
    try:
        async with running_system(database.uri, work / "logs", **overrides) as system:
            created = system.cli("clients", "create", "faults-shop")
            faulty = Faulty(system, database, str(created["key"]))
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(_connect(session, system, person) for person in range(PEOPLE)))
            yield faulty
    finally:
        database.stop()


def _user(person: int) -> int:
    return 7770000 + person


def _phone(person: int) -> str:
    return f"+7999700{person:04d}"


async def _connect(session: aiohttp.ClientSession, system: System, person: int) -> None:
    users = f"{system.http}/sandbox/v1/users"
    body = {"user": {"userId": str(_user(person)), "phone": _phone(person), "languageCode": "en"}}
    for url, payload in (
        (users, body),
        (f"{users}/{_user(person)}/bots/{BOT}:start", {}),
        (f"{users}/{_user(person)}/bots/{BOT}:shareContact", {}),
    ):
        async with session.post(url, json=payload) as reply:
            assert reply.status == 200, await reply.text()


@dataclass
class Load:
    """What the client saw: accepted message ids by text, and every refusal on the way."""

    accepted: dict[str, str] = field(default_factory=dict)  # text -> message id
    refusals: Counter[str] = field(default_factory=Counter)  # "503", "504", "ClientConnectorError", ...
    unguided: list[str] = field(default_factory=list)  # refusals a client cannot act on
    abandoned: list[str] = field(default_factory=list)  # texts never accepted within RETRY_FOR
    last_refusal: float = 0.0


async def _send_one(session: aiohttp.ClientSession, faulty: Faulty, load: Load, tag: str, n: int) -> None:
    person = n % PEOPLE
    text = f"{tag} message {n}"
    body = {"phone": _phone(person), "text": text, "requestId": f"{tag}-{n}", "bot": BOT}
    headers = {"Authorization": f"Bearer {faulty.api_key}"}
    give_up = time.monotonic() + RETRY_FOR
    while time.monotonic() < give_up:
        try:
            async with session.post(
                f"{faulty.system.http}/v1/messages",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as reply:
                if reply.status == 200:
                    load.accepted[text] = (await reply.json())["message"]["id"]
                    return
                retry_after = reply.headers.get("Retry-After")
                load.refusals[str(reply.status)] += 1
                load.last_refusal = time.monotonic()
                if reply.status not in RETRYABLE or not retry_after:
                    load.unguided.append(f"{reply.status} (Retry-After {retry_after}): {await reply.text()}")
                    return
                await asyncio.sleep(min(float(retry_after), 1.0))  # as told, capped for the test's pace
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            # The edge itself is never killed here: a broken connection would be a finding.
            load.refusals[type(exc).__name__] += 1
            load.unguided.append(f"{type(exc).__name__}: {exc}")
            return
    load.abandoned.append(text)


async def _run_load(faulty: Faulty, tag: str, fault: Callable[[], Awaitable[None]]) -> tuple[Load, float]:
    """Send at RATE for LOAD_SECONDS with `fault` starting a second in; returns what the client saw and
    how long after the fault ended requests kept being refused."""
    load = Load()
    async with aiohttp.ClientSession() as session:
        sends: list[asyncio.Task[None]] = []

        async def generate() -> None:
            started = time.monotonic()
            for n in range(int(RATE * LOAD_SECONDS)):
                sends.append(asyncio.create_task(_send_one(session, faulty, load, tag, n)))
                await asyncio.sleep(max(0.0, started + (n + 1) / RATE - time.monotonic()))  # the load's pace

        generating = asyncio.create_task(generate())
        await asyncio.sleep(1.0)  # the fault strikes a second into the load
        await fault()
        fault_ended = time.monotonic()
        await generating
        await asyncio.gather(*sends)
    return load, max(0.0, load.last_refusal - fault_ended)


async def _received(faulty: Faulty, tag: str, expected: set[str], timeout: float = 45.0) -> Counter[str]:
    """This run's texts in the people's chats, counted, once every expected one has arrived (or time is up)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            seen: Counter[str] = Counter()
            for person in range(PEOPLE):
                url = f"{faulty.system.http}/sandbox/v1/users/{_user(person)}/bots/{BOT}/messages"
                async with session.get(url) as reply:
                    assert reply.status == 200, await reply.text()
                    for message in (await reply.json()).get("messages", []):
                        if message.get("fromBot") and str(message.get("text", "")).startswith(f"{tag} "):
                            seen[message["text"]] += 1
            if expected <= set(seen) or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(0.25)


async def _check(faulty: Faulty, tag: str, fault: Callable[[], Awaitable[None]]) -> None:
    load, recovery = await _run_load(faulty, tag, fault)
    received = await _received(faulty, tag, set(load.accepted))
    lost = sorted(set(load.accepted) - set(received))
    twice = sorted(text for text, count in received.items() if count > 1)
    unknown = sorted(set(received) - set(load.accepted))
    report = (
        f"{tag}: accepted {len(load.accepted)}, received {len(received)}, refusals {dict(load.refusals)}, "
        f"recovered {recovery:.1f}s after the fault"
    )
    print(report)
    assert not load.unguided, f"{report}; refusals a client cannot act on: {load.unguided[:3]}"
    assert not load.abandoned, f"{report}; never accepted: {load.abandoned[:3]}"
    assert not lost, f"{report}; accepted but never delivered: {lost[:5]}"
    assert not twice, f"{report}; delivered twice: {twice[:5]}"
    assert not unknown, f"{report}; delivered but never accepted: {unknown[:5]}"
    assert len(load.accepted) == int(RATE * LOAD_SECONDS)


async def test_a_paused_database_loses_and_repeats_nothing(faulty: Faulty) -> None:
    await _check(faulty, "pause", lambda: faulty.pause_database(6.0))


async def test_a_killed_database_loses_and_repeats_nothing(faulty: Faulty) -> None:
    await _check(faulty, "dbkill", lambda: faulty.kill_database(1.0))


async def test_a_killed_delivery_loses_and_repeats_nothing(faulty: Faulty) -> None:
    await _check(faulty, "delkill", lambda: faulty.kill_service("delivery"))


async def test_a_killed_botgateway_loses_and_repeats_nothing(faulty: Faulty) -> None:
    await _check(faulty, "bgkill", lambda: faulty.kill_service("botgateway"))

"""Outbound URL checks (SSRF): private, loopback and link-local targets are refused outside dev."""

from __future__ import annotations

import aiohttp
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.mongo import Document
from services.delivery.claims import Claims
from services.delivery.webhooks import (
    GuardedResolver,
    UnsafeTarget,
    WebhookOutbox,
    address_allowed,
    check_url,
    guarded_session,
)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_address_classes(address: str, allowed: bool) -> None:
    assert address_allowed(address) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # plain http outside dev
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.0.0.5/hook",
        "https://[::1]/hook",
        "https://user:pw@example.com/hook",
        "https:///nohost",
        "ftp://example.com/x",
    ],
)
async def test_unsafe_targets_are_refused_outside_dev(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        await check_url(url, dev=False)


async def test_dev_mode_allows_local_receivers_and_public_literals_pass() -> None:
    await check_url("http://127.0.0.1:8080/hook", dev=True)
    await check_url("https://8.8.8.8/hook", dev=False)


async def test_the_connection_itself_is_guarded_against_rebinding() -> None:
    resolver = GuardedResolver(allow_private=False)
    with pytest.raises(OSError):
        await resolver.resolve("localhost", 80)
    await resolver.close()
    session = guarded_session(allow_private=False)
    try:
        with pytest.raises(aiohttp.ClientError):
            await session.post("http://localhost:9/hook", data=b"{}")
    finally:
        await session.close()


async def test_the_outbox_refuses_a_private_target_at_delivery_time(
    database: AsyncDatabase[Document], clock: ManualClock
) -> None:
    async def secret(_: str) -> str:
        return "whsec-0123456789abcdef"

    session = guarded_session(allow_private=False)
    outbox = WebhookOutbox(
        database["webhooks"], Claims(database["claims"], clock, "me", 30), session, clock, secret, dev=False
    )
    try:
        await outbox.enqueue("shop", "https://127.0.0.1/hook", "m1:SENT", {"x": 1})
        assert await outbox.deliver_due_once() == 1
        stored = await outbox.get("m1:SENT")
        assert stored is not None and (stored["state"], stored["last_outcome"]) == ("failed", "unsafe_target")
        assert await outbox.deliver_due_once() == 0
    finally:
        await session.close()

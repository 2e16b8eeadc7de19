"""Separate processes, as deployed in sandbox mode: what a person does while botgateway is down is
answered when it is back, and the sandbox keeps its people and chats across a restart of every
service."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.e2e.conftest import System

PHONE = "+79997770001"
USER_ID = 5557001
BOT = "smscodes_bot"


async def _bot_messages(session: aiohttp.ClientSession, system: System) -> list[dict[str, object]]:
    async with session.get(f"{system.http}/sandbox/v1/users/{USER_ID}/bots/{BOT}/messages") as reply:
        assert reply.status == 200, await reply.text()
        return [m for m in (await reply.json()).get("messages", []) if m.get("fromBot")]


async def _eventually(check: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_a_person_is_answered_after_botgateway_comes_back_and_the_sandbox_survives_restarts(
    system: System,
) -> None:
    created = system.cli("clients", "create", "e2e-catch-up")
    headers = {"Authorization": f"Bearer {created['key']}"}
    sandbox = f"{system.http}/sandbox/v1/users"
    async with aiohttp.ClientSession() as session:
        async with session.post(sandbox, json={"user": {"userId": str(USER_ID), "phone": PHONE}}) as reply:
            assert reply.status == 200, await reply.text()

        system.stack.stop_service("botgateway")
        for action in (":start", ":shareContact"):
            async with session.post(f"{sandbox}/{USER_ID}/bots/{BOT}{action}", json={}) as reply:
                assert reply.status == 200, await reply.text()
                assert (await reply.json()).get("replies", []) == []  # nobody answers while it is down
        system.stack.start_service("botgateway")
        await system.stack.wait_healthy(names=("botgateway",))

        async def answered() -> bool:
            return len(await _bot_messages(session, system)) == 2

        await _eventually(answered)
        ask, thanks = await _bot_messages(session, system)
        assert ask["requestContact"] and "4567" not in str(ask) and "0001" in str(thanks["text"])

        # The person is connected: a client's message reaches them.
        body = {"phone": PHONE, "text": "Your code is 5150", "requestId": "e2e-catch-up-1"}
        async with session.post(f"{system.http}/v1/messages", json=body, headers=headers) as reply:
            assert reply.status == 200, await reply.text()

        async def delivered() -> bool:
            return any(m.get("text") == "Your code is 5150" for m in await _bot_messages(session, system))

        await _eventually(delivered)

        # Every service restarts (the dev database stays): the simulated Telegram keeps the chat.
        before = await _bot_messages(session, system)
        system.stack.stop()
        system.stack.start()
        await system.stack.wait_healthy(timeout=120)
        assert await system.stack.wait_bots(timeout=120) == []
        assert await _bot_messages(session, system) == before
        async with session.post(f"{sandbox}/{USER_ID}/bots/{BOT}:sendText", json={"text": "/help"}) as reply:
            assert reply.status == 200, await reply.text()
            assert any("/forget" in r.get("text", "") for r in (await reply.json())["replies"])

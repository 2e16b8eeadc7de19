"""A person connects a shared bot in the sandbox; a client's POST /v1/messages reaches their chat
through edge -> delivery -> directory -> botgateway, each a separate process."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.e2e.conftest import System

PHONE = "+79991234567"
USER_ID = 5550001
BOT = "smscodes_bot"


async def _poll_chat(
    session: aiohttp.ClientSession, system: System, text: str, timeout: float = 20.0
) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + timeout
    url = f"{system.http}/sandbox/v1/users/{USER_ID}/bots/{BOT}/messages"
    while True:
        async with session.get(url) as reply:
            assert reply.status == 200, await reply.text()
            for message in (await reply.json()).get("messages", []):
                if message.get("fromBot") and message.get("text") == text:
                    return message  # type: ignore[no-any-return]
        assert asyncio.get_running_loop().time() < deadline, "message never reached the sandbox chat"
        await asyncio.sleep(0.1)


async def test_message_reaches_a_connected_sandbox_user(system: System) -> None:
    created = system.cli("clients", "create", "e2e-shop")
    api_key = str(created["key"])
    async with aiohttp.ClientSession() as session:
        sandbox = f"{system.http}/sandbox/v1/users"
        async with session.post(
            sandbox, json={"user": {"userId": str(USER_ID), "phone": PHONE, "languageCode": "en"}}
        ) as reply:
            assert reply.status == 200, await reply.text()
        async with session.post(f"{sandbox}/{USER_ID}/bots/{BOT}:start", json={}) as reply:
            assert reply.status == 200, await reply.text()
            replies = (await reply.json())["replies"]
            assert any(r.get("requestContact") for r in replies), replies
        async with session.post(f"{sandbox}/{USER_ID}/bots/{BOT}:shareContact", json={}) as reply:
            assert reply.status == 200, await reply.text()
            assert "4567" in str(await reply.json())

        headers = {"Authorization": f"Bearer {api_key}"}
        body = {"phone": PHONE, "text": "Your code is 4821", "requestId": "e2e-1"}
        async with session.post(f"{system.http}/v1/messages", json=body, headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            message = (await reply.json())["message"]
        assert message["phoneMasked"] == "+7******4567"
        assert PHONE not in str(message)

        received = await _poll_chat(session, system, "Your code is 4821")
        assert received["fromBot"] is True

        async with session.get(f"{system.http}/v1/messages/{message['id']}", headers=headers) as reply:
            assert reply.status == 200
            assert (await reply.json())["message"]["status"] in {"MESSAGE_STATUS_SENT", "MESSAGE_STATUS_DELIVERED"}
        async with session.post(f"{system.http}/v1/messages", json=body) as reply:
            assert reply.status == 401

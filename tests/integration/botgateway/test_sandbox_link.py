"""The sandbox transport's link over real gRPC: the update stream stays open past the channel's
default deadline, as an MTProto connection to Telegram stays open for as long as the client lives."""

from __future__ import annotations

import asyncio

import pytest
from pymongo import AsyncMongoClient
from telethon.crypto import AuthKey

from services.botgateway.sandbox_link import GrpcLink
from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.support.stack import running_stack


async def test_the_update_stream_outlives_the_channels_default_deadline(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with running_stack(mongo_client, keyring, services=["telegramsim"], clock=clock) as stack:
        address = stack.addresses["telegramsim"]
        keys, link = GrpcLink(address), GrpcLink(address, timeout=0.2)
        stream = None
        try:
            key_id = AuthKey(await keys.create_auth_key()).key_id
            stream = link.updates(key_id, 1)
            # Nothing is pushed: five default deadlines later the stream is still waiting, not lost.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(stream), 1.0)
        finally:
            if stream is not None:
                await stream.aclose()
            await link.channel.close()
            await keys.channel.close()

"""Which bots may carry a message to a number, and whether a client may name a bot.

A person reaches us through the bots they started (the directory's ResolvePhone). A shared bot
carries any client's messages; a client's own bot carries only its owner's, and a message naming
one goes through that bot or not at all. A blocked bot is never a candidate.
"""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc

from services.core.clock import as_utc
from services.core.errors import ServiceError, not_found
from services.delivery.bots import BotCatalog


class Router:
    def __init__(self, bots: BotCatalog, directory: directory_pb2_grpc.DirectoryServiceAsyncStub) -> None:
        self.bots = bots
        self.directory = directory

    async def resolve(self, e164: str, bot_id: str) -> directory_pb2.ResolvePhoneResponse:
        """Who holds the number and through which bots (raises the directory's gRPC errors)."""
        return await self.directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=e164, bot_id=bot_id))

    async def bot_owner(self, bot_id: str, client_id: str) -> str:
        """The owner of a client's own bot named in a request ("" for a shared bot). A bot that does
        not exist and another client's bot are the same NOT_FOUND."""
        try:
            info = await self.bots.info(bot_id)
        except grpc.aio.AioRpcError as error:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "BOTGATEWAY_UNAVAILABLE", "cannot check the bot now"
            ) from error
        if info is None or (not info.shared and info.owner_client_id != client_id):
            raise not_found("bot", "BOT_NOT_FOUND")
        return info.owner_client_id if not info.shared else ""

    async def candidates(
        self, resolution: directory_pb2.ResolvePhoneResponse, requested: str, bot_owner: str, client_id: str
    ) -> list[str]:
        """The bots to try, in order: the requested one first when it is a candidate."""
        if not resolution.found:
            return []
        connected = list(resolution.connected_bot_ids)
        if requested and bot_owner:
            # A client's own bot: only that bot, only for its owner.
            return [requested] if requested in connected and bot_owner == client_id else []
        shared: list[str] = []
        for bot_id in [*resolution.shared_bot_ids, *connected]:
            if bot_id in shared:
                continue
            if bot_id in resolution.shared_bot_ids or await self.bots.is_shared(bot_id):
                shared.append(bot_id)
        blocked = set(resolution.blocked_bot_ids)
        shared = [b for b in shared if b not in blocked]
        if requested in shared:
            shared.remove(requested)
            shared.insert(0, requested)
        return shared


def confirmed_at(resolution: directory_pb2.ResolvePhoneResponse) -> datetime | None:
    """When the person last confirmed the number (by an SMS code), None if never."""
    if not resolution.HasField("confirm_time"):
        return None
    return as_utc(resolution.confirm_time.ToDatetime(tzinfo=UTC))

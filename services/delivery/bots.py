"""What delivery knows about bots: shared or a client's own (asked from botgateway, cached briefly)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc

from services.core.errors import parse_rpc_error


@dataclass(frozen=True)
class BotInfo:
    bot_id: str
    shared: bool
    owner_client_id: str


class BotCatalog:
    def __init__(
        self, stub: botgateway_pb2_grpc.BotGatewayServiceAsyncStub, shared_bots: list[str], ttl: float = 60.0
    ) -> None:
        self._stub = stub
        self._configured = set(shared_bots)
        self._ttl = ttl
        self._cache: dict[str, tuple[float, BotInfo | None]] = {}

    async def info(self, bot_id: str) -> BotInfo | None:
        """None: no such bot. Raises grpc errors other than NOT_FOUND (e.g. UNAVAILABLE)."""
        hit = self._cache.get(bot_id)
        if hit is not None and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        try:
            reply = await self._stub.GetBot(botgateway_pb2.GetBotRequest(bot_id=bot_id))
            info: BotInfo | None = BotInfo(
                reply.bot.id or bot_id, reply.bot.shared or bot_id in self._configured, reply.bot.owner_client_id
            )
        except grpc.aio.AioRpcError as error:
            failure = parse_rpc_error(error)
            if failure.code == grpc.StatusCode.NOT_FOUND:
                info = BotInfo(bot_id, True, "") if bot_id in self._configured else None
            elif bot_id in self._configured:
                return BotInfo(bot_id, True, "")
            else:
                raise
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[bot_id] = (time.monotonic(), info)
        return info

    async def is_shared(self, bot_id: str) -> bool:
        if bot_id in self._configured:
            return True
        try:
            info = await self.info(bot_id)
        except grpc.aio.AioRpcError:
            return False
        return bool(info and info.shared)

    async def owner_of(self, bot_id: str) -> str:
        try:
            info = await self.info(bot_id)
        except grpc.aio.AioRpcError:
            return ""
        return info.owner_client_id if info and not info.shared else ""

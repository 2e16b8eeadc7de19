"""The thin servicer of BotGatewayService."""

from __future__ import annotations

from datetime import timedelta

import grpc
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc

from services.botgateway.gateway import Gateway
from services.botgateway.registry import BotRegistry, bot_proto
from services.core.errors import Violations

MAX_TEXT = 4096
MAX_REQUEST_ID = 64


def _budget(context: grpc.aio.ServicerContext[object, object]) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(0.0, float(remaining) - 0.05)  # leave room to answer before the deadline


class BotGatewayServicer(botgateway_pb2_grpc.BotGatewayServiceServicer):
    def __init__(self, gateway: Gateway, registry: BotRegistry) -> None:
        self.gateway = gateway
        self.registry = registry

    async def SendBotMessage(
        self, request: botgateway_pb2.SendBotMessageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.SendBotMessageResponse:
        problems = Violations()
        problems.check(bool(request.bot_id), "bot_id", "required")
        problems.check(request.telegram_user_id > 0, "telegram_user_id", "must be a positive Telegram user id")
        problems.check(bool(request.text.strip()), "text", "required")
        # Telegram counts UTF-16 code units: a text of astral characters may still be refused there,
        # with its own outcome (MESSAGE_TOO_LONG).
        problems.check(len(request.text) <= MAX_TEXT, "text", f"at most {MAX_TEXT} characters")
        delete_after: timedelta | None = None
        if request.HasField("delete_after"):
            delete_after = request.delete_after.ToTimedelta()
            problems.check(
                timedelta(0) < delete_after <= timedelta(hours=48), "delete_after", "must be between 1 s and 48 h"
            )
        problems.check(
            len(request.request_id) <= MAX_REQUEST_ID
            and request.request_id.isascii()
            and request.request_id.isprintable(),
            "request_id",
            f"at most {MAX_REQUEST_ID} printable ASCII characters",
        )
        problems.raise_if_any()
        sent = await self.gateway.send_bot_message(
            request.bot_id.lower(),
            request.telegram_user_id,
            request.text,
            protect_content=request.protect_content,
            silent=request.silent,
            delete_after=delete_after,
            budget=_budget(context),
            request_id=request.request_id,
        )
        return botgateway_pb2.SendBotMessageResponse(telegram_message_id=sent.message_id, already_sent=sent.already)

    async def RegisterBot(
        self, request: botgateway_pb2.RegisterBotRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.RegisterBotResponse:
        bot = await self.registry.register(request.token.strip(), request.owner_client_id, request.shared)
        return botgateway_pb2.RegisterBotResponse(bot=bot_proto(bot))

    async def ListBots(
        self, request: botgateway_pb2.ListBotsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.ListBotsResponse:
        bots, token = await self.registry.list_bots(request.owner_client_id, request.page_size, request.page_token)
        return botgateway_pb2.ListBotsResponse(bots=[bot_proto(b) for b in bots], next_page_token=token)

    async def GetBot(
        self, request: botgateway_pb2.GetBotRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.GetBotResponse:
        return botgateway_pb2.GetBotResponse(bot=bot_proto(await self.registry.get(request.bot_id)))

    async def RemoveBot(
        self, request: botgateway_pb2.RemoveBotRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.RemoveBotResponse:
        await self.registry.remove(request.bot_id, request.owner_client_id)
        return botgateway_pb2.RemoveBotResponse()

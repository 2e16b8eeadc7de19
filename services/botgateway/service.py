"""Thin servicers: BotGatewayService and (sandbox mode) SandboxService."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc

from services.botgateway.gateway import Gateway, bot_unavailable
from services.botgateway.registry import BotRegistry, bot_proto
from services.botgateway.sandbox import (
    ChatNotStarted,
    SandboxError,
    SimMessage,
    SimulatedTelegram,
    SimUser,
    UnknownBot,
    UnknownUser,
)
from services.botgateway.sessions import BotSessions
from services.botgateway.transport import BotNotRunning
from services.core.errors import Violations, failed_precondition, invalid_argument, not_found

T = TypeVar("T")
MAX_TEXT = 4096


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
        problems.check(len(request.text) <= MAX_TEXT, "text", f"at most {MAX_TEXT} characters")
        delete_after: timedelta | None = None
        if request.HasField("delete_after"):
            delete_after = request.delete_after.ToTimedelta()
            problems.check(
                timedelta(0) < delete_after <= timedelta(hours=48), "delete_after", "must be between 1 s and 48 h"
            )
        problems.raise_if_any()
        message_id = await self.gateway.send_bot_message(
            request.bot_id.lower(),
            request.telegram_user_id,
            request.text,
            protect_content=request.protect_content,
            silent=request.silent,
            delete_after=delete_after,
            budget=_budget(context),
        )
        return botgateway_pb2.SendBotMessageResponse(telegram_message_id=message_id)

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


def chat_message(message: SimMessage) -> botgateway_pb2.ChatMessage:
    sent = Timestamp()
    sent.FromDatetime(message.send_time)
    return botgateway_pb2.ChatMessage(
        message_id=message.message_id,
        from_bot=message.from_bot,
        text=message.text,
        protect_content=message.protect_content,
        silent=message.silent,
        request_contact=message.request_contact,
        deleted=message.deleted,
        send_time=sent,
    )


def sandbox_user(user: SimUser) -> botgateway_pb2.SandboxUser:
    return botgateway_pb2.SandboxUser(
        user_id=user.user_id,
        first_name=user.first_name,
        language_code=user.language_code,
        phone=user.phone,
        deactivated=user.deactivated,
    )


async def _sandbox_call(action: Callable[[], Awaitable[T]], bot_id: str = "") -> T:
    try:
        return await action()
    except UnknownUser:
        raise not_found("sandbox user", "USER_NOT_FOUND") from None
    except UnknownBot:
        raise not_found(f"bot {bot_id}", "BOT_NOT_FOUND") from None
    except ChatNotStarted as exc:
        raise failed_precondition("CHAT_NOT_STARTED", str(exc)) from None
    except SandboxError as exc:
        raise invalid_argument([("request", str(exc))]) from None
    except BotNotRunning:
        raise bot_unavailable(bot_id) from None


class SandboxServicer(botgateway_pb2_grpc.SandboxServiceServicer):
    def __init__(self, telegram: SimulatedTelegram, sessions: BotSessions | None = None) -> None:
        self.telegram = telegram
        self.sessions = sessions

    async def _bot_ready(self, bot_id: str) -> None:
        """A user's action reaches the bot only through a live session (started now if it lapsed)."""
        if self.sessions is not None and bot_id:
            await self.sessions.ensure_live(bot_id.lower())

    async def CreateSandboxUser(
        self, request: botgateway_pb2.CreateSandboxUserRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.CreateSandboxUserResponse:
        user = request.user

        async def create() -> SimUser:
            return self.telegram.create_user(
                user.user_id, user.first_name, user.language_code or "en", user.phone, user.deactivated
            )

        created = await _sandbox_call(create)
        return botgateway_pb2.CreateSandboxUserResponse(user=sandbox_user(created))

    async def ListSandboxUsers(
        self, request: botgateway_pb2.ListSandboxUsersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.ListSandboxUsersResponse:
        problems = Violations()
        problems.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        after = 0
        if request.page_token:
            after = int(request.page_token) if request.page_token.isdigit() else -1
            problems.check(after > 0, "page_token", "is not a token from a previous page")
        problems.raise_if_any()
        size = request.page_size or 100
        users = sorted((u for u in self.telegram.users.values() if u.user_id > after), key=lambda u: u.user_id)
        reply = botgateway_pb2.ListSandboxUsersResponse(users=[sandbox_user(u) for u in users[:size]])
        if len(users) > size:
            reply.next_page_token = str(users[size - 1].user_id)
        return reply

    async def StartBot(
        self, request: botgateway_pb2.StartBotRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.StartBotResponse:
        await self._bot_ready(request.bot_id)
        replies = await _sandbox_call(
            lambda: self.telegram.start(request.user_id, request.bot_id, request.payload), request.bot_id
        )
        return botgateway_pb2.StartBotResponse(replies=[chat_message(m) for m in replies])

    async def ShareContact(
        self, request: botgateway_pb2.ShareContactRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.ShareContactResponse:
        await self._bot_ready(request.bot_id)
        replies = await _sandbox_call(
            lambda: self.telegram.share_contact(request.user_id, request.bot_id, request.phone, request.forwarded),
            request.bot_id,
        )
        return botgateway_pb2.ShareContactResponse(replies=[chat_message(m) for m in replies])

    async def SendText(
        self, request: botgateway_pb2.SendTextRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.SendTextResponse:
        await self._bot_ready(request.bot_id)
        if len(request.text) > MAX_TEXT:
            raise invalid_argument([("text", f"at most {MAX_TEXT} characters")])
        replies = await _sandbox_call(
            lambda: self.telegram.send_text(request.user_id, request.bot_id, request.text), request.bot_id
        )
        return botgateway_pb2.SendTextResponse(replies=[chat_message(m) for m in replies])

    async def SetBotBlocked(
        self, request: botgateway_pb2.SetBotBlockedRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.SetBotBlockedResponse:
        await self._bot_ready(request.bot_id)
        await _sandbox_call(
            lambda: self.telegram.set_blocked(request.user_id, request.bot_id, request.blocked), request.bot_id
        )
        return botgateway_pb2.SetBotBlockedResponse()

    async def ListChatMessages(
        self, request: botgateway_pb2.ListChatMessagesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> botgateway_pb2.ListChatMessagesResponse:
        async def read() -> list[SimMessage]:
            return self.telegram.history(request.user_id, request.bot_id, request.after_message_id)

        messages = await _sandbox_call(read, request.bot_id)
        return botgateway_pb2.ListChatMessagesResponse(messages=[chat_message(m) for m in messages])

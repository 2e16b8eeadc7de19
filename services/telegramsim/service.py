"""Thin servicers of the simulated Telegram: MtprotoService (the bots' side) and SandboxService
(the people's side)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc

from services.core.errors import ServiceError, Violations, failed_precondition, invalid_argument, not_found
from services.core.sandbox import sandbox_gateway_token
from services.telegramsim.gateway import SimulatedGateway
from services.telegramsim.gateway_store import GatewayRequest
from services.telegramsim.model import (
    ChatNotStarted,
    RpcError,
    SandboxError,
    SimMessage,
    SimUser,
    UnknownBot,
    UnknownUser,
)
from services.telegramsim.mtproto import MalformedRequest, MtprotoEndpoint
from services.telegramsim.telegram import SimulatedTelegram

T = TypeVar("T")
P = telegramsim_pb2
Context = grpc.aio.ServicerContext[object, object]
MAX_TEXT = 4096


def _session(auth_key_id: int, session_id: int) -> None:
    problems = Violations()
    problems.check(auth_key_id != 0, "auth_key_id", "required (from CreateAuthKey)")
    problems.check(session_id != 0, "session_id", "required (a random 64-bit session id)")
    problems.raise_if_any()


def rpc_failure(error: RpcError) -> ServiceError:
    """An rpc_error that ends an update stream, carried as the status's reason and metadata."""
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED if error.code in (-404, 401, 406) else grpc.StatusCode.FAILED_PRECONDITION,
        error.message,
        f"Telegram answered {error.code} {error.message}",
        metadata={"error_code": str(error.code)},
    )


class MtprotoServicer(telegramsim_pb2_grpc.MtprotoServiceServicer):
    def __init__(self, endpoint: MtprotoEndpoint) -> None:
        self.endpoint = endpoint

    async def CreateAuthKey(self, request: P.CreateAuthKeyRequest, context: Context) -> P.CreateAuthKeyResponse:
        return P.CreateAuthKeyResponse(auth_key=await self.endpoint.create_auth_key())

    async def Invoke(self, request: P.InvokeRequest, context: Context) -> P.InvokeResponse:
        _session(request.auth_key_id, request.session_id)
        if not request.query:
            raise invalid_argument([("query", "required: one serialized TL function")])
        try:
            result = await self.endpoint.invoke(request.auth_key_id, request.session_id, request.query)
        except RpcError as error:
            return P.InvokeResponse(error=P.RpcError(error_code=error.code, error_message=error.message))
        except MalformedRequest as exc:
            raise invalid_argument([("query", f"is not a serialized TL function ({exc})")]) from None
        return P.InvokeResponse(result=result)

    async def StreamUpdates(
        self, request: P.StreamUpdatesRequest, context: Context
    ) -> AsyncIterator[P.StreamUpdatesResponse]:
        try:
            _session(request.auth_key_id, request.session_id)
            async for data in self.endpoint.updates(request.auth_key_id, request.session_id):
                yield P.StreamUpdatesResponse(updates=data)
        except RpcError as error:
            await context.abort_with_status(rpc_failure(error).to_grpc_status())
        except ServiceError as error:
            await context.abort_with_status(error.to_grpc_status())

    async def CloseSession(self, request: P.CloseSessionRequest, context: Context) -> P.CloseSessionResponse:
        _session(request.auth_key_id, request.session_id)
        self.endpoint.close(request.auth_key_id, request.session_id)
        return P.CloseSessionResponse()

    async def AcknowledgeUpdates(
        self, request: P.AcknowledgeUpdatesRequest, context: Context
    ) -> P.AcknowledgeUpdatesResponse:
        _session(request.auth_key_id, request.session_id)
        problems = Violations()
        problems.check(request.pts >= 0, "pts", "must not be negative")
        problems.check(request.qts >= 0, "qts", "must not be negative")
        problems.raise_if_any()
        self.endpoint.acknowledge(request.auth_key_id, request.pts, request.qts)
        return P.AcknowledgeUpdatesResponse()


def chat_message(message: SimMessage) -> P.ChatMessage:
    sent = Timestamp()
    sent.FromDatetime(message.date)
    return P.ChatMessage(
        message_id=message.user_message_id,
        bot_message_id=message.bot_message_id,
        from_bot=message.from_bot,
        text=message.text,
        protect_content=message.protect_content,
        silent=message.silent,
        request_contact=message.request_contact,
        deleted=message.deleted,
        send_time=sent,
    )


def sandbox_user(user: SimUser) -> P.SandboxUser:
    return P.SandboxUser(
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


def _wait(context: Context) -> float | None:
    """How long an action may wait for the bot's replies: short of the caller's deadline."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, float(remaining) - 0.2)


def _chat(user_id: int, bot_id: str) -> None:
    problems = Violations()
    problems.check(user_id > 0, "user_id", "must be a positive Telegram user id")
    problems.check(bool(bot_id), "bot_id", "required")
    problems.raise_if_any()


def code_message(request: GatewayRequest) -> P.VerificationCodeMessage:
    sent = Timestamp()
    if request.sent_at is not None:
        sent.FromDatetime(request.sent_at)
    return P.VerificationCodeMessage(
        message_id=request.message_id,
        text=request.text,
        status=request.delivery_status,
        send_time=sent,
        request_id=request.request_id,
    )


def _user_id(user_id: int) -> None:
    problems = Violations()
    problems.check(user_id > 0, "user_id", "must be a positive Telegram user id")
    problems.raise_if_any()


class SandboxServicer(telegramsim_pb2_grpc.SandboxServiceServicer):
    def __init__(self, telegram: SimulatedTelegram, gateway: SimulatedGateway) -> None:
        self.telegram = telegram
        self.gateway = gateway

    async def CreateSandboxUser(
        self, request: P.CreateSandboxUserRequest, context: Context
    ) -> P.CreateSandboxUserResponse:
        user = request.user
        created = await _sandbox_call(
            lambda: self.telegram.create_user(
                user.user_id, user.first_name, user.language_code or "en", user.phone, user.deactivated
            )
        )
        return P.CreateSandboxUserResponse(user=sandbox_user(created))

    async def ListSandboxUsers(
        self, request: P.ListSandboxUsersRequest, context: Context
    ) -> P.ListSandboxUsersResponse:
        problems = Violations()
        problems.check(0 <= request.page_size <= 1000, "page_size", "must be between 0 and 1000")
        after = 0
        if request.page_token:
            after = int(request.page_token) if request.page_token.isdigit() else -1
            problems.check(after > 0, "page_token", "is not a token from a previous page")
        problems.raise_if_any()
        size = request.page_size or 100
        users = sorted((u for u in self.telegram.users.values() if u.user_id > after), key=lambda u: u.user_id)
        reply = P.ListSandboxUsersResponse(users=[sandbox_user(u) for u in users[:size]])
        if len(users) > size:
            reply.next_page_token = str(users[size - 1].user_id)
        return reply

    async def StartBot(self, request: P.StartBotRequest, context: Context) -> P.StartBotResponse:
        _chat(request.user_id, request.bot_id)
        replies = await _sandbox_call(
            lambda: self.telegram.start_bot(request.user_id, request.bot_id, request.payload, _wait(context)),
            request.bot_id,
        )
        return P.StartBotResponse(replies=[chat_message(m) for m in replies])

    async def ShareContact(self, request: P.ShareContactRequest, context: Context) -> P.ShareContactResponse:
        _chat(request.user_id, request.bot_id)
        replies = await _sandbox_call(
            lambda: self.telegram.share_contact(
                request.user_id, request.bot_id, request.phone, request.forwarded, _wait(context)
            ),
            request.bot_id,
        )
        return P.ShareContactResponse(replies=[chat_message(m) for m in replies])

    async def SendText(self, request: P.SendTextRequest, context: Context) -> P.SendTextResponse:
        _chat(request.user_id, request.bot_id)
        if len(request.text) > MAX_TEXT:
            raise invalid_argument([("text", f"at most {MAX_TEXT} characters")])
        replies = await _sandbox_call(
            lambda: self.telegram.send_text(request.user_id, request.bot_id, request.text, _wait(context)),
            request.bot_id,
        )
        return P.SendTextResponse(replies=[chat_message(m) for m in replies])

    async def SetBotBlocked(self, request: P.SetBotBlockedRequest, context: Context) -> P.SetBotBlockedResponse:
        _chat(request.user_id, request.bot_id)
        await _sandbox_call(
            lambda: self.telegram.set_blocked(request.user_id, request.bot_id, request.blocked, _wait(context)),
            request.bot_id,
        )
        return P.SetBotBlockedResponse()

    async def ListChatMessages(
        self, request: P.ListChatMessagesRequest, context: Context
    ) -> P.ListChatMessagesResponse:
        _chat(request.user_id, request.bot_id)
        if request.after_message_id < 0:
            raise invalid_argument([("after_message_id", "must not be negative")])
        messages = await _sandbox_call(
            lambda: self.telegram.history(request.user_id, request.bot_id, request.after_message_id), request.bot_id
        )
        return P.ListChatMessagesResponse(messages=[chat_message(m) for m in messages])

    async def CreateGatewayAccount(
        self, request: P.CreateGatewayAccountRequest, context: Context
    ) -> P.CreateGatewayAccountResponse:
        if not 0 <= request.balance <= 1_000_000:
            raise invalid_argument([("balance", "must be between 0 and 1000000 credits")])
        token = sandbox_gateway_token(secrets.token_hex(16))
        balance = await self.gateway.open_account(token, request.balance)
        return P.CreateGatewayAccountResponse(token=token, balance=balance)

    async def SetDeviceOnline(self, request: P.SetDeviceOnlineRequest, context: Context) -> P.SetDeviceOnlineResponse:
        _user_id(request.user_id)
        await _sandbox_call(lambda: self.gateway.set_device_online(request.user_id, request.online))
        return P.SetDeviceOnlineResponse()

    async def ListVerificationCodes(
        self, request: P.ListVerificationCodesRequest, context: Context
    ) -> P.ListVerificationCodesResponse:
        return P.ListVerificationCodesResponse(messages=await self._codes(request.user_id, request.after_message_id))

    async def OpenVerificationCodes(
        self, request: P.OpenVerificationCodesRequest, context: Context
    ) -> P.OpenVerificationCodesResponse:
        shown = await self._codes(request.user_id, request.after_message_id, open_chat=True)
        return P.OpenVerificationCodesResponse(messages=shown)

    async def _codes(self, user_id: int, after: int, open_chat: bool = False) -> list[P.VerificationCodeMessage]:
        _user_id(user_id)
        if after < 0:
            raise invalid_argument([("after_message_id", "must not be negative")])
        shown = await _sandbox_call(lambda: self.gateway.codes_chat(user_id, after, open_chat=open_chat))
        return [code_message(r) for r in shown]

    async def ResetSandbox(self, request: P.ResetSandboxRequest, context: Context) -> P.ResetSandboxResponse:
        await self.gateway.reset()
        users, messages = await self.telegram.reset()
        return P.ResetSandboxResponse(users_erased=users, messages_erased=messages)

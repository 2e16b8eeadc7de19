"""gRPC servicers: PublicService (API key) and AdminService (admin scope). Thin: transport only."""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from otpgate.botgateway.v1 import botgateway_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc

from services.core.errors import ServiceError, Violations, invalid_argument
from services.core.outage import is_database_outage
from services.edge import metrics
from services.edge.admin import ClientAdmin
from services.edge.api import ADMIN_SCOPES, Caller, PublicApi, forward
from services.edge.keys import ENUM_TO_SCOPE, SCOPE_TO_ENUM
from services.edge.origin import OriginResolver, grpc_peer_ip
from services.edge.store import ApiKeyRecord, ClientRecord

Context = grpc.aio.ServicerContext[Any, Any]
PUBLIC = "/otpgate.edge.v1.PublicService/"
ADMIN = "/otpgate.edge.v1.AdminService/"


def caller_from(context: Context, origins: OriginResolver, default_timeout: float) -> Caller:
    metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
    remaining = context.time_remaining()
    timeout = default_timeout if remaining is None else max(0.001, min(default_timeout, remaining))
    ip = origins.client_ip(grpc_peer_ip(context.peer() or ""), metadata.get("x-forwarded-for", ""))
    return Caller(authorization=metadata.get("authorization", ""), ip=ip, timeout=timeout)


class PublicServicer(edge_pb2_grpc.PublicServiceServicer):
    def __init__(self, api: PublicApi, origins: OriginResolver, timeout: float) -> None:
        self._api = api
        self._origins = origins
        self._timeout = timeout

    async def _call(self, method: str, request: Message, context: Context) -> Any:
        code = grpc.StatusCode.OK
        try:
            return await self._api.call(method, caller_from(context, self._origins, self._timeout), request)
        except ServiceError as err:
            code = err.code
            raise
        except Exception as exc:
            code = grpc.StatusCode.UNAVAILABLE if is_database_outage(exc) else grpc.StatusCode.INTERNAL
            raise
        finally:
            metrics.requests_total.labels(PUBLIC + method, code.name).inc()

    async def SendMessage(self, request: edge_pb2.SendMessageRequest, context: Context) -> edge_pb2.SendMessageResponse:
        return await self._call("SendMessage", request, context)  # type: ignore[no-any-return]

    async def GetMessage(self, request: edge_pb2.GetMessageRequest, context: Context) -> edge_pb2.GetMessageResponse:
        return await self._call("GetMessage", request, context)  # type: ignore[no-any-return]

    async def ListMessages(
        self, request: edge_pb2.ListMessagesRequest, context: Context
    ) -> edge_pb2.ListMessagesResponse:
        return await self._call("ListMessages", request, context)  # type: ignore[no-any-return]

    async def CancelMessage(
        self, request: edge_pb2.CancelMessageRequest, context: Context
    ) -> edge_pb2.CancelMessageResponse:
        return await self._call("CancelMessage", request, context)  # type: ignore[no-any-return]

    async def CheckReachability(
        self, request: edge_pb2.CheckReachabilityRequest, context: Context
    ) -> edge_pb2.CheckReachabilityResponse:
        return await self._call("CheckReachability", request, context)  # type: ignore[no-any-return]

    async def StartVerification(
        self, request: edge_pb2.StartVerificationRequest, context: Context
    ) -> edge_pb2.StartVerificationResponse:
        return await self._call("StartVerification", request, context)  # type: ignore[no-any-return]

    async def GetVerification(
        self, request: edge_pb2.GetVerificationRequest, context: Context
    ) -> edge_pb2.GetVerificationResponse:
        return await self._call("GetVerification", request, context)  # type: ignore[no-any-return]

    async def CheckVerification(
        self, request: edge_pb2.CheckVerificationRequest, context: Context
    ) -> edge_pb2.CheckVerificationResponse:
        return await self._call("CheckVerification", request, context)  # type: ignore[no-any-return]

    async def CancelVerification(
        self, request: edge_pb2.CancelVerificationRequest, context: Context
    ) -> edge_pb2.CancelVerificationResponse:
        return await self._call("CancelVerification", request, context)  # type: ignore[no-any-return]

    async def ListBots(self, request: edge_pb2.ListBotsRequest, context: Context) -> edge_pb2.ListBotsResponse:
        return await self._call("ListBots", request, context)  # type: ignore[no-any-return]


def _timestamp(moment: Any) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def client_message(record: ClientRecord) -> edge_pb2.Client:
    return edge_pb2.Client(id=record.id, display_name=record.display_name, create_time=_timestamp(record.created_at))


def api_key_message(record: ApiKeyRecord) -> edge_pb2.ApiKey:
    return edge_pb2.ApiKey(
        id=record.id,
        client_id=record.client_id,
        scopes=[SCOPE_TO_ENUM[s] for s in record.scopes if s in SCOPE_TO_ENUM],
        create_time=_timestamp(record.created_at),
        last_use_time=_timestamp(record.last_used_at),
        revoke_time=_timestamp(record.revoked_at),
    )


def _page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _after_id(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise invalid_argument([("page_token", "not a token from a previous page")]) from None


def _page_size(value: int, default: int = 50, maximum: int = 100) -> int:
    if value < 0:
        raise invalid_argument([("page_size", "must not be negative")])
    return min(value or default, maximum)


class AdminServicer(edge_pb2_grpc.AdminServiceServicer):
    def __init__(self, api: PublicApi, admin: ClientAdmin, origins: OriginResolver, timeout: float) -> None:
        self._api = api
        self._admin = admin
        self._origins = origins
        self._timeout = timeout

    async def _admit(self, method: str, context: Context) -> Caller:
        caller = caller_from(context, self._origins, self._timeout)
        await self._api.admit(caller, ADMIN_SCOPES)
        return caller

    async def CreateClient(
        self, request: edge_pb2.CreateClientRequest, context: Context
    ) -> edge_pb2.CreateClientResponse:
        await self._admit("CreateClient", context)
        record = await self._admin.create_client(request.display_name)
        return edge_pb2.CreateClientResponse(client=client_message(record))

    async def GetClient(self, request: edge_pb2.GetClientRequest, context: Context) -> edge_pb2.GetClientResponse:
        await self._admit("GetClient", context)
        return edge_pb2.GetClientResponse(client=client_message(await self._admin.client(request.id)))

    async def ListClients(self, request: edge_pb2.ListClientsRequest, context: Context) -> edge_pb2.ListClientsResponse:
        await self._admit("ListClients", context)
        size = _page_size(request.page_size)
        records = await self._admin.store.list_clients(_after_id(request.page_token), size + 1)
        more = len(records) > size
        records = records[:size]
        return edge_pb2.ListClientsResponse(
            clients=[client_message(r) for r in records],
            next_page_token=_page_token(records[-1].id) if more and records else "",
        )

    async def CreateApiKey(
        self, request: edge_pb2.CreateApiKeyRequest, context: Context
    ) -> edge_pb2.CreateApiKeyResponse:
        await self._admit("CreateApiKey", context)
        problems = Violations()
        for index, scope in enumerate(request.scopes):
            problems.check(scope in ENUM_TO_SCOPE, f"scopes[{index}]", "unknown scope")
        problems.raise_if_any()
        record, key = await self._admin.create_key(request.client_id, [ENUM_TO_SCOPE[s] for s in request.scopes])
        return edge_pb2.CreateApiKeyResponse(api_key=api_key_message(record), key=key)

    async def ListApiKeys(self, request: edge_pb2.ListApiKeysRequest, context: Context) -> edge_pb2.ListApiKeysResponse:
        await self._admit("ListApiKeys", context)
        return edge_pb2.ListApiKeysResponse(
            api_keys=[api_key_message(r) for r in await self._admin.list_keys(request.client_id)]
        )

    async def RevokeApiKey(
        self, request: edge_pb2.RevokeApiKeyRequest, context: Context
    ) -> edge_pb2.RevokeApiKeyResponse:
        await self._admit("RevokeApiKey", context)
        record = await self._admin.revoke_key(request.id)
        self._api.auth.forget(record.id)
        return edge_pb2.RevokeApiKeyResponse(api_key=api_key_message(record))

    async def GetClientPolicy(
        self, request: edge_pb2.GetClientPolicyRequest, context: Context
    ) -> edge_pb2.GetClientPolicyResponse:
        caller = await self._admit("GetClientPolicy", context)
        client = await self._admin.client(request.client_id)
        reply = await forward(
            self._api.delivery.GetClientPolicy, delivery_pb2.GetClientPolicyRequest(client_id=client.id), caller.timeout
        )
        return edge_pb2.GetClientPolicyResponse(policy=reply.policy)

    async def UpdateClientPolicy(
        self, request: edge_pb2.UpdateClientPolicyRequest, context: Context
    ) -> edge_pb2.UpdateClientPolicyResponse:
        caller = await self._admit("UpdateClientPolicy", context)
        client = await self._admin.client(request.policy.client_id)
        policy = type(request.policy)()
        policy.CopyFrom(request.policy)
        policy.client_id = client.id
        reply = await forward(
            self._api.delivery.UpdateClientPolicy,
            delivery_pb2.UpdateClientPolicyRequest(policy=policy, update_mask=request.update_mask),
            caller.timeout,
        )
        self._api.policies.forget(client.id)
        return edge_pb2.UpdateClientPolicyResponse(policy=reply.policy)

    async def RegisterBot(self, request: edge_pb2.RegisterBotRequest, context: Context) -> edge_pb2.RegisterBotResponse:
        caller = await self._admit("RegisterBot", context)
        owner = (await self._admin.client(request.owner_client_id)).id if request.owner_client_id else ""
        reply = await forward(
            self._api.botgateway.RegisterBot,
            botgateway_pb2.RegisterBotRequest(token=request.token, owner_client_id=owner, shared=request.shared),
            caller.timeout,
        )
        return edge_pb2.RegisterBotResponse(bot=reply.bot)

    async def ListAllBots(self, request: edge_pb2.ListAllBotsRequest, context: Context) -> edge_pb2.ListAllBotsResponse:
        caller = await self._admit("ListAllBots", context)
        reply = await forward(
            self._api.botgateway.ListBots,
            botgateway_pb2.ListBotsRequest(
                owner_client_id=request.owner_client_id, page_size=request.page_size, page_token=request.page_token
            ),
            caller.timeout,
        )
        return edge_pb2.ListAllBotsResponse(bots=reply.bots, next_page_token=reply.next_page_token)

    async def RemoveBot(self, request: edge_pb2.RemoveBotRequest, context: Context) -> edge_pb2.RemoveBotResponse:
        caller = await self._admit("RemoveBot", context)
        if not request.bot_id:
            raise invalid_argument([("bot_id", "required")])
        bot = await forward(
            self._api.botgateway.GetBot, botgateway_pb2.GetBotRequest(bot_id=request.bot_id), caller.timeout
        )
        await forward(
            self._api.botgateway.RemoveBot,
            botgateway_pb2.RemoveBotRequest(bot_id=request.bot_id, owner_client_id=bot.bot.owner_client_id),
            caller.timeout,
        )
        return edge_pb2.RemoveBotResponse()


def _counted(route: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Counts a handler's outcomes in otpgate_edge_requests_total."""

    @functools.wraps(handler)
    async def counted(self: Any, request: Any, context: Context) -> Any:
        code = grpc.StatusCode.OK
        try:
            return await handler(self, request, context)
        except ServiceError as err:
            code = err.code
            raise
        except Exception as exc:
            code = grpc.StatusCode.UNAVAILABLE if is_database_outage(exc) else grpc.StatusCode.INTERNAL
            raise
        finally:
            metrics.requests_total.labels(route, code.name).inc()

    return counted


for _method in edge_pb2.DESCRIPTOR.services_by_name["AdminService"].methods:
    setattr(AdminServicer, _method.name, _counted(ADMIN + _method.name, getattr(AdminServicer, _method.name)))

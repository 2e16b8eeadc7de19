"""gRPC servicers: PublicService (API key) and AdminService (admin scope). Thin: transport only."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from google.protobuf.message import Message
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc

from services.core.errors import ServiceError
from services.core.outage import is_database_outage
from services.edge import metrics
from services.edge.admin import AdminApi
from services.edge.api import ADMIN_SCOPES, PublicApi
from services.edge.downstream import Caller
from services.edge.origin import OriginResolver, grpc_peer_ip

Context = grpc.aio.ServicerContext[Any, Any]
PUBLIC = "/otpgate.edge.v1.PublicService/"
ADMIN = "/otpgate.edge.v1.AdminService/"


def caller_from(context: Context, origins: OriginResolver, default_timeout: float) -> Caller:
    metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
    remaining = context.time_remaining()
    timeout = default_timeout if remaining is None else max(0.001, min(default_timeout, remaining))
    ip = origins.client_ip(grpc_peer_ip(context.peer() or ""), metadata.get("x-forwarded-for", ""))
    return Caller(authorization=metadata.get("authorization", ""), ip=ip, timeout=timeout)


async def counted(route: str, work: Awaitable[Message]) -> Message:
    """The outcome of one call, counted in otpgate_edge_requests_total."""
    code = grpc.StatusCode.OK
    try:
        return await work
    except ServiceError as err:
        code = err.code
        raise
    except Exception as exc:
        code = grpc.StatusCode.UNAVAILABLE if is_database_outage(exc) else grpc.StatusCode.INTERNAL
        raise
    finally:
        metrics.requests_total.labels(route, code.name).inc()


class PublicServicer(edge_pb2_grpc.PublicServiceServicer):
    def __init__(self, api: PublicApi, origins: OriginResolver, timeout: float) -> None:
        self._api = api
        self._origins = origins
        self._timeout = timeout

    async def _call(self, method: str, request: Message, context: Context) -> Any:
        caller = caller_from(context, self._origins, self._timeout)
        return await counted(PUBLIC + method, self._api.call(method, caller, request))

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

    async def ListVerifications(
        self, request: edge_pb2.ListVerificationsRequest, context: Context
    ) -> edge_pb2.ListVerificationsResponse:
        return await self._call("ListVerifications", request, context)  # type: ignore[no-any-return]

    async def ListBots(self, request: edge_pb2.ListBotsRequest, context: Context) -> edge_pb2.ListBotsResponse:
        return await self._call("ListBots", request, context)  # type: ignore[no-any-return]

    async def GetUsage(self, request: edge_pb2.GetUsageRequest, context: Context) -> edge_pb2.GetUsageResponse:
        return await self._call("GetUsage", request, context)  # type: ignore[no-any-return]

    async def GetCurrentApiKey(
        self, request: edge_pb2.GetCurrentApiKeyRequest, context: Context
    ) -> edge_pb2.GetCurrentApiKeyResponse:
        return await self._call("GetCurrentApiKey", request, context)  # type: ignore[no-any-return]


class AdminServicer(edge_pb2_grpc.AdminServiceServicer):
    """Every method admits an admin-scope key and hands the request to AdminApi."""

    def __init__(self, api: PublicApi, admin: AdminApi, origins: OriginResolver, timeout: float) -> None:
        self._api = api
        self._admin = admin
        self._origins = origins
        self._timeout = timeout

    async def _call(self, method: str, request: Message, context: Context) -> Any:
        caller = caller_from(context, self._origins, self._timeout)
        return await counted(ADMIN + method, self._admitted(method, caller, request))

    async def _admitted(self, method: str, caller: Caller, request: Message) -> Message:
        principal = await self._api.admit(caller, ADMIN_SCOPES)
        return await self._admin.handlers[method](principal, caller, request)

    async def CreateClient(
        self, request: edge_pb2.CreateClientRequest, context: Context
    ) -> edge_pb2.CreateClientResponse:
        return await self._call("CreateClient", request, context)  # type: ignore[no-any-return]

    async def GetClient(self, request: edge_pb2.GetClientRequest, context: Context) -> edge_pb2.GetClientResponse:
        return await self._call("GetClient", request, context)  # type: ignore[no-any-return]

    async def ListClients(self, request: edge_pb2.ListClientsRequest, context: Context) -> edge_pb2.ListClientsResponse:
        return await self._call("ListClients", request, context)  # type: ignore[no-any-return]

    async def CreateApiKey(
        self, request: edge_pb2.CreateApiKeyRequest, context: Context
    ) -> edge_pb2.CreateApiKeyResponse:
        return await self._call("CreateApiKey", request, context)  # type: ignore[no-any-return]

    async def ListApiKeys(self, request: edge_pb2.ListApiKeysRequest, context: Context) -> edge_pb2.ListApiKeysResponse:
        return await self._call("ListApiKeys", request, context)  # type: ignore[no-any-return]

    async def RevokeApiKey(
        self, request: edge_pb2.RevokeApiKeyRequest, context: Context
    ) -> edge_pb2.RevokeApiKeyResponse:
        return await self._call("RevokeApiKey", request, context)  # type: ignore[no-any-return]

    async def GetClientUsage(
        self, request: edge_pb2.GetClientUsageRequest, context: Context
    ) -> edge_pb2.GetClientUsageResponse:
        return await self._call("GetClientUsage", request, context)  # type: ignore[no-any-return]

    async def GetClientPolicy(
        self, request: edge_pb2.GetClientPolicyRequest, context: Context
    ) -> edge_pb2.GetClientPolicyResponse:
        return await self._call("GetClientPolicy", request, context)  # type: ignore[no-any-return]

    async def UpdateClientPolicy(
        self, request: edge_pb2.UpdateClientPolicyRequest, context: Context
    ) -> edge_pb2.UpdateClientPolicyResponse:
        return await self._call("UpdateClientPolicy", request, context)  # type: ignore[no-any-return]

    async def RegisterBot(self, request: edge_pb2.RegisterBotRequest, context: Context) -> edge_pb2.RegisterBotResponse:
        return await self._call("RegisterBot", request, context)  # type: ignore[no-any-return]

    async def ListAllBots(self, request: edge_pb2.ListAllBotsRequest, context: Context) -> edge_pb2.ListAllBotsResponse:
        return await self._call("ListAllBots", request, context)  # type: ignore[no-any-return]

    async def RemoveBot(self, request: edge_pb2.RemoveBotRequest, context: Context) -> edge_pb2.RemoveBotResponse:
        return await self._call("RemoveBot", request, context)  # type: ignore[no-any-return]

    async def ListFraudEvents(
        self, request: edge_pb2.ListFraudEventsRequest, context: Context
    ) -> edge_pb2.ListFraudEventsResponse:
        return await self._call("ListFraudEvents", request, context)  # type: ignore[no-any-return]

    async def ListFraudRules(
        self, request: edge_pb2.ListFraudRulesRequest, context: Context
    ) -> edge_pb2.ListFraudRulesResponse:
        return await self._call("ListFraudRules", request, context)  # type: ignore[no-any-return]

    async def CreateFraudRule(
        self, request: edge_pb2.CreateFraudRuleRequest, context: Context
    ) -> edge_pb2.CreateFraudRuleResponse:
        return await self._call("CreateFraudRule", request, context)  # type: ignore[no-any-return]

    async def DeleteFraudRule(
        self, request: edge_pb2.DeleteFraudRuleRequest, context: Context
    ) -> edge_pb2.DeleteFraudRuleResponse:
        return await self._call("DeleteFraudRule", request, context)  # type: ignore[no-any-return]

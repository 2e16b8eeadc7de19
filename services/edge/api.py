"""The public API's behaviour, shared by the gRPC servicer and the HTTP/JSON gateway.

Every call goes: per-IP limit -> API key and scope -> per-key limit -> CAPTCHA where the
client's policy asks for it -> the downstream service, with the client id taken from the
key (never from the request) and a deadline. Downstream errors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.message import Message
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.edge.v1 import edge_pb2
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc

from services.core.clock import Clock
from services.core.errors import ServiceError, unauthenticated
from services.core.logging import get_logger
from services.edge.admin import ClientAdmin, api_key_message, client_message
from services.edge.captcha import CaptchaVerifier, may_send_sms, policy_demands
from services.edge.checks import EndUser, check_send, check_start
from services.edge.downstream import Caller, forward
from services.edge.keys import (
    SCOPE_ADMIN,
    SCOPE_READ,
    SCOPE_SEND,
    SCOPE_VERIFY,
    Authenticator,
    Principal,
    key_id_of,
)
from services.edge.limits import EdgeLimits

R = TypeVar("R")
log = get_logger(__name__)

# Scopes that admit each public method (any one of them).
PUBLIC_SCOPES: dict[str, frozenset[str]] = {
    "SendMessage": frozenset({SCOPE_SEND}),
    "GetMessage": frozenset({SCOPE_READ}),
    "ListMessages": frozenset({SCOPE_READ}),
    "CancelMessage": frozenset({SCOPE_SEND}),
    "CheckReachability": frozenset({SCOPE_SEND}),
    "StartVerification": frozenset({SCOPE_VERIFY}),
    "GetVerification": frozenset({SCOPE_VERIFY}),
    "CheckVerification": frozenset({SCOPE_VERIFY}),
    "CancelVerification": frozenset({SCOPE_VERIFY}),
    "ListVerifications": frozenset({SCOPE_VERIFY, SCOPE_READ}),
    "ListBots": frozenset({SCOPE_SEND, SCOPE_READ, SCOPE_VERIFY}),
    "GetUsage": frozenset({SCOPE_READ}),
    # Any valid key may read itself (the console learns its client and scopes from it).
    "GetCurrentApiKey": frozenset(),
}
ADMIN_SCOPES = frozenset({SCOPE_ADMIN})


class PolicyCache:
    """Client policies from delivery, kept briefly (the CAPTCHA rule is read on every send)."""

    def __init__(self, delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub, clock: Clock, ttl_seconds: float) -> None:
        self._delivery = delivery
        self._clock = clock
        self._ttl = timedelta(seconds=ttl_seconds)
        self._items: dict[str, tuple[common_pb2.ClientPolicy, datetime]] = {}

    async def get(self, client_id: str, timeout: float) -> common_pb2.ClientPolicy:
        now = self._clock.now()
        cached = self._items.get(client_id)
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        reply = await forward(
            self._delivery.GetClientPolicy, delivery_pb2.GetClientPolicyRequest(client_id=client_id), timeout
        )
        if len(self._items) > 10_000:
            self._items.clear()
        self._items[client_id] = (reply.policy, now)
        return reply.policy

    def forget(self, client_id: str) -> None:
        self._items.pop(client_id, None)


class PublicApi:
    def __init__(
        self,
        *,
        auth: Authenticator,
        limits: EdgeLimits,
        captcha: CaptchaVerifier,
        policies: PolicyCache,
        delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub,
        verification: verification_pb2_grpc.VerificationServiceAsyncStub,
        botgateway: botgateway_pb2_grpc.BotGatewayServiceAsyncStub,
        clients: ClientAdmin,
    ) -> None:
        self.auth = auth
        self.clients = clients
        self.limits = limits
        self.captcha = captcha
        self.policies = policies
        self.delivery = delivery
        self.verification = verification
        self.botgateway = botgateway
        self._handlers: dict[str, Callable[[Principal, Caller, Any], Awaitable[Message]]] = {
            "SendMessage": self.send_message,
            "GetMessage": self.get_message,
            "ListMessages": self.list_messages,
            "CancelMessage": self.cancel_message,
            "CheckReachability": self.check_reachability,
            "StartVerification": self.start_verification,
            "GetVerification": self.get_verification,
            "CheckVerification": self.check_verification,
            "CancelVerification": self.cancel_verification,
            "ListVerifications": self.list_verifications,
            "ListBots": self.list_bots,
            "GetUsage": self.get_usage,
            "GetCurrentApiKey": self.get_current_api_key,
        }

    async def admit(self, caller: Caller, scopes: frozenset[str]) -> Principal:
        """Per-IP limit, then the per-key limit, then the key and its scope. The key's bucket is
        charged when the request arrives, before the key is looked up, so requests held up by a slow
        database are counted at the rate they came, not as a burst when it answers; a request whose
        key is refused gives its token back (a wrong secret cannot drain a real key's bucket)."""
        self.limits.check_ip(caller.ip)
        key_id = key_id_of(caller.authorization)
        if key_id:
            self.limits.check_key(key_id)
        try:
            return await self.auth.authenticate(caller.authorization, scopes)
        except ServiceError:
            if key_id:
                self.limits.give_back_key(key_id)
            raise

    async def call(self, method: str, caller: Caller, request: Message) -> Message:
        principal = await self.admit(caller, PUBLIC_SCOPES[method])
        return await self.handle(method, principal, caller, request)

    async def handle(self, method: str, principal: Principal, caller: Caller, request: Message) -> Message:
        return await self._handlers[method](principal, caller, request)

    async def _captcha(
        self, principal: Principal, caller: Caller, user: EndUser, token: str, channel: int, sms_fallback: bool | None
    ) -> common_pb2.Origin:
        """The Origin to send downstream. A token is demanded when the client's policy needs one for
        this request; otherwise one that came along is checked only so that the fraud guard can use
        it, and a token the provider refuses or cannot check counts as none (it is never a 503)."""
        possible = self.captcha.configured
        policy = await self.policies.get(principal.client_id, caller.timeout)
        fallback = policy.sms_fallback if sms_fallback is None else sms_fallback
        if policy_demands(policy.captcha_rule, may_send_sms(channel, fallback)):
            await self.captcha.verify(token, user.ip)  # CAPTCHA_REQUIRED / CAPTCHA_INVALID / UNAVAILABLE
            return user.origin(captcha_verified=True, captcha_possible=possible)
        verified = False
        if token and possible:
            try:
                await self.captcha.verify(token, user.ip)
                verified = True
            except ServiceError as refusal:
                log.info("captcha_token_not_used", reason=refusal.reason)
        return user.origin(captcha_verified=verified, captcha_possible=possible)

    # Messages ------------------------------------------------------------------

    async def send_message(
        self, principal: Principal, caller: Caller, request: edge_pb2.SendMessageRequest
    ) -> edge_pb2.SendMessageResponse:
        user = check_send(request, caller.ip)
        origin = await self._captcha(
            principal,
            caller,
            user,
            request.captcha_token,
            request.channel,
            request.sms_fallback if request.HasField("sms_fallback") else None,
        )
        downstream = delivery_pb2.SendMessageRequest(
            client_id=principal.client_id,
            phone=request.phone,
            text=request.text,
            code=request.code,
            channel=request.channel,
            bot=request.bot,
            protect_content=request.protect_content,
            callback_url=request.callback_url,
            request_id=request.request_id,
            origin=origin,
            purpose=delivery_pb2.MESSAGE_PURPOSE_MESSAGE,
        )
        if request.HasField("confirm_days"):
            downstream.confirm_days = request.confirm_days
        if request.HasField("sms_fallback"):
            downstream.sms_fallback = request.sms_fallback
        if request.HasField("ttl"):
            downstream.ttl.CopyFrom(request.ttl)
        if request.HasField("delete_after"):
            downstream.delete_after.CopyFrom(request.delete_after)
        reply = await forward(self.delivery.SendMessage, downstream, caller.timeout)
        return edge_pb2.SendMessageResponse(message=reply.message)

    async def get_message(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetMessageRequest
    ) -> edge_pb2.GetMessageResponse:
        reply = await forward(
            self.delivery.GetMessage,
            delivery_pb2.GetMessageRequest(client_id=principal.client_id, id=request.id),
            caller.timeout,
        )
        return edge_pb2.GetMessageResponse(message=reply.message)

    async def list_messages(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListMessagesRequest
    ) -> edge_pb2.ListMessagesResponse:
        downstream = delivery_pb2.ListMessagesRequest(
            client_id=principal.client_id,
            page_size=request.page_size,
            page_token=request.page_token,
            status=request.status,
        )
        if request.HasField("create_time_after"):
            downstream.create_time_after.CopyFrom(request.create_time_after)
        if request.HasField("create_time_before"):
            downstream.create_time_before.CopyFrom(request.create_time_before)
        reply = await forward(self.delivery.ListMessages, downstream, caller.timeout)
        return edge_pb2.ListMessagesResponse(messages=reply.messages, next_page_token=reply.next_page_token)

    async def cancel_message(
        self, principal: Principal, caller: Caller, request: edge_pb2.CancelMessageRequest
    ) -> edge_pb2.CancelMessageResponse:
        reply = await forward(
            self.delivery.CancelMessage,
            delivery_pb2.CancelMessageRequest(client_id=principal.client_id, id=request.id),
            caller.timeout,
        )
        return edge_pb2.CancelMessageResponse(message=reply.message)

    async def check_reachability(
        self, principal: Principal, caller: Caller, request: edge_pb2.CheckReachabilityRequest
    ) -> edge_pb2.CheckReachabilityResponse:
        reply = await forward(
            self.delivery.CheckReachability,
            delivery_pb2.CheckReachabilityRequest(
                client_id=principal.client_id,
                phone=request.phone,
                bot=request.bot,
                origin=common_pb2.Origin(ip=caller.ip),
            ),
            caller.timeout,
        )
        return edge_pb2.CheckReachabilityResponse(
            reachable=reply.reachable, bot_id=reply.bot_id, confirmed=reply.confirmed
        )

    # Verifications -----------------------------------------------------------

    async def start_verification(
        self, principal: Principal, caller: Caller, request: edge_pb2.StartVerificationRequest
    ) -> edge_pb2.StartVerificationResponse:
        user = check_start(request, caller.ip)
        origin = await self._captcha(principal, caller, user, request.captcha_token, request.channel, None)
        downstream = verification_pb2.StartVerificationRequest(
            client_id=principal.client_id,
            phone=request.phone,
            channel=request.channel,
            code_length=request.code_length,
            locale=request.locale,
            bot=request.bot,
            request_id=request.request_id,
            origin=origin,
            custom_code=request.custom_code,
            gateway_code=request.gateway_code,
        )
        if request.HasField("ttl"):
            downstream.ttl.CopyFrom(request.ttl)
        reply = await forward(self.verification.StartVerification, downstream, caller.timeout)
        return edge_pb2.StartVerificationResponse(verification=reply.verification)

    async def get_verification(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetVerificationRequest
    ) -> edge_pb2.GetVerificationResponse:
        reply = await forward(
            self.verification.GetVerification,
            verification_pb2.GetVerificationRequest(client_id=principal.client_id, id=request.id),
            caller.timeout,
        )
        return edge_pb2.GetVerificationResponse(verification=reply.verification)

    async def check_verification(
        self, principal: Principal, caller: Caller, request: edge_pb2.CheckVerificationRequest
    ) -> edge_pb2.CheckVerificationResponse:
        reply = await forward(
            self.verification.CheckVerification,
            verification_pb2.CheckVerificationRequest(client_id=principal.client_id, id=request.id, code=request.code),
            caller.timeout,
        )
        return edge_pb2.CheckVerificationResponse(verification=reply.verification, approved=reply.approved)

    async def cancel_verification(
        self, principal: Principal, caller: Caller, request: edge_pb2.CancelVerificationRequest
    ) -> edge_pb2.CancelVerificationResponse:
        reply = await forward(
            self.verification.CancelVerification,
            verification_pb2.CancelVerificationRequest(client_id=principal.client_id, id=request.id),
            caller.timeout,
        )
        return edge_pb2.CancelVerificationResponse(verification=reply.verification)

    async def list_verifications(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListVerificationsRequest
    ) -> edge_pb2.ListVerificationsResponse:
        reply = await forward(
            self.verification.ListVerifications,
            verification_pb2.ListVerificationsRequest(
                client_id=principal.client_id,
                page_size=request.page_size,
                page_token=request.page_token,
                filter=request.filter,
            ),
            caller.timeout,
        )
        return edge_pb2.ListVerificationsResponse(
            verifications=reply.verifications, next_page_token=reply.next_page_token
        )

    # Telegram Gateway reports --------------------------------------------------

    async def gateway_report(self, body: bytes, timestamp: str, signature: str, timeout: float) -> None:
        """A delivery report the Telegram Gateway posted: no API key, delivery checks its signature."""
        request = delivery_pb2.ApplyGatewayReportRequest(body=body, timestamp=timestamp, signature=signature)
        await forward(self.delivery.ApplyGatewayReport, request, timeout)

    # Usage and the caller ------------------------------------------------------

    async def get_usage(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetUsageRequest
    ) -> edge_pb2.GetUsageResponse:
        return await self.usage_of(principal.client_id, request.start_day, request.end_day, caller.timeout)

    async def usage_of(self, client_id: str, start_day: str, end_day: str, timeout: float) -> edge_pb2.GetUsageResponse:
        """A client's usage per day and channel (its own through GetUsage, any through the admin API)."""
        reply = await forward(
            self.delivery.GetUsage,
            delivery_pb2.GetUsageRequest(client_id=client_id, start_day=start_day, end_day=end_day),
            timeout,
        )
        return edge_pb2.GetUsageResponse(
            records=[
                edge_pb2.UsageRecord(
                    day=r.day,
                    channel=r.channel,
                    messages=r.messages,
                    billed_sms=r.billed_sms,
                    sms_parts=r.sms_parts,
                    cost=r.cost,
                    refunded=r.refunded,
                )
                for r in reply.records
            ]
        )

    async def get_current_api_key(
        self, principal: Principal, caller: Caller, request: edge_pb2.GetCurrentApiKeyRequest
    ) -> edge_pb2.GetCurrentApiKeyResponse:
        key = await self.clients.store.get_key(principal.key_id)
        client = await self.clients.store.get_client(principal.client_id)
        if key is None or client is None:  # removed since the key was checked
            raise unauthenticated("API_KEY_INVALID", "the API key is invalid")
        return edge_pb2.GetCurrentApiKeyResponse(api_key=api_key_message(key), client=client_message(client))

    # Bots ----------------------------------------------------------------------

    async def list_bots(
        self, principal: Principal, caller: Caller, request: edge_pb2.ListBotsRequest
    ) -> edge_pb2.ListBotsResponse:
        reply = await forward(
            self.botgateway.ListBots,
            botgateway_pb2.ListBotsRequest(
                owner_client_id=principal.client_id, page_size=request.page_size, page_token=request.page_token
            ),
            caller.timeout,
        )
        return edge_pb2.ListBotsResponse(bots=reply.bots, next_page_token=reply.next_page_token)

"""CheckReachability: could a message to this number go out through a bot now, and would it be held?

Read-only apart from its own rate limit (per client): the same routing as a send (routing.py)
and the same re-confirmation rule (hold.py) with the client's default confirm_days.
"""

from __future__ import annotations

import grpc
from otpgate.delivery.v1 import delivery_pb2

from services.core.clock import Clock
from services.core.errors import ServiceError, Violations
from services.core.phone import InvalidPhoneError, Phone, parse_phone
from services.delivery.hold import confirmation_due
from services.delivery.limits import Hit, Limiter, RateLimited
from services.delivery.message_crypto import MessageCrypto
from services.delivery.policy import PolicyStore
from services.delivery.routing import Router
from services.delivery.settings import EngineSettings


class Reachability:
    def __init__(
        self,
        policies: PolicyStore,
        limiter: Limiter,
        router: Router,
        crypto: MessageCrypto,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.policies = policies
        self.limiter = limiter
        self.router = router
        self.crypto = crypto
        self.clock = clock
        self.settings = settings

    async def check(self, request: delivery_pb2.CheckReachabilityRequest) -> delivery_pb2.CheckReachabilityResponse:
        problems = Violations()
        problems.check(bool(request.client_id), "client_id", "is required")
        phone: Phone | None = None
        try:
            phone = parse_phone(request.phone)
        except InvalidPhoneError as exc:
            problems.add("phone", str(exc))
        problems.raise_if_any()
        assert phone is not None
        policy = await self.policies.get(request.client_id)
        rate = self.settings.rate(policy, "reachability")
        try:
            await self.limiter.acquire(
                [Hit("reachability", self.crypto.limit_key(request.client_id), rate, subject="client")]
            )
        except RateLimited as exc:
            raise exc.to_error() from None
        bot_owner = await self.router.bot_owner(request.bot, request.client_id) if request.bot else ""
        try:
            resolution = await self.router.resolve(phone.e164, request.bot)
        except grpc.aio.AioRpcError as error:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "DIRECTORY_UNAVAILABLE", "cannot check now; retry"
            ) from error
        candidates = await self.router.candidates(resolution, request.bot, bot_owner, request.client_id)
        days = policy.default_confirm_days
        return delivery_pb2.CheckReachabilityResponse(
            reachable=bool(candidates),
            bot_id=candidates[0] if candidates else "",
            confirmation_required=bool(candidates)
            and days > 0
            and confirmation_due(resolution, days, self.clock.now()),
            confirmed=resolution.found and resolution.HasField("confirm_time"),
        )

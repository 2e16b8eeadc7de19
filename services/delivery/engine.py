"""The delivery domain, assembled: the one object app.py builds and the servicers call.

Each job lives in its own module; Engine only wires them and names the entry points:

    admission.py      SendMessage: validation, policy, idempotency, limits, storing, inline dispatch
    sms_admission.py  the checks every SMS leg passes (countries, CAPTCHA, fraud guard, IP, daily cap)
    routing.py        which bots can carry a message (directory + bot catalog)
    dispatch.py       one attempt under a message's claim; claiming due messages
    legs.py           the bot leg and the SMS leg, and what a try decides
    hold.py           the re-confirmation hold and starting the confirmation
    release.py        ReleaseHeldMessages, FailHeldMessages
    notify.py         what follows a status change: metric, usage record, webhook, log
    reports.py        SMS delivery reports (polled or pushed)
    gateway_leg.py    the Telegram Gateway leg; gateway_reports.py its signed delivery reports
    ladder.py         the channels AUTO climbs, in order
    messages.py       GetMessage, CancelMessage, RecordConversion
    reachability.py   CheckReachability
    maintenance.py    the dispatcher pass (dispatch, expiry, reports, webhooks) and the purge
    record.py         the message record and its document; store.py its collections
"""

from __future__ import annotations

from otpgate.botgateway.v1 import botgateway_pb2_grpc
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from otpgate.directory.v1 import directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2_grpc

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.delivery.admission import Admission
from services.delivery.bots import BotCatalog
from services.delivery.claims import Claim, Claims
from services.delivery.dispatch import Dispatcher
from services.delivery.fraud import FraudGuard
from services.delivery.gateway_leg import GatewayLeg
from services.delivery.gateway_reports import GatewayReports
from services.delivery.hold import ConfirmationHold
from services.delivery.legs import Legs
from services.delivery.limits import Limiter
from services.delivery.maintenance import Maintenance
from services.delivery.message_crypto import MessageCrypto
from services.delivery.messages import ClientMessages
from services.delivery.notify import StatusNotifier
from services.delivery.policy import PolicyStore
from services.delivery.reachability import Reachability
from services.delivery.record import MessageRecord
from services.delivery.release import HeldRelease
from services.delivery.reports import SmsReports
from services.delivery.routing import Router
from services.delivery.settings import EngineSettings
from services.delivery.sms import SandboxSmsProvider, SmsProvider
from services.delivery.sms_admission import SmsAdmission
from services.delivery.store import Store
from services.delivery.tg_gateway import GatewaySettings, TelegramGatewayClient
from services.delivery.webhooks import WebhookOutbox

__all__ = ["Engine", "EngineSettings"]


class Engine:
    def __init__(
        self,
        store: Store,
        policies: PolicyStore,
        limiter: Limiter,
        fraud: FraudGuard,
        claims: Claims,
        bots: BotCatalog,
        directory: directory_pb2_grpc.DirectoryServiceAsyncStub,
        botgateway: botgateway_pb2_grpc.BotGatewayServiceAsyncStub,
        verification: verification_pb2_grpc.VerificationServiceAsyncStub,
        sms: SmsProvider,
        sandbox: SandboxSmsProvider | None,
        webhooks: WebhookOutbox,
        keyring: Keyring,
        clock: Clock,
        settings: EngineSettings,
        gateway_client: TelegramGatewayClient | None = None,
        gateway_settings: GatewaySettings | None = None,
    ) -> None:
        self.store = store
        self.policies = policies
        self.fraud = fraud
        self.webhooks = webhooks
        self.keyring = keyring
        self.clock = clock
        self.settings = settings
        crypto = MessageCrypto(keyring)
        router = Router(bots, directory)
        sms_admission = SmsAdmission(limiter, fraud, crypto, settings)
        notifier = StatusNotifier(store, webhooks, clock, settings)
        self.gateway = GatewayLeg(
            gateway_client,
            store,
            policies,
            crypto,
            keyring,
            clock,
            gateway_settings or GatewaySettings(),
            settings.sms_poll_interval,
            settings.sms_poll_for,
        )
        self.dispatcher = Dispatcher(
            store,
            claims,
            router,
            Legs(botgateway, sms, crypto, clock, settings),
            self.gateway,
            ConfirmationHold(store, verification, crypto, clock, settings),
            sms_admission,
            policies,
            fraud,
            notifier,
            crypto,
            clock,
            settings,
        )
        self.admission = Admission(
            store,
            policies,
            limiter,
            fraud,
            claims,
            router,
            sms_admission,
            self.dispatcher,
            self.gateway,
            crypto,
            clock,
            settings,
        )
        self.release = HeldRelease(store, self.dispatcher, fraud, crypto, clock, settings.text_retention)
        self.messages = ClientMessages(store, self.dispatcher, self.gateway, fraud, notifier, clock, settings)
        self.reachability = Reachability(policies, limiter, router, crypto, clock, settings)
        self.reports = SmsReports(store, sms, self.dispatcher, notifier, crypto, clock, settings)
        self.gateway_reports = GatewayReports(
            store, self.gateway, self.dispatcher, notifier, clock, settings.sms_poll_interval
        )
        self.reports.gateway_poll = self.gateway_reports.poll
        self.maintenance = Maintenance(
            store, self.dispatcher, self.reports, webhooks, limiter, fraud, claims, sandbox, clock, settings
        )

    # RPCs of DeliveryService -------------------------------------------------------------------

    async def send_message(self, request: delivery_pb2.SendMessageRequest) -> delivery_pb2.SendMessageResponse:
        return await self.admission.send_message(request)

    async def get_message(self, client_id: str, message_id: str) -> common_pb2.Message:
        return await self.messages.get(client_id, message_id)

    async def cancel_message(self, client_id: str, message_id: str) -> common_pb2.Message:
        return await self.messages.cancel(client_id, message_id)

    async def check_gateway_code(self, client_id: str, message_id: str, code: str) -> str:
        return await self.messages.check_gateway_code(client_id, message_id, code)

    async def apply_gateway_report(self, body: bytes, timestamp: str, signature: str) -> None:
        await self.gateway_reports.apply(body, timestamp, signature)

    async def release_held(self, telegram_user_id: int, phone_raw: str) -> int:
        return await self.release.release(telegram_user_id, phone_raw)

    async def fail_held(self, telegram_user_id: int, phone_raw: str) -> int:
        return await self.release.fail(telegram_user_id, phone_raw)

    async def check_reachability(
        self, request: delivery_pb2.CheckReachabilityRequest
    ) -> delivery_pb2.CheckReachabilityResponse:
        return await self.reachability.check(request)

    async def record_conversion(self, client_id: str, message_id: str) -> None:
        await self.messages.record_conversion(client_id, message_id)

    async def webhook_secret(self, client_id: str) -> str:
        """The secret that signs a client's status webhooks (its policy's, else the service default)."""
        policy = await self.policies.get(client_id)
        return policy.webhook_secret(self.keyring) or self.settings.webhook_default_secret

    # Background work (app.py's loops; tests run passes themselves) -----------------------------

    async def claim_due(self, limit: int | None = None) -> list[tuple[MessageRecord, Claim]]:
        return await self.dispatcher.claim_due(limit)

    async def dispatch_due_once(self) -> int:
        return await self.maintenance.dispatch_due_once()

    async def expire_due_once(self) -> int:
        return await self.maintenance.expire_due_once()

    async def poll_sms_once(self) -> int:
        return await self.reports.poll_once()

    async def apply_sms_report(self, provider_id: str, delivered: bool, code: str) -> bool:
        return await self.reports.apply(provider_id, delivered, code)

    async def purge_once(self) -> None:
        await self.maintenance.purge_once()

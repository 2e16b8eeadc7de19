"""Delivery service assembly: configuration, indexes, channels, providers, background loops."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, replace

import aiohttp
from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import Clock, SystemClock
from services.core.config import CommonConfig, ConfigError
from services.core.grpc_client import make_channel
from services.core.grpc_server import ServiceApp
from services.core.logging import get_logger
from services.core.mongo import Document
from services.delivery.bots import BotCatalog
from services.delivery.claims import Claims
from services.delivery.config import DeliveryConfig
from services.delivery.config import load_config as load_config  # every app.py offers load_config + build_app
from services.delivery.engine import Engine
from services.delivery.fraud import FraudGuard
from services.delivery.limits import Limiter
from services.delivery.policy import PolicyStore
from services.delivery.service import DeliveryServicer, SmsSandboxServicer
from services.delivery.smpp import SmppProvider, SmppStore
from services.delivery.sms import SandboxSmsProvider, SmscProvider, SmsProvider, WebhookSmsProvider
from services.delivery.store import Store
from services.delivery.tg_gateway import TelegramGatewayClient
from services.delivery.wakeup import Wakeup
from services.delivery.webhooks import WebhookOutbox, guarded_session

log = get_logger(__name__)


@dataclass
class DeliveryRuntime:
    """Everything build_app made, for the loops and for tests (app.runtime)."""

    engine: Engine
    config: DeliveryConfig
    wakeup: Wakeup
    http: aiohttp.ClientSession
    webhook_http: aiohttp.ClientSession

    async def dispatcher_loop(self) -> None:
        while True:
            try:
                tried = await self.engine.dispatch_due_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatcher_pass_failed")
                tried = 0
            if tried >= self.engine.settings.batch:
                await asyncio.sleep(0)
            elif tried:
                await asyncio.sleep(self.config.poll_interval)
            else:
                await self.wakeup.wait(self.config.idle_poll_interval, self.config.poll_interval)

    async def purge_loop(self) -> None:
        while True:
            try:
                await self.engine.purge_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("purge_failed")
            await asyncio.sleep(self.config.purge_interval)

    async def close(self) -> None:
        await self.http.close()
        await self.webhook_http.close()


async def build_app(
    common: CommonConfig,
    config: DeliveryConfig,
    client: AsyncMongoClient[Document],
    clock: Clock | None = None,
) -> ServiceApp:
    clock = clock or SystemClock()
    db = client[common.database]
    keyring = common.keyring
    owner = f"{socket.gethostname()}:{os.getpid()}:{id(config):x}"
    wakeup = Wakeup(clock)
    store = Store(db, clock, wakeup)
    claims = Claims(db["claims"], clock, owner, config.engine.lease)
    limiter = Limiter(db["limits"], clock)
    fraud = FraudGuard(
        db["fraud_counters"],
        db["fraud_sms"],
        db["fraud_rules"],
        db["fraud_events"],
        db["fraud_budgets"],
        keyring,
        clock,
        config.fraud,
    )
    if config.sms_any_default and common.environment == "production":
        raise ConfigError(
            "OTPGATE_DELIVERY_DEFAULT_SMS_ANY=true is refused in production: set each client's SMS countries"
        )
    sms_any = config.sms_any_default if config.sms_any_default is not None else common.sandbox
    policies = PolicyStore(
        db["policies"],
        clock,
        sms_any,
        config.policy_cache_ttl,
        sandbox=common.sandbox,
        service_sms_countries=config.engine.sms_countries,
    )
    http = aiohttp.ClientSession()
    webhook_http = guarded_session(allow_private=common.dev)
    sandbox = SandboxSmsProvider(db["sandbox_sms"], keyring, clock) if common.sandbox else None
    provider: SmsProvider
    smpp: SmppProvider | None = None
    if config.sms_provider == "smpp":
        smpp = provider = SmppProvider(config.smpp, SmppStore(db["smpp_messages"], db["smpp_receipts"], clock), clock)
    elif config.sms_provider == "smsc":
        provider = SmscProvider(http, config.smsc_url, config.smsc_login, config.smsc_password, config.sms_http)
    elif config.sms_provider == "webhook":
        provider = WebhookSmsProvider(http, config.sms_webhook_url, config.sms_webhook_secret, config.sms_http, clock)
    else:
        if sandbox is None:
            sandbox = SandboxSmsProvider(db["sandbox_sms"], keyring, clock)
        provider = sandbox
    timeout = common.rpc_timeout
    directory_channel = make_channel(
        common.addresses["directory"],
        [directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]],
        timeout=timeout,
        tls=common.tls,
    )
    botgateway_channel = make_channel(
        common.addresses["botgateway"],
        [botgateway_pb2.DESCRIPTOR.services_by_name["BotGatewayService"]],
        timeout=timeout,
        tls=common.tls,
    )
    verification_channel = make_channel(
        common.addresses["verification"],
        [verification_pb2.DESCRIPTOR.services_by_name["VerificationService"]],
        timeout=timeout,
        tls=common.tls,
    )
    botgateway = botgateway_pb2_grpc.BotGatewayServiceStub(botgateway_channel)
    settings = replace(config.engine, dev=common.dev, request_timeout=common.rpc_timeout)
    engine_ref: list[Engine] = []

    async def secret_for(client_id: str) -> str:
        return await engine_ref[0].webhook_secret(client_id)

    webhooks = WebhookOutbox(
        db["webhooks"],
        claims,
        webhook_http,
        clock,
        secret_for,
        max_attempts=config.webhook_max_attempts,
        timeout=config.webhook_timeout,
        backoff_base=config.webhook_backoff,
        dev=common.dev,
        wakeup=wakeup,
    )
    gateway_client = TelegramGatewayClient(http, config.gateway) if config.gateway.url else None
    engine = Engine(
        gateway_client=gateway_client,
        gateway_settings=config.gateway,
        store=store,
        policies=policies,
        limiter=limiter,
        fraud=fraud,
        claims=claims,
        bots=BotCatalog(botgateway, common.shared_bots, config.bot_cache_ttl),
        directory=directory_pb2_grpc.DirectoryServiceStub(directory_channel),
        botgateway=botgateway,
        verification=verification_pb2_grpc.VerificationServiceStub(verification_channel),
        sms=provider,
        sandbox=sandbox,
        webhooks=webhooks,
        keyring=keyring,
        clock=clock,
        settings=settings,
    )
    engine_ref.append(engine)
    if smpp is not None:
        smpp.report_to(engine.apply_sms_report)
        smpp.start()
    for part in (store, claims, limiter, fraud, webhooks):
        await part.create_indexes()
    if sandbox is not None:
        await sandbox.create_indexes()
    runtime = DeliveryRuntime(engine, config, wakeup, http, webhook_http)
    servicers: list[tuple[object, object, str]] = [
        (
            delivery_pb2_grpc.add_DeliveryServiceServicer_to_server,
            DeliveryServicer(engine),
            delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
        )
    ]
    if common.sandbox and sandbox is not None:
        servicers.append(
            (
                delivery_pb2_grpc.add_SmsSandboxServiceServicer_to_server,
                SmsSandboxServicer(sandbox),
                delivery_pb2.DESCRIPTOR.services_by_name["SmsSandboxService"].full_name,
            )
        )

    async def close_all() -> None:
        if smpp is not None:
            await smpp.close()
        await runtime.close()
        for channel in (directory_channel, botgateway_channel, verification_channel):
            await channel.close()

    app = ServiceApp(
        name="delivery",
        servicers=servicers,  # type: ignore[arg-type]
        database=db,
        background=[runtime.dispatcher_loop, runtime.purge_loop] if config.dispatcher else [],
        on_stop=[close_all],
    )
    app.runtime = runtime  # type: ignore[attr-defined]
    return app

"""Configuration and assembly of the edge (see services/core/bootstrap.py for the contract)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.edge.v1 import edge_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import Clock, SystemClock
from services.core.config import SIMULATOR, CommonConfig, ConfigError, Env
from services.core.grpc_client import make_channel
from services.core.grpc_server import ServiceApp
from services.core.logging import get_logger
from services.core.mongo import Document, ping
from services.core.outage import OutageLog
from services.edge.admin import AdminApi, ClientAdmin
from services.edge.api import PolicyCache, PublicApi
from services.edge.captcha import PROVIDER_URLS, SANDBOX_PROVIDER, CaptchaSettings, CaptchaVerifier
from services.edge.captcha_sandbox import CaptchaSandboxServicer, SandboxCaptcha
from services.edge.http import HttpGateway, HttpSettings
from services.edge.keys import Authenticator
from services.edge.limits import EdgeLimits
from services.edge.openapi import load_document
from services.edge.origin import Network, OriginResolver, parse_networks
from services.edge.service import AdminServicer, PublicServicer
from services.edge.store import EdgeStore

log = get_logger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    http_host: str
    http_port: int
    tls_cert: str
    tls_key: str
    trusted_proxies: tuple[Network, ...]
    max_body_bytes: int
    key_rate: float
    key_burst: int
    ip_rate: float
    ip_burst: int
    auth_cache_seconds: float
    policy_cache_seconds: float
    captcha: CaptchaSettings


def load_config(env: Env) -> EdgeConfig:
    proxies_raw = env.items(
        "OTPGATE_EDGE_TRUSTED_PROXIES",
        [],
        "proxies (CIDRs or addresses) whose X-Forwarded-For is believed; the client IP is the first untrusted hop",
    )
    try:
        proxies = tuple(parse_networks(proxies_raw))
    except ValueError as exc:
        env.errors.append(f"OTPGATE_EDGE_TRUSTED_PROXIES is invalid: {exc}")
        proxies = ()
    provider = env.text(
        "OTPGATE_CAPTCHA_PROVIDER",
        "",
        "CAPTCHA provider whose siteverify checks tokens: turnstile, hcaptcha, recaptcha, or sandbox (sandbox"
        " mode only); empty: sandbox in sandbox mode, else turnstile",
        choices=("", *PROVIDER_URLS, SANDBOX_PROVIDER),
    )
    tls_cert = env.text("OTPGATE_EDGE_TLS_CERT", "", "PEM certificate of the public gRPC and HTTP listeners")
    tls_key = env.text("OTPGATE_EDGE_TLS_KEY", "", "PEM private key for OTPGATE_EDGE_TLS_CERT", secret=True)
    if bool(tls_cert) != bool(tls_key):
        env.errors.append("OTPGATE_EDGE_TLS_CERT and OTPGATE_EDGE_TLS_KEY go together")
    return EdgeConfig(
        http_host=env.text("OTPGATE_EDGE_HTTP_HOST", "127.0.0.1", "interface the HTTP/JSON API binds"),
        http_port=env.integer("OTPGATE_EDGE_HTTP_PORT", 8080, "HTTP/JSON API port", min=0, max=65535),
        tls_cert=tls_cert,
        tls_key=tls_key,
        trusted_proxies=proxies,
        max_body_bytes=env.integer(
            "OTPGATE_EDGE_MAX_BODY_BYTES", 64 * 1024, "largest HTTP request body accepted (413 above)", min=1024
        ),
        key_rate=env.number("OTPGATE_EDGE_KEY_RATE", 50.0, "requests per second per API key (0: off)", min=0),
        key_burst=env.integer("OTPGATE_EDGE_KEY_BURST", 100, "burst of requests per API key", min=1),
        ip_rate=env.number("OTPGATE_EDGE_IP_RATE", 50.0, "requests per second per client IP (0: off)", min=0),
        ip_burst=env.integer("OTPGATE_EDGE_IP_BURST", 100, "burst of requests per client IP", min=1),
        auth_cache_seconds=env.number(
            "OTPGATE_EDGE_AUTH_CACHE_SECONDS", 5.0, "how long an API key lookup is cached (revocation delay)", min=0
        ),
        policy_cache_seconds=env.number(
            "OTPGATE_EDGE_POLICY_CACHE_SECONDS", 10.0, "how long a client's policy (CAPTCHA rule) is cached", min=0
        ),
        captcha=CaptchaSettings(
            provider=provider,
            secret=env.text("OTPGATE_CAPTCHA_SECRET", "", "the CAPTCHA provider's secret key", secret=True),
            verify_url=env.text(
                "OTPGATE_CAPTCHA_VERIFY_URL", "", "siteverify URL (default: the provider's public endpoint)"
            )
            or PROVIDER_URLS.get(provider, ""),
            timeout=env.number("OTPGATE_CAPTCHA_TIMEOUT", 5.0, "siteverify deadline, seconds", min=0.1),
            min_score=env.number("OTPGATE_CAPTCHA_MIN_SCORE", 0.5, "lowest accepted score (reCAPTCHA v3)", min=0),
            hostnames=tuple(
                env.items("OTPGATE_CAPTCHA_HOSTNAMES", [], "hostnames a solved CAPTCHA may come from (empty: any)")
            ),
        ),
    )


@dataclass
class EdgeApp(ServiceApp):
    """The edge's ServiceApp, with handles tests and the runner use."""

    api: PublicApi | None = None
    admin: ClientAdmin | None = None
    gateway: HttpGateway | None = None
    http_port: int = 0


async def _purge_loop(store: EdgeStore, clock: Clock, every: float = 60.0) -> None:
    while True:
        removed = await store.purge_captcha_tokens(clock.now())
        if removed:
            log.debug("captcha_tokens_purged", count=removed)
        await asyncio.sleep(every)


async def build_app(
    common: CommonConfig,
    config: EdgeConfig,
    client: AsyncMongoClient[Document],
    clock: Clock | None = None,
) -> EdgeApp:
    clock = clock or SystemClock()
    database = client[common.database]
    store = EdgeStore(database)
    await store.create_indexes()
    timeout = common.rpc_timeout
    channels = {
        "delivery": make_channel(
            common.addresses["delivery"],
            [
                delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"],
                delivery_pb2.DESCRIPTOR.services_by_name["SmsSandboxService"],
            ],
            timeout=timeout,
            tls=common.tls,
        ),
        "verification": make_channel(
            common.addresses["verification"],
            [verification_pb2.DESCRIPTOR.services_by_name["VerificationService"]],
            timeout=timeout,
            tls=common.tls,
        ),
        "botgateway": make_channel(
            common.addresses["botgateway"],
            [botgateway_pb2.DESCRIPTOR.services_by_name["BotGatewayService"]],
            timeout=timeout,
            tls=common.tls,
        ),
    }
    sandbox_stubs: dict[str, object] = {
        "otpgate.delivery.v1.SmsSandboxService": delivery_pb2_grpc.SmsSandboxServiceStub(channels["delivery"]),
    }
    if common.sandbox:
        # The simulated Telegram serves the people's side of the sandbox (its own process).
        channels[SIMULATOR] = make_channel(
            common.addresses[SIMULATOR],
            [telegramsim_pb2.DESCRIPTOR.services_by_name["SandboxService"]],
            timeout=timeout,
            tls=common.tls,
        )
        sandbox_stubs["otpgate.telegramsim.v1.SandboxService"] = telegramsim_pb2_grpc.SandboxServiceStub(
            channels[SIMULATOR]
        )
    delivery = delivery_pb2_grpc.DeliveryServiceStub(channels["delivery"])
    auth = Authenticator(store, common.keyring, clock, cache_seconds=config.auth_cache_seconds)
    admin = ClientAdmin(store, common.keyring, clock)
    captcha_settings = config.captcha
    if not captcha_settings.provider:
        provider = SANDBOX_PROVIDER if common.sandbox else "turnstile"
        captcha_settings = replace(
            captcha_settings,
            provider=provider,
            verify_url=captcha_settings.verify_url or PROVIDER_URLS.get(provider, ""),
        )
    if captcha_settings.provider == SANDBOX_PROVIDER and not common.sandbox:
        raise ConfigError("OTPGATE_CAPTCHA_PROVIDER=sandbox needs sandbox mode (OTPGATE_SANDBOX=true)")
    sandbox_captcha = SandboxCaptcha(common.keyring, clock) if captcha_settings.provider == SANDBOX_PROVIDER else None
    captcha = CaptchaVerifier(captcha_settings, store, common.keyring, clock, sandbox_captcha)
    api = PublicApi(
        auth=auth,
        limits=EdgeLimits(
            clock,
            key_rate=config.key_rate,
            key_burst=config.key_burst,
            ip_rate=config.ip_rate,
            ip_burst=config.ip_burst,
        ),
        captcha=captcha,
        policies=PolicyCache(delivery, clock, config.policy_cache_seconds),
        delivery=delivery,
        verification=verification_pb2_grpc.VerificationServiceStub(channels["verification"]),
        botgateway=botgateway_pb2_grpc.BotGatewayServiceStub(channels["botgateway"]),
        clients=admin,
    )
    admin_api = AdminApi(api, admin)
    captcha_sandbox = CaptchaSandboxServicer(sandbox_captcha)
    sandbox_stubs["otpgate.edge.v1.CaptchaSandboxService"] = captcha_sandbox
    origins = OriginResolver(config.trusted_proxies)
    outages = OutageLog()
    gateway = HttpGateway(
        api,
        admin_api,
        origins,
        HttpSettings(
            host=config.http_host,
            port=config.http_port,
            max_body_bytes=config.max_body_bytes,
            timeout=timeout,
            sandbox=common.sandbox,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
        ),
        load_document(),
        sandbox_stubs,
        channels,
        lambda: ping(database, timeout=1.0),
        outages,
    )
    http_port = await gateway.start()

    async def close_channels() -> None:
        for channel in channels.values():
            await channel.close()

    async def purge() -> None:
        await _purge_loop(store, clock)

    on_stop: list[Callable[[], Awaitable[None]]] = [gateway.stop, auth.drain, captcha.close, close_channels]
    sandbox_servicers: list[tuple[Any, Any, str]] = []
    if common.sandbox:
        sandbox_servicers.append(
            (
                edge_pb2_grpc.add_CaptchaSandboxServiceServicer_to_server,
                captcha_sandbox,
                "otpgate.edge.v1.CaptchaSandboxService",
            )
        )
    return EdgeApp(
        name="edge",
        servicers=[
            (
                edge_pb2_grpc.add_PublicServiceServicer_to_server,
                PublicServicer(api, origins, timeout),
                "otpgate.edge.v1.PublicService",
            ),
            (
                edge_pb2_grpc.add_AdminServiceServicer_to_server,
                AdminServicer(api, admin_api, origins, timeout),
                "otpgate.edge.v1.AdminService",
            ),
            *sandbox_servicers,
        ],
        database=database,
        outages=outages,
        background=[purge],
        on_stop=on_stop,
        api=api,
        admin=admin,
        gateway=gateway,
        http_port=http_port,
    )

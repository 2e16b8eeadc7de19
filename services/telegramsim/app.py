"""Configuration and assembly of the simulated Telegram, the sixth process of dev and sandbox mode.

It refuses to start anywhere else: production talks to Telegram itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import Clock, SystemClock
from services.core.config import SIMULATOR_GATEWAY_PORT as GATEWAY_PORT
from services.core.config import CommonConfig, ConfigError, Env, read_mode
from services.core.grpc_server import ServiceApp
from services.core.mongo import Document
from services.core.sandbox import sandbox_gateway_token
from services.telegramsim.gateway import GatewaySettings, SimulatedGateway
from services.telegramsim.gateway_http import GatewayHttp, ReportPoster
from services.telegramsim.gateway_store import GatewayStore
from services.telegramsim.model import SandboxLimits
from services.telegramsim.mtproto import MtprotoEndpoint
from services.telegramsim.service import MtprotoServicer, SandboxServicer
from services.telegramsim.store import TelegramStore
from services.telegramsim.telegram import SimulatedTelegram

SERVICES = telegramsim_pb2.DESCRIPTOR.services_by_name
REFUSED = "the simulated Telegram runs in dev and sandbox mode only (OTPGATE_ENV=dev, OTPGATE_SANDBOX=true)"


@dataclass(frozen=True)
class TelegramSimConfig:
    limits: SandboxLimits
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = GATEWAY_PORT


def load_config(env: Env) -> TelegramSimConfig:
    environment, sandbox = read_mode(env)
    if environment != "dev" or not sandbox:
        env.errors.append(REFUSED)
    gateway = GatewaySettings(
        price=env.number(
            "OTPGATE_SANDBOX_GATEWAY_PRICE", 0.01, "local Telegram Gateway: credits charged per request", min=0
        ),
        initial_balance=env.number(
            "OTPGATE_SANDBOX_GATEWAY_BALANCE",
            10.0,
            "local Telegram Gateway: credits of the service-wide sandbox account when it is opened",
            min=0,
        ),
        loop_interval=env.number(
            "OTPGATE_SANDBOX_GATEWAY_LOOP_INTERVAL",
            0.5,
            "local Telegram Gateway: seconds between its passes over expired codes and due reports (0: none)",
            min=0,
        ),
    )
    return TelegramSimConfig(
        gateway=gateway,
        gateway_host=env.text(
            "OTPGATE_TELEGRAMSIM_GATEWAY_HOST", "127.0.0.1", "interface the local Telegram Gateway's HTTP API binds"
        ),
        gateway_port=env.integer(
            "OTPGATE_TELEGRAMSIM_GATEWAY_PORT",
            GATEWAY_PORT,
            "local Telegram Gateway HTTP port (sandbox mode; delivery's OTPGATE_TELEGRAM_GATEWAY_URL points here)",
            min=0,
            max=65535,
        ),
        limits=SandboxLimits(
            bot_rate=env.number("OTPGATE_SANDBOX_BOT_RATE", 30.0, "sandbox Telegram: messages/s per bot", min=0.01),
            bot_burst=env.integer("OTPGATE_SANDBOX_BOT_BURST", 30, "sandbox Telegram: burst per bot", min=1),
            chat_rate=env.number("OTPGATE_SANDBOX_CHAT_RATE", 1.0, "sandbox Telegram: messages/s per chat", min=0.01),
            chat_burst=env.integer("OTPGATE_SANDBOX_CHAT_BURST", 5, "sandbox Telegram: burst per chat", min=1),
            login_burst=env.integer(
                "OTPGATE_SANDBOX_LOGIN_BURST", 5, "sandbox Telegram: bot logins at once before FLOOD_WAIT", min=1
            ),
            login_interval=env.number(
                "OTPGATE_SANDBOX_LOGIN_INTERVAL", 30.0, "sandbox Telegram: seconds per further bot login", min=0.01
            ),
            difference_slice=env.integer(
                "OTPGATE_SANDBOX_DIFFERENCE_SLICE", 100, "sandbox Telegram: pts per getDifference slice", min=1
            ),
            difference_limit=env.integer(
                "OTPGATE_SANDBOX_DIFFERENCE_LIMIT",
                100_000,
                "sandbox Telegram: how far behind (pts) a bot may be before getDifference answers 'too long'",
                min=1,
            ),
            reply_wait=env.number(
                "OTPGATE_SANDBOX_REPLY_WAIT",
                10.0,
                "seconds a sandbox user's action waits for the bot to handle it (its replies are the answer)",
                min=0,
            ),
        ),
    )


@dataclass
class TelegramSimApp(ServiceApp):
    """The service app, with the simulated Telegram reachable for tests and benches."""

    telegram: SimulatedTelegram | None = None
    gateway: SimulatedGateway | None = None
    gateway_port: int = 0


async def build_app(
    common: CommonConfig,
    config: TelegramSimConfig,
    client: AsyncMongoClient[Document],
    clock: Clock | None = None,
) -> TelegramSimApp:
    if not common.sandbox or not common.dev:
        raise ConfigError(REFUSED)
    store = TelegramStore(client[common.database], common.keyring)
    await store.create_indexes()
    telegram = SimulatedTelegram(store, config.limits, clock or SystemClock())
    await telegram.load(common.shared_bots)
    poster = ReportPoster()
    gateway = SimulatedGateway(
        GatewayStore(store.db, common.keyring), telegram, clock or SystemClock(), config.gateway, poster
    )
    await gateway.load((sandbox_gateway_token(),))
    http = GatewayHttp(gateway, config.gateway_host, config.gateway_port)
    gateway_port = await http.start()
    return TelegramSimApp(
        name="telegramsim",
        servicers=[
            (
                telegramsim_pb2_grpc.add_MtprotoServiceServicer_to_server,
                MtprotoServicer(MtprotoEndpoint(telegram)),
                SERVICES["MtprotoService"].full_name,
            ),
            (
                telegramsim_pb2_grpc.add_SandboxServiceServicer_to_server,
                SandboxServicer(telegram, gateway),
                SERVICES["SandboxService"].full_name,
            ),
        ],
        database=store.db,
        background=[gateway.run],
        on_stop=[http.stop, poster.close],
        telegram=telegram,
        gateway=gateway,
        gateway_port=gateway_port,
    )

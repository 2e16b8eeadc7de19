"""Configuration and assembly of the bot gateway."""

from __future__ import annotations

from dataclasses import dataclass, field

from otpgate.botgateway.v1 import botgateway_pb2, botgateway_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc
from pymongo import AsyncMongoClient

from services.botgateway.conversation import Conversation
from services.botgateway.gateway import Gateway
from services.botgateway.limiter import SendLimiter
from services.botgateway.registry import BotRegistry, parse_bot_tokens
from services.botgateway.sandbox_link import GrpcLink, sandbox_client_factory
from services.botgateway.service import BotGatewayServicer
from services.botgateway.sessions import BotSessions, instance_id
from services.botgateway.store import GatewayStore
from services.botgateway.telethon_transport import TelethonTransport
from services.botgateway.transport import Transport
from services.core.clock import Clock, SystemClock
from services.core.config import DEFAULT_SHARED_BOTS, SIMULATOR, CommonConfig, ConfigError, Env, read_mode
from services.core.gcra import Rate
from services.core.grpc_client import make_channel
from services.core.grpc_server import ServiceApp
from services.core.mongo import Document

# Sandbox mode needs no Telegram application: the simulated Telegram takes any, but not none.
SANDBOX_API_ID = 1
SANDBOX_API_HASH = "0" * 32


@dataclass(frozen=True)
class BotGatewayConfig:
    api_id: int
    api_hash: str
    bot_tokens: dict[str, str]
    bot_rate: float
    bot_burst: int
    chat_rate: float
    chat_burst: int
    lease_ttl: float
    lease_renew: float
    deletion_interval: float
    max_bots: int
    state_write_spacing: float


def load_config(env: Env) -> BotGatewayConfig:
    tokens_spec = env.text(
        "OTPGATE_BOT_TOKENS",
        "",
        "tokens of the shared bots, 'bot_id:<numeric id>:<secret>' comma-separated (not used in sandbox mode)",
        secret=True,
    )
    try:
        tokens = parse_bot_tokens([item.strip() for item in tokens_spec.split(",") if item.strip()])
    except ValueError as exc:
        env.errors.append(f"OTPGATE_BOT_TOKENS is invalid: {exc}")
        tokens = {}
    api_id = env.integer("OTPGATE_TELEGRAM_API_ID", 0, "Telegram api_id for MTProto (my.telegram.org)", min=0)
    api_hash = env.text("OTPGATE_TELEGRAM_API_HASH", "", "Telegram api_hash matching the api_id", secret=True)
    # Outside sandbox mode the real Telegram needs credentials.
    _, sandbox = read_mode(env)
    if not sandbox:
        env.errors.extend(
            production_problems(
                api_id,
                api_hash,
                tokens,
                env.items("OTPGATE_SHARED_BOTS", DEFAULT_SHARED_BOTS, "ids of the shared bot pool"),
            )
        )
    return BotGatewayConfig(
        api_id=api_id,
        api_hash=api_hash,
        bot_tokens=tokens,
        bot_rate=env.number("OTPGATE_BOTGATEWAY_BOT_RATE", 30.0, "messages per second per bot", min=0.01),
        bot_burst=env.integer("OTPGATE_BOTGATEWAY_BOT_BURST", 10, "messages a bot may send at once", min=1),
        chat_rate=env.number("OTPGATE_BOTGATEWAY_CHAT_RATE", 1.0, "messages per second per chat", min=0.01),
        chat_burst=env.integer("OTPGATE_BOTGATEWAY_CHAT_BURST", 3, "messages a chat may receive at once", min=1),
        lease_ttl=env.number("OTPGATE_BOTGATEWAY_LEASE_TTL", 30.0, "seconds a bot session lease lasts", min=3.0),
        lease_renew=env.number("OTPGATE_BOTGATEWAY_LEASE_RENEW", 10.0, "seconds between lease renewals", min=0.5),
        deletion_interval=env.number(
            "OTPGATE_BOTGATEWAY_DELETE_INTERVAL", 1.0, "seconds between scheduled-deletion sweeps", min=0.1
        ),
        max_bots=env.integer(
            "OTPGATE_BOTGATEWAY_MAX_BOTS", 0, "most bot sessions one replica runs (0: no cap), to spread bots", min=0
        ),
        state_write_spacing=env.number(
            "OTPGATE_BOTGATEWAY_STATE_WRITE_SPACING",
            1.0,
            "least seconds between two writes of a bot's update state (what a crash replays, at most)",
            min=0,
        ),
    )


def production_problems(api_id: int, api_hash: str, tokens: dict[str, str], shared_bots: list[str]) -> list[str]:
    problems = [
        f"{name} is required outside sandbox mode"
        for name, value in (("OTPGATE_TELEGRAM_API_ID", api_id), ("OTPGATE_TELEGRAM_API_HASH", api_hash))
        if not value
    ]
    problems += [
        f"OTPGATE_BOT_TOKENS has no token for shared bot {bot}" for bot in shared_bots if bot.lower() not in tokens
    ]
    return problems


@dataclass
class BotGatewayApp(ServiceApp):
    """The service app, with its parts reachable for the dev runner and tests."""

    gateway: Gateway | None = None
    registry: BotRegistry | None = None
    sessions: BotSessions | None = None
    extra: dict[str, object] = field(default_factory=dict)


async def build_app(
    common: CommonConfig,
    config: BotGatewayConfig,
    client: AsyncMongoClient[Document],
    clock: Clock | None = None,
    *,
    transport: Transport | None = None,
) -> BotGatewayApp:
    """`transport` lets tests put Telethon in front of a Telegram of their own."""
    clock = clock or SystemClock()
    if not common.sandbox and transport is None:
        missing = production_problems(config.api_id, config.api_hash, config.bot_tokens, common.shared_bots)
        if missing:
            raise ConfigError("configuration is invalid:\n  - " + "\n  - ".join(missing))
    store = GatewayStore(client[common.database], common.keyring)
    await store.create_indexes()
    holder = instance_id()
    link: GrpcLink | None = None
    if transport is None:
        if common.sandbox:
            # The same Telethon transport, with the simulated Telegram (its own process) as Telegram.
            link = GrpcLink(common.addresses[SIMULATOR], timeout=max(common.rpc_timeout, 10.0))
            transport = TelethonTransport(
                config.api_id or SANDBOX_API_ID, config.api_hash or SANDBOX_API_HASH, sandbox_client_factory(link)
            )
        else:
            transport = TelethonTransport(config.api_id, config.api_hash)
    limiter = SendLimiter(Rate(config.bot_rate, config.bot_burst), Rate(config.chat_rate, config.chat_burst))
    sessions = BotSessions(
        store,
        transport,
        clock,
        holder=holder,
        lease_ttl=config.lease_ttl,
        renew_interval=config.lease_renew,
        max_bots=config.max_bots,
        state_write_spacing=config.state_write_spacing,
    )
    directory_channel = make_channel(
        common.addresses["directory"],
        [directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]],
        timeout=common.rpc_timeout,
        tls=common.tls,
    )
    verification_channel = make_channel(
        common.addresses["verification"],
        [verification_pb2.DESCRIPTOR.services_by_name["VerificationService"]],
        timeout=common.rpc_timeout,
        tls=common.tls,
    )
    directory = directory_pb2_grpc.DirectoryServiceStub(directory_channel)
    conversation = Conversation(
        store, directory, verification_pb2_grpc.VerificationServiceStub(verification_channel), clock, common.rpc_timeout
    )
    gateway = Gateway(
        store, transport, limiter, sessions, conversation, directory, clock, rpc_timeout=common.rpc_timeout
    )
    registry = BotRegistry(store, transport, sessions, clock)
    await registry.ensure_config_bots(common.shared_bots, config.bot_tokens, common.sandbox)
    await sessions.tick()

    servicers: list[tuple[object, object, str]] = [
        (
            botgateway_pb2_grpc.add_BotGatewayServiceServicer_to_server,
            BotGatewayServicer(gateway, registry),
            botgateway_pb2.DESCRIPTOR.services_by_name["BotGatewayService"].full_name,
        )
    ]

    async def run_sessions() -> None:
        await sessions.run()

    async def run_deletions() -> None:
        await gateway.run_deletions(config.deletion_interval)

    async def purge_handled() -> None:
        await gateway.run_purge()

    async def stop() -> None:
        await gateway.close()
        await sessions.close()
        await directory_channel.close()
        await verification_channel.close()
        if link is not None:
            await link.channel.close()

    return BotGatewayApp(
        name="botgateway",
        servicers=servicers,  # type: ignore[arg-type]
        database=store.db,
        background=[run_sessions, run_deletions, purge_handled],
        on_stop=[stop],
        gateway=gateway,
        registry=registry,
        sessions=sessions,
    )

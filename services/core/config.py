"""Configuration from environment variables, checked at start-up.

Every variable is declared with a help text (so the configuration reference can be
generated) and read through Env, which collects every problem and fails once with a
message that names them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from services.core.crypto import CryptoError, Keyring

T = TypeVar("T")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: str | None  # None: required
    secret: bool = False
    services: tuple[str, ...] = ()


# Every setting ever read, by name: the source of the generated configuration reference.
SETTINGS: dict[str, Setting] = {}


class Env:
    def __init__(self, environ: Mapping[str, str] | None = None, service: str = "") -> None:
        self._environ = os.environ if environ is None else environ
        self._service = service
        self.errors: list[str] = []

    def _declare(self, name: str, help: str, default: object, secret: bool) -> None:
        previous = SETTINGS.get(name)
        services = tuple(
            sorted({*(previous.services if previous else ()), *((self._service,) if self._service else ())})
        )
        shown = None if default is None else ("" if secret else _show(default))
        SETTINGS[name] = Setting(name, help, shown, secret, services)

    def _read(self, name: str, help: str, default: T | None, parse: Callable[[str], T], secret: bool) -> T:
        self._declare(name, help, default, secret)
        raw = self._environ.get(name)
        if raw is None or raw == "":
            if default is None:
                self.errors.append(f"{name} is required: {help}")
                return parse("") if parse is str else default  # type: ignore[return-value]
            return default
        try:
            return parse(raw)
        except (ValueError, CryptoError) as exc:
            shown = "" if secret else f" {raw!r}"
            self.errors.append(f"{name}{shown} is invalid: {exc}")
            return default  # type: ignore[return-value]

    def text(
        self, name: str, default: str | None, help: str, *, secret: bool = False, choices: tuple[str, ...] = ()
    ) -> str:
        def parse(raw: str) -> str:
            if choices and raw not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}")
            return raw

        return self._read(name, help, default, parse, secret)

    def integer(
        self, name: str, default: int | None, help: str, *, min: int | None = None, max: int | None = None
    ) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if min is not None and value < min:
                raise ValueError(f"must be >= {min}")
            if max is not None and value > max:
                raise ValueError(f"must be <= {max}")
            return value

        return self._read(name, help, default, parse, False)

    def number(self, name: str, default: float | None, help: str, *, min: float | None = None) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if min is not None and value < min:
                raise ValueError(f"must be >= {min}")
            return value

        return self._read(name, help, default, parse, False)

    def flag(self, name: str, default: bool, help: str) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true or false")

        return self._read(name, help, default, parse, False)

    def items(self, name: str, default: list[str] | None, help: str) -> list[str]:
        def parse(raw: str) -> list[str]:
            return [item.strip() for item in raw.split(",") if item.strip()]

        return self._read(name, help, default, parse, False)

    def raw(self, name: str) -> str:
        """A variable's value as set, without declaring it (for defaults that follow other settings)."""
        return self._environ.get(name, "")

    def check(self) -> None:
        if self.errors:
            raise ConfigError("configuration is invalid:\n  - " + "\n  - ".join(self.errors))


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class TlsConfig:
    """Certificates for internal gRPC. With ca_file set, the peer must present a cert signed by it (mTLS)."""

    cert_file: str
    key_file: str
    ca_file: str

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


DEFAULT_PORTS = {"edge": 50051, "delivery": 50052, "verification": 50053, "directory": 50054, "botgateway": 50055}
DEFAULT_METRICS_PORTS = {"edge": 9101, "delivery": 9102, "verification": 9103, "directory": 9104, "botgateway": 9105}
# The simulated Telegram (services/telegramsim): a sixth process in dev and sandbox mode only.
SIMULATOR = "telegramsim"
SIMULATOR_PORT = 50056
SIMULATOR_METRICS_PORT = 9106
# Its local Telegram Gateway (HTTP, as gatewayapi.telegram.org): delivery's default in sandbox mode.
SIMULATOR_GATEWAY_PORT = 50057


def local_address(service: str, environ: Mapping[str, str]) -> str:
    """Where a service listens on this host: its OTPGATE_<SERVICE>_PORT, or its default port. What an
    address (OTPGATE_<SERVICE>_ADDR) defaults to, so a stack started on other ports is found."""
    default = SIMULATOR_PORT if service == SIMULATOR else DEFAULT_PORTS[service]
    return f"127.0.0.1:{environ.get(f'OTPGATE_{service.upper()}_PORT') or default}"


# Where the edge receives the Telegram Gateway's delivery reports (the callback_url's path).
TELEGRAM_GATEWAY_REPORT_PATH = "/v1/telegramGateway/reports"
DEFAULT_SHARED_BOTS = ["smsccode_bot", "smsc_code_bot", "smscodes_bot"]


@dataclass(frozen=True)
class CommonConfig:
    service: str
    environment: str  # dev | production
    sandbox: bool
    host: str
    port: int
    metrics_host: str
    metrics_port: int
    log_level: str
    mongodb_uri: str
    database: str
    keyring: Keyring
    tls: TlsConfig
    addresses: dict[str, str]
    shared_bots: list[str]
    rpc_timeout: float

    @property
    def dev(self) -> bool:
        return self.environment == "dev"


def service_addresses(env: Env, sandbox: bool) -> dict[str, str]:
    """OTPGATE_<SERVICE>_ADDR of every service (and in sandbox mode of the simulated Telegram)."""
    environ = {name: env.raw(name) for name in (f"OTPGATE_{s.upper()}_PORT" for s in (*DEFAULT_PORTS, SIMULATOR))}
    addresses = {
        name: env.text(
            f"OTPGATE_{name.upper()}_ADDR", local_address(name, environ), f"gRPC address of the {name} service"
        )
        for name in DEFAULT_PORTS
    }
    if sandbox:
        addresses[SIMULATOR] = env.text(
            "OTPGATE_TELEGRAMSIM_ADDR",
            local_address(SIMULATOR, environ),
            "gRPC address of the simulated Telegram (sandbox mode only; default: this host, on OTPGATE_TELEGRAMSIM_PORT)",
        )
    return addresses


def read_mode(env: Env) -> tuple[str, bool]:
    """OTPGATE_ENV and OTPGATE_SANDBOX, for a service's own config too (one declaration of each)."""
    environment = env.text(
        "OTPGATE_ENV", "dev", "dev or production; production refuses dev shortcuts", choices=("dev", "production")
    )
    return environment, env.flag("OTPGATE_SANDBOX", environment == "dev", "use the sandbox Telegram and SMS providers")


def load_common(service: str, env: Env) -> CommonConfig:
    upper = service.upper()
    environment, sandbox = read_mode(env)
    keys_spec = env.text(
        "OTPGATE_KEYS",
        None,
        "encryption root keys, 'id:base64(32 bytes)' comma-separated (generate with `otpgate keys generate`)",
        secret=True,
    )
    primary = env.text("OTPGATE_PRIMARY_KEY_ID", "", "key id that seals new data (default: the last key listed)")
    index_key = env.text("OTPGATE_INDEX_KEY_ID", "", "key id of the blind-index key (default: the primary)")
    keyring: Keyring | None = None
    if keys_spec:
        try:
            keyring = Keyring.parse(keys_spec, primary, index_key)
        except CryptoError as exc:
            env.errors.append(f"OTPGATE_KEYS is invalid: {exc}")
    addresses = service_addresses(env, sandbox)
    simulator = service == SIMULATOR
    default_port = SIMULATOR_PORT if simulator else DEFAULT_PORTS[service]
    default_metrics_port = SIMULATOR_METRICS_PORT if simulator else DEFAULT_METRICS_PORTS[service]
    config = CommonConfig(
        service=service,
        environment=environment,
        sandbox=sandbox,
        host=env.text(f"OTPGATE_{upper}_HOST", "127.0.0.1", f"interface the {service} gRPC server binds"),
        port=env.integer(f"OTPGATE_{upper}_PORT", default_port, f"{service} gRPC port", min=0, max=65535),
        metrics_host=env.text("OTPGATE_METRICS_HOST", "127.0.0.1", "interface the Prometheus endpoints bind"),
        metrics_port=env.integer(
            f"OTPGATE_{upper}_METRICS_PORT",
            default_metrics_port,
            f"{service} Prometheus port (0: off)",
            min=0,
            max=65535,
        ),
        log_level=env.text(
            "OTPGATE_LOG_LEVEL", "info", "debug, info, warning or error", choices=("debug", "info", "warning", "error")
        ),
        mongodb_uri=env.text("MONGODB_URI", None, "MongoDB connection string"),
        database=env.text(
            f"OTPGATE_{upper}_DATABASE", f"otpgate_{service}", f"database owned by the {service} service"
        ),
        keyring=keyring,  # type: ignore[arg-type]  # checked below
        tls=TlsConfig(
            cert_file=env.text("OTPGATE_TLS_CERT", "", "PEM certificate for internal gRPC (enables TLS)"),
            key_file=env.text("OTPGATE_TLS_KEY", "", "PEM private key for OTPGATE_TLS_CERT", secret=True),
            ca_file=env.text("OTPGATE_TLS_CA", "", "PEM CA that signs peers' certificates (enables mTLS)"),
        ),
        addresses=addresses,
        shared_bots=env.items("OTPGATE_SHARED_BOTS", DEFAULT_SHARED_BOTS, "ids of the shared bot pool"),
        rpc_timeout=env.number("OTPGATE_RPC_TIMEOUT", 5.0, "default deadline of internal calls, seconds", min=0.05),
    )
    if environment == "production" and sandbox:
        env.errors.append("OTPGATE_SANDBOX cannot be on in production")
    return config

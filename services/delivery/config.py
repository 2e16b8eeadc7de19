"""Delivery's configuration: every OTPGATE_* variable it reads, with its default and meaning
(`make configref` lists them in docs/configuration.md), turned into typed settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.config import SIMULATOR_GATEWAY_PORT, Env, read_mode
from services.core.config import TELEGRAM_GATEWAY_REPORT_PATH as GATEWAY_REPORT_PATH
from services.core.logging import get_logger
from services.core.sandbox import sandbox_gateway_token
from services.delivery.engine import EngineSettings
from services.delivery.fraud import FraudSettings
from services.delivery.fraud_score import Kind, ScoreSettings
from services.delivery.limits import Rate
from services.delivery.smpp import SmppSettings
from services.delivery.smpp_link import LinkSettings
from services.delivery.sms import HttpSettings
from services.delivery.tg_gateway import GatewaySettings

log = get_logger(__name__)

_LIMIT_DEFAULTS = {
    "client": ("1000/60", "SendMessage per client"),
    "phone_short": ("5/600", "messages per phone, short window"),
    "phone_daily": ("20/86400", "messages per phone per day"),
    "ip_sms": (
        "20/3600",
        "SMS legs per end-user IP (carrier NAT puts many people behind one address; the fraud guard weighs reuse below this)",
    ),
    "session": ("10/600", "messages per end-user session id"),
    "global": ("20000/60", "messages accepted by the whole service"),
    "reachability": ("60/60", "CheckReachability per client"),
}


@dataclass(frozen=True)
class DeliveryConfig:
    engine: EngineSettings
    fraud: FraudSettings
    sms_provider: str
    smsc_url: str
    smsc_login: str
    smsc_password: str
    sms_webhook_url: str
    sms_webhook_secret: str
    sms_http: HttpSettings
    smpp: SmppSettings
    poll_interval: float
    idle_poll_interval: float
    policy_cache_ttl: float
    dispatcher: bool
    purge_interval: float
    bot_cache_ttl: float
    webhook_max_attempts: int
    webhook_timeout: float
    webhook_backoff: float
    sms_any_default: bool | None
    gateway: GatewaySettings = field(default_factory=GatewaySettings)


def _rate(env: Env, name: str, default: str, help: str) -> Rate:
    raw = env.text(f"OTPGATE_DELIVERY_LIMIT_{name.upper()}", default, f"rate limit: {help}, as <count>/<seconds>")
    try:
        return Rate.parse(raw)
    except ValueError as exc:
        env.errors.append(f"OTPGATE_DELIVERY_LIMIT_{name.upper()} {raw!r} is invalid: {exc}")
        return Rate.parse(default)


def _gateway_settings(env: Env) -> GatewaySettings:
    """Telegram's Gateway in production (a token makes it usable); the local one in sandbox mode."""
    _, sandbox = read_mode(env)
    local_port = env.raw("OTPGATE_TELEGRAMSIM_GATEWAY_PORT") or str(SIMULATOR_GATEWAY_PORT)
    edge_port = env.raw("OTPGATE_EDGE_HTTP_PORT") or "8080"
    return GatewaySettings(
        url=env.text(
            "OTPGATE_TELEGRAM_GATEWAY_URL",
            f"http://127.0.0.1:{local_port}" if sandbox else "https://gatewayapi.telegram.org",
            "Telegram Gateway API base URL (production: https://gatewayapi.telegram.org; sandbox: the local Gateway "
            "of the simulated Telegram, on OTPGATE_TELEGRAMSIM_GATEWAY_PORT)",
        ),
        token=env.text(
            "OTPGATE_TELEGRAM_GATEWAY_TOKEN",
            sandbox_gateway_token() if sandbox else "",
            "service-wide Telegram Gateway API token (empty: only clients with their own token use the Gateway; "
            "sandbox: the local Gateway's service account)",
            secret=True,
        ),
        callback_url=env.text(
            "OTPGATE_TELEGRAM_GATEWAY_CALLBACK_URL",
            f"http://127.0.0.1:{edge_port}{GATEWAY_REPORT_PATH}" if sandbox else "",
            f"public HTTPS URL of the edge's {GATEWAY_REPORT_PATH}, where the Gateway posts delivery reports "
            "(production: empty, and then the statuses are polled with checkVerificationStatus; "
            "sandbox: this host's edge)",
        ),
        timeout=env.number(
            "OTPGATE_TELEGRAM_GATEWAY_TIMEOUT", 5.0, "deadline of one Telegram Gateway call, s", min=0.1
        ),
        report_max_age=env.number(
            "OTPGATE_TELEGRAM_GATEWAY_REPORT_MAX_AGE",
            300.0,
            "a Gateway report stamped further than this from our clock is refused as stale, s",
            min=1,
        ),
    )


def load_config(env: Env) -> DeliveryConfig:
    limits = {name: _rate(env, name, default, help) for name, (default, help) in _LIMIT_DEFAULTS.items()}
    sms_countries = env.items("OTPGATE_DELIVERY_SMS_COUNTRIES", [], "regions any SMS may go to (empty: any)")
    default_sms_any = env.text(
        "OTPGATE_DELIVERY_DEFAULT_SMS_ANY",
        "",
        "whether clients whose SMS countries nobody set may get SMS to any country (default: only in sandbox"
        " mode; never in production, where clients get none until an operator sets theirs)",
        choices=("", "true", "false"),
    )
    engine = EngineSettings(
        default_ttl=env.number("OTPGATE_DELIVERY_DEFAULT_TTL", 600.0, "message ttl when a request sets none, s", min=1),
        min_ttl=env.number("OTPGATE_DELIVERY_MIN_TTL", 10.0, "smallest ttl a request may set, s", min=1),
        max_ttl=env.number("OTPGATE_DELIVERY_MAX_TTL", 7 * 86400.0, "largest ttl a request may set, s", min=1),
        lease=env.number("OTPGATE_DELIVERY_LEASE", 30.0, "dispatch lease, s (longer than any send)", min=1),
        batch=env.integer("OTPGATE_DELIVERY_BATCH", 50, "messages a dispatcher claims per pass", min=1, max=1000),
        dispatch_concurrency=env.integer(
            "OTPGATE_DELIVERY_DISPATCH_CONCURRENCY",
            16,
            "claimed messages a dispatcher pass claims and tries at once",
            min=1,
            max=256,
        ),
        backoff_base=env.number("OTPGATE_DELIVERY_BACKOFF_BASE", 2.0, "first retry delay, s", min=0.01),
        backoff_max=env.number("OTPGATE_DELIVERY_BACKOFF_MAX", 120.0, "longest retry delay, s", min=0.01),
        bot_send_timeout=env.number(
            "OTPGATE_DELIVERY_BOT_SEND_TIMEOUT",
            3.0,
            "deadline of one bot send (rate-limit waits included), s",
            min=0.05,
        ),
        inline_dispatch=env.flag("OTPGATE_DELIVERY_INLINE_DISPATCH", True, "send within SendMessage when possible"),
        text_retention=env.number(
            "OTPGATE_DELIVERY_TEXT_RETENTION", 86400.0, "keep sealed texts and phones this long after the end, s", min=0
        ),
        message_retention=env.number(
            "OTPGATE_DELIVERY_MESSAGE_RETENTION", 90 * 86400.0, "keep finished messages this long, s", min=3600
        ),
        usage_retention_days=env.integer(
            "OTPGATE_DELIVERY_USAGE_RETENTION_DAYS",
            400,
            "keep usage records (what GetUsage sums) this long, days",
            min=1,
        ),
        sms_sender=env.text("OTPGATE_SMS_SENDER", "otpgate", "SMS sender name"),
        sms_poll_interval=env.number(
            "OTPGATE_SMS_STATUS_POLL", 30.0, "how often to ask for SMS delivery reports, s", min=1
        ),
        sms_poll_for=env.number(
            "OTPGATE_SMS_STATUS_FOR", 86400.0, "how long to ask for SMS delivery reports, s", min=1
        ),
        sms_countries=tuple(c.upper() for c in sms_countries),
        sms_part_cost=env.number(
            "OTPGATE_SMS_PART_COST",
            0.05 if read_mode(env)[1] else 0.0,
            "what one SMS part costs at the provider, for usage and cost reports (sandbox: 0.05)",
            min=0,
        ),
        webhook_default_secret=env.text(
            "OTPGATE_DELIVERY_WEBHOOK_SECRET",
            "",
            "signs status webhooks of clients without their own secret",
            secret=True,
        ),
        limits=limits,
    )
    fraud = load_fraud_settings(env)
    provider = env.text(
        "OTPGATE_SMS_PROVIDER",
        "sandbox",
        "SMS provider: sandbox, smsc, webhook or smpp",
        choices=("sandbox", "smsc", "webhook", "smpp"),
    )
    config = DeliveryConfig(
        engine=engine,
        fraud=fraud,
        sms_provider=provider,
        smsc_url=env.text("OTPGATE_SMSC_URL", "https://smsc.ru/sys/", "base URL of the smsc.ru-compatible API"),
        smsc_login=env.text("OTPGATE_SMSC_LOGIN", "", "smsc login"),
        smsc_password=env.text("OTPGATE_SMSC_PASSWORD", "", "smsc password (or API key)", secret=True),
        sms_webhook_url=env.text("OTPGATE_SMS_WEBHOOK_URL", "", "URL the webhook SMS provider POSTs to"),
        sms_webhook_secret=env.text(
            "OTPGATE_SMS_WEBHOOK_SECRET", "", "HMAC secret of the webhook SMS provider", secret=True
        ),
        smpp=_smpp(env, provider == "smpp"),
        sms_http=HttpSettings(
            timeout=env.number("OTPGATE_SMS_TIMEOUT", 5.0, "SMS provider request timeout, s", min=0.05),
            retries=env.integer(
                "OTPGATE_SMS_RETRIES", 2, "extra tries when a provider cannot be reached", min=0, max=10
            ),
        ),
        poll_interval=env.number(
            "OTPGATE_DELIVERY_POLL_INTERVAL", 0.5, "dispatcher poll interval while there is work, s", min=0.01
        ),
        policy_cache_ttl=env.number(
            "OTPGATE_DELIVERY_POLICY_CACHE_TTL",
            2.0,
            "how long a replica keeps a client policy in memory, s: a change made through another replica"
            " applies within it (0: read on every message)",
            min=0,
        ),
        idle_poll_interval=env.number(
            "OTPGATE_DELIVERY_IDLE_POLL_INTERVAL",
            5.0,
            "dispatcher poll interval when this replica knows of no due work, s: bounds how late it picks up"
            " what other replicas left behind and open messages that expire",
            min=0.01,
        ),
        dispatcher=env.flag("OTPGATE_DELIVERY_DISPATCHER", True, "run the dispatcher and purge loops in this process"),
        purge_interval=env.number("OTPGATE_DELIVERY_PURGE_INTERVAL", 300.0, "how often old data is purged, s", min=1),
        bot_cache_ttl=env.number("OTPGATE_DELIVERY_BOT_CACHE_TTL", 60.0, "how long bot facts are cached, s", min=0),
        webhook_max_attempts=env.integer("OTPGATE_WEBHOOK_MAX_RETRIES", 10, "status webhook retries", min=0, max=50),
        webhook_timeout=env.number("OTPGATE_WEBHOOK_TIMEOUT", 5.0, "status webhook timeout, s", min=0.05),
        webhook_backoff=env.number("OTPGATE_WEBHOOK_BACKOFF", 5.0, "first status webhook retry delay, s", min=0.01),
        sms_any_default={"": None, "true": True, "false": False}[default_sms_any],
        gateway=_gateway_settings(env),
    )
    if provider == "smsc" and not (config.smsc_login and config.smsc_password):
        env.errors.append("OTPGATE_SMS_PROVIDER=smsc needs OTPGATE_SMSC_LOGIN and OTPGATE_SMSC_PASSWORD")
    if provider == "smpp" and config.smpp.submit_timeout >= engine.lease:
        env.errors.append("OTPGATE_SMPP_SUBMIT_TIMEOUT must be shorter than OTPGATE_DELIVERY_LEASE")
    if provider == "smpp" and not (config.engine.sms_sender.isascii() and config.engine.sms_sender.strip()):
        env.errors.append("OTPGATE_SMS_SENDER must be ASCII for SMPP (digits, or a name of up to 11 characters)")
    elif (
        provider == "smpp" and not config.engine.sms_sender.lstrip("+").isdigit() and len(config.engine.sms_sender) > 11
    ):
        env.errors.append("OTPGATE_SMS_SENDER: an alphanumeric SMPP sender has at most 11 characters")
    if provider == "webhook" and not (config.sms_webhook_url and config.sms_webhook_secret):
        env.errors.append("OTPGATE_SMS_PROVIDER=webhook needs OTPGATE_SMS_WEBHOOK_URL and OTPGATE_SMS_WEBHOOK_SECRET")
    return config


def _smpp(env: Env, chosen: bool) -> SmppSettings:
    """OTPGATE_SMPP_*: read always (so they are documented), required only with OTPGATE_SMS_PROVIDER=smpp."""
    host = env.text("OTPGATE_SMPP_HOST", "", "SMSC host name or address (provider smpp)")
    system_id = env.text("OTPGATE_SMPP_SYSTEM_ID", "", "SMPP system_id to bind with, at most 15 characters")
    password = env.text("OTPGATE_SMPP_PASSWORD", "", "SMPP bind password, at most 8 characters", secret=True)
    system_type = env.text("OTPGATE_SMPP_SYSTEM_TYPE", "", "SMPP system_type to bind with (often empty)")
    link = LinkSettings(
        host=host,
        port=env.integer("OTPGATE_SMPP_PORT", 2775, "SMSC port", min=1, max=65535),
        system_id=system_id,
        password=password,
        system_type=system_type,
        window=env.integer(
            "OTPGATE_SMPP_WINDOW", 10, "submit_sm outstanding at once (the SMSC's window)", min=1, max=1000
        ),
        tps=env.number("OTPGATE_SMPP_TPS", 50.0, "submit_sm per second at most (the SMSC's contracted rate)", min=0.01),
        enquire_link_interval=env.number(
            "OTPGATE_SMPP_ENQUIRE_LINK_INTERVAL", 30.0, "enquire_link after this long without traffic, s", min=0.05
        ),
        response_timeout=env.number(
            "OTPGATE_SMPP_RESPONSE_TIMEOUT", 10.0, "wait for a bind, submit or enquire_link answer, s", min=0.05
        ),
        connect_timeout=env.number("OTPGATE_SMPP_CONNECT_TIMEOUT", 10.0, "TCP connect timeout, s", min=0.05),
        reconnect_min=env.number("OTPGATE_SMPP_RECONNECT_MIN", 1.0, "first reconnect delay, s (doubles)", min=0.01),
        reconnect_max=env.number("OTPGATE_SMPP_RECONNECT_MAX", 60.0, "longest reconnect delay, s", min=0.01),
    )
    ton = env.text("OTPGATE_SMPP_SOURCE_TON", "", "source TON (empty: 5 alphanumeric for a name, 1 for digits)")
    npi = env.text("OTPGATE_SMPP_SOURCE_NPI", "", "source NPI (empty: 0 for a name, 1 for digits)")
    retry = env.items(
        "OTPGATE_SMPP_RETRY_STATUSES", [], "submit_sm_resp statuses (hex, e.g. 0x45) to retry instead of failing"
    )
    settings = SmppSettings(
        link=link,
        submit_timeout=env.number(
            "OTPGATE_SMPP_SUBMIT_TIMEOUT",
            10.0,
            "longest one SMS send may take (every part, waits included), s",
            min=0.1,
        ),
        validity=env.number(
            "OTPGATE_SMPP_VALIDITY", 0.0, "submit_sm validity period, s (0: the SMSC's default)", min=0
        ),
        source_ton=_small_int(env, "OTPGATE_SMPP_SOURCE_TON", ton, (0, 1, 2, 3, 4, 5, 6)),
        source_npi=_small_int(env, "OTPGATE_SMPP_SOURCE_NPI", npi, (0, 1, 3, 4, 6, 8, 9, 10, 14, 18)),
        throttle_backoff=env.number(
            "OTPGATE_SMPP_THROTTLE_BACKOFF", 5.0, "pause after ESME_RTHROTTLED/ESME_RMSGQFUL, s", min=0
        ),
        retry_statuses=frozenset(_statuses(env, retry)),
        receipt_id_format=env.text(
            "OTPGATE_SMPP_RECEIPT_ID_FORMAT",
            "same",
            "receipt text ids vs submit_sm_resp ids: same, dec_to_hex (receipts decimal, submits hex) or hex_to_dec",
            choices=("same", "dec_to_hex", "hex_to_dec"),
        ),
        retention=env.number(
            "OTPGATE_SMPP_RECEIPT_RETENTION", 3 * 86400.0, "keep SMPP part and receipt records this long, s", min=3600
        ),
    )
    if chosen:
        missing = [n for n, v in (("HOST", host), ("SYSTEM_ID", system_id), ("PASSWORD", password)) if not v]
        if missing:
            env.errors.append("OTPGATE_SMS_PROVIDER=smpp needs " + " and ".join(f"OTPGATE_SMPP_{n}" for n in missing))
        for name, value, limit in (
            ("SYSTEM_ID", system_id, 15),
            ("PASSWORD", password, 8),
            ("SYSTEM_TYPE", system_type, 12),
        ):
            if len(value) > limit or not value.isascii():
                env.errors.append(f"OTPGATE_SMPP_{name} must be ASCII, at most {limit} characters (SMPP 3.4)")
    return settings


def _small_int(env: Env, name: str, raw: str, allowed: tuple[int, ...]) -> int | None:
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in allowed:
        env.errors.append(f"{name} {raw!r} is invalid: expected one of {', '.join(map(str, allowed))}")
        return None
    return int(raw)


def _statuses(env: Env, raw: list[str]) -> list[int]:
    out: list[int] = []
    for item in raw:
        try:
            out.append(int(item, 16))
        except ValueError:
            env.errors.append(f"OTPGATE_SMPP_RETRY_STATUSES {item!r} is invalid: expected a hex status such as 0x45")
    return out


def _country_risk(env: Env) -> dict[str, float]:
    raw = env.items(
        "OTPGATE_FRAUD_COUNTRY_RISK",
        [],
        "extra evidence (nats, 3 asks for a CAPTCHA) the fraud guard adds for numbers of a country, e.g. XX:3,YY:1.5",
    )
    risk: dict[str, float] = {}
    for item in raw:
        region, sep, value = item.partition(":")
        try:
            if not sep or len(region.strip()) != 2:
                raise ValueError
            risk[region.strip().upper()] = float(value)
        except ValueError:
            env.errors.append(f"OTPGATE_FRAUD_COUNTRY_RISK {item!r} is invalid: expected REGION:NATS, e.g. XX:3")
    return risk


def load_fraud_settings(env: Env) -> FraudSettings:
    """The fraud guard's settings (what each one means: services/delivery/fraud_score.py)."""
    defaults = ScoreSettings()
    score = ScoreSettings(
        captcha_at=env.number(
            "OTPGATE_FRAUD_CAPTCHA_AT",
            defaults.captcha_at,
            "evidence (nats) from which a CAPTCHA is asked for",
            min=0.5,
        ),
        attack_at=env.number(
            "OTPGATE_FRAUD_ATTACK_AT",
            defaults.attack_at,
            "evidence (nats) from which a range or a requester counts as attacking, solved CAPTCHA or not",
            min=1,
        ),
        legit_conversion=env.number(
            "OTPGATE_FRAUD_LEGIT_CONVERSION",
            defaults.legit_conversion,
            "share of codes ordinary traffic enters (a low estimate)",
            min=0.1,
        ),
        shares={
            Kind.PREFIX: env.number(
                "OTPGATE_FRAUD_PREFIX_SHARE",
                defaults.shares[Kind.PREFIX],
                "share of a country's recent requests one prefix (the number without 4 digits) may expect",
                min=0,
            ),
            Kind.RANGE: env.number(
                "OTPGATE_FRAUD_RANGE_SHARE",
                defaults.shares[Kind.RANGE],
                "share of a country's recent requests one range (the number without 6 digits) may expect",
                min=0,
            ),
        },
        country_risk=_country_risk(env),
    )
    return FraudSettings(
        mode=env.text(
            "OTPGATE_FRAUD_MODE",
            "block",
            "fraud guard default: block, monitor or off",
            choices=("block", "monitor", "off"),
        ),
        safe_prefixes=tuple(
            env.items("OTPGATE_FRAUD_SAFE_PREFIXES", [], "E.164 prefixes the fraud guard always lets through")
        ),
        attacked_budget=env.integer(
            "OTPGATE_FRAUD_ATTACKED_BUDGET",
            2,
            "SMS per hour an attacked range still sends to requests with a solved CAPTCHA",
            min=0,
        ),
        score=score,
    )

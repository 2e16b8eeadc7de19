"""Delivery's domain settings (read from the environment in app.py) and the rules derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.delivery.limits import Rate
from services.delivery.policy import Policy


@dataclass(frozen=True)
class EngineSettings:
    default_ttl: float = 600.0
    min_ttl: float = 10.0
    max_ttl: float = 7 * 86400.0
    lease: float = 30.0
    batch: int = 50
    # Claimed messages one dispatcher pass tries at once (each waits on the database, directory, bots).
    dispatch_concurrency: int = 16
    backoff_base: float = 2.0
    backoff_max: float = 120.0
    inline_dispatch: bool = True
    # How long one SendBotMessage may wait for the gateway's rate limits before we reschedule.
    bot_send_timeout: float = 3.0
    text_retention: float = 86400.0
    message_retention: float = 90 * 86400.0
    # A year of usage and a month to invoice it in.
    usage_retention_days: int = 400
    sms_sender: str = "otpgate"
    sms_poll_interval: float = 30.0
    sms_poll_for: float = 86400.0
    sms_countries: tuple[str, ...] = ()  # service-wide allow-list for every SMS; empty: any
    sms_part_cost: float = 0.0  # what one SMS part costs at the provider (usage and cost reports)
    dev: bool = False
    # The longest one request may run (OTPGATE_RPC_TIMEOUT): an idempotency key held without a
    # message for twice that was left by a request that failed or died, and is taken over.
    request_timeout: float = 5.0
    webhook_default_secret: str = ""
    limits: dict[str, Rate] = field(
        default_factory=lambda: {
            "client": Rate(1000, 60),
            "phone_short": Rate(5, 600),
            "phone_daily": Rate(20, 86400),
            "ip_sms": Rate(20, 3600),
            "session": Rate(10, 600),
            "global": Rate(20000, 60),
            "reachability": Rate(60, 60),
        }
    )

    def rate(self, policy: Policy, name: str) -> Rate:
        """The client's own rate for limit `name` if its policy sets one, else the service's."""
        return policy.rate_limits.get(name) or self.limits[name]

    def backoff(self, attempts: int) -> float:
        """The wait before the next try after `attempts` tries: doubling from backoff_base, capped."""
        attempts = max(1, attempts)
        return float(min(self.backoff_max, self.backoff_base * (2 ** (attempts - 1))))

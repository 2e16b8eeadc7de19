"""Settings of the verification service (read with Env; every one documented)."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.config import Env


@dataclass(frozen=True)
class VerifyPolicy:
    """Verify API limits."""

    default_ttl: int = 300
    min_ttl: int = 30
    max_ttl: int = 3600
    max_checks: int = 5
    max_sends: int = 5
    resend_cooldown: float = 30.0
    failed_checks_per_hour: int = 100
    # How long a client's policy allowing custom codes is trusted without asking delivery again.
    custom_code_policy_ttl: float = 2.0


@dataclass(frozen=True)
class ConfirmationPolicy:
    """Phone re-confirmation limits."""

    ttl: int = 600
    code_length: int = 6
    max_attempts: int = 5
    max_sends: int = 5
    resend_cooldown: float = 60.0


@dataclass(frozen=True)
class VerificationConfig:
    verify: VerifyPolicy = VerifyPolicy()
    confirmation: ConfirmationPolicy = ConfirmationPolicy()
    # Final verifications and confirmations stay readable this long, then are purged.
    retention_days: int = 30
    # How often the sweeper expires lapsed codes, retries follow-ups and purges old records.
    sweep_interval: float = 30.0


def load_config(env: Env) -> VerificationConfig:
    p = "OTPGATE_VERIFICATION_"
    verify = VerifyPolicy(
        default_ttl=env.integer(f"{p}DEFAULT_TTL", 300, "Verify API code validity when a request sets none, s", min=30),
        min_ttl=env.integer(f"{p}MIN_TTL", 30, "shortest Verify API code validity a client may ask for, s", min=10),
        max_ttl=env.integer(f"{p}MAX_TTL", 3600, "longest Verify API code validity a client may ask for, s", min=60),
        max_checks=env.integer(f"{p}MAX_CHECKS", 5, "checks per verification before MAX_ATTEMPTS_REACHED", min=1),
        max_sends=env.integer(f"{p}MAX_SENDS", 5, "sends per verification (the first one included)", min=1),
        resend_cooldown=env.number(
            f"{p}RESEND_COOLDOWN", 30.0, "seconds before a repeated start may re-send the same code", min=0
        ),
        failed_checks_per_hour=env.integer(
            f"{p}FAILED_CHECKS_PER_HOUR", 100, "failed checks per phone and hour across verifications", min=1
        ),
        custom_code_policy_ttl=env.number(
            f"{p}CUSTOM_CODE_POLICY_TTL",
            2.0,
            "how long a replica trusts a client policy that allows custom codes, s: withdrawing the permission"
            " applies within it, granting it at once (0: ask delivery on every start with a custom code)",
            min=0,
        ),
    )
    confirmation = ConfirmationPolicy(
        ttl=env.integer(f"{p}CONFIRMATION_TTL", 600, "validity of a re-confirmation SMS code, s", min=60),
        code_length=env.integer(f"{p}CONFIRMATION_CODE_LENGTH", 6, "digits of a re-confirmation code", min=4, max=10),
        max_attempts=env.integer(f"{p}CONFIRMATION_MAX_ATTEMPTS", 5, "typed tries per re-confirmation code", min=1),
        max_sends=env.integer(
            f"{p}CONFIRMATION_MAX_SENDS", 5, "SMS per re-confirmation (the first one included)", min=1
        ),
        resend_cooldown=env.number(
            f"{p}CONFIRMATION_RESEND_COOLDOWN", 60.0, "seconds before a re-confirmation SMS may be re-sent", min=0
        ),
    )
    if not verify.min_ttl <= verify.default_ttl <= verify.max_ttl:
        env.errors.append(f"{p}DEFAULT_TTL must lie between {p}MIN_TTL and {p}MAX_TTL")
    return VerificationConfig(
        verify=verify,
        confirmation=confirmation,
        retention_days=env.integer(f"{p}RETENTION_DAYS", 30, "days final verifications stay readable", min=1),
        sweep_interval=env.number(f"{p}SWEEP_INTERVAL", 30.0, "seconds between sweeps (expiry, purge)", min=0.1),
    )

from __future__ import annotations

import pytest

from services.core.config import ConfigError, Env
from services.verification.config import load_config


def test_defaults_match_the_product_rules() -> None:
    env = Env({}, service="verification")
    config = load_config(env)
    env.check()
    assert (config.verify.default_ttl, config.verify.min_ttl, config.verify.max_ttl) == (300, 30, 3600)
    assert (config.verify.max_checks, config.verify.max_sends, config.verify.resend_cooldown) == (5, 5, 30.0)
    assert config.verify.failed_checks_per_hour == 100
    assert (config.confirmation.ttl, config.confirmation.code_length, config.confirmation.max_attempts) == (600, 6, 5)
    assert config.confirmation.resend_cooldown == 60.0


def test_bad_values_fail_fast_naming_each() -> None:
    env = Env(
        {"OTPGATE_VERIFICATION_MAX_CHECKS": "0", "OTPGATE_VERIFICATION_CONFIRMATION_CODE_LENGTH": "12"},
        service="verification",
    )
    load_config(env)
    with pytest.raises(ConfigError) as info:
        env.check()
    assert "OTPGATE_VERIFICATION_MAX_CHECKS" in str(info.value)
    assert "OTPGATE_VERIFICATION_CONFIRMATION_CODE_LENGTH" in str(info.value)


def test_default_ttl_must_lie_within_the_allowed_range() -> None:
    env = Env({"OTPGATE_VERIFICATION_DEFAULT_TTL": "7200"}, service="verification")
    load_config(env)
    with pytest.raises(ConfigError, match="DEFAULT_TTL must lie between"):
        env.check()

from __future__ import annotations

import pytest

from services.core.config import SETTINGS, ConfigError, Env, load_common
from services.core.crypto import Keyring


def test_missing_and_invalid_values_fail_fast_with_every_problem_named() -> None:
    env = Env({"OTPGATE_DIRECTORY_PORT": "not-a-port", "OTPGATE_LOG_LEVEL": "loud"}, service="directory")
    load_common("directory", env)
    with pytest.raises(ConfigError) as info:
        env.check()
    message = str(info.value)
    for name in ("MONGODB_URI is required", "OTPGATE_KEYS is required", "OTPGATE_DIRECTORY_PORT", "OTPGATE_LOG_LEVEL"):
        assert name in message


def test_secret_values_are_never_echoed() -> None:
    env = Env({"MONGODB_URI": "mongodb://x/", "OTPGATE_KEYS": "k1:c2VjcmV0LXZhbHVl"}, service="edge")
    load_common("edge", env)
    with pytest.raises(ConfigError) as info:
        env.check()
    assert "c2VjcmV0LXZhbHVl" not in str(info.value)
    assert SETTINGS["OTPGATE_KEYS"].secret


def test_valid_environment_loads() -> None:
    spec = Keyring.generate_spec("k1")
    env = Env(
        {"MONGODB_URI": "mongodb://db/", "OTPGATE_KEYS": spec, "OTPGATE_SHARED_BOTS": "a_bot, b_bot"},
        service="delivery",
    )
    common = load_common("delivery", env)
    env.check()
    assert common.port == 50052 and common.metrics_port == 9102
    assert common.shared_bots == ["a_bot", "b_bot"]
    assert common.keyring.primary_id == "k1"
    assert common.addresses["directory"] == "127.0.0.1:50054"


def test_production_refuses_sandbox() -> None:
    env = Env(
        {
            "MONGODB_URI": "mongodb://db/",
            "OTPGATE_KEYS": Keyring.generate_spec("k1"),
            "OTPGATE_ENV": "production",
            "OTPGATE_SANDBOX": "1",
        }
    )
    load_common("edge", env)
    with pytest.raises(ConfigError, match="OTPGATE_SANDBOX cannot be on in production"):
        env.check()

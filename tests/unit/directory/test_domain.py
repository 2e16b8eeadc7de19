"""Pure parts of the directory domain: ordering of bots, keyed locks, unique-violation detection, config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.core.clock import ManualClock
from services.core.config import ConfigError, Env
from services.core.crypto import Keyring
from services.directory.app import load_config
from services.directory.store import BotLinkRecord, SubscriberRecord
from services.directory.subscribers import Directory, LinkOutcome

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(links: dict[str, tuple[str, int]]) -> SubscriberRecord:
    return SubscriberRecord(
        id="01",
        telegram_user_id=1,
        phone_sealed=b"",
        phone_index="x",
        phone_index_key="k1",
        region="RU",
        links={bot: BotLinkRecord(status, T0, T0 + timedelta(seconds=age)) for bot, (status, age) in links.items()},
        linked_at=T0,
        confirmed_at=None,
        created_at=T0,
        updated_at=T0,
    )


def directory(keyring: Keyring) -> Directory:
    return Directory(store=None, keyring=keyring, clock=ManualClock(), shared_bots=["s1_bot", "s2_bot", "s3_bot"])  # type: ignore[arg-type]


def test_resolution_orders_preferred_then_most_recent(keyring: Keyring) -> None:
    subscriber = record(
        {
            "s1_bot": ("CONNECTED", 10),
            "s2_bot": ("CONNECTED", 30),
            "own_bot": ("CONNECTED", 20),
            "s3_bot": ("BLOCKED", 40),
            "old_bot": ("STOPPED", 50),
        }
    )
    plain = directory(keyring).resolution(subscriber)
    assert plain.connected_bot_ids == ["s2_bot", "own_bot", "s1_bot"]
    assert plain.shared_bot_ids == ["s2_bot", "s1_bot"]
    assert plain.blocked_bot_ids == ["s3_bot"]
    preferred = directory(keyring).resolution(subscriber, "s1_bot")
    assert preferred.connected_bot_ids[0] == "s1_bot" and preferred.shared_bot_ids == ["s1_bot", "s2_bot"]
    # A preferred bot the person is not connected to changes nothing.
    assert directory(keyring).resolution(subscriber, "s3_bot").connected_bot_ids == plain.connected_bot_ids


def test_phone_indexes_cover_every_key_current_first(keyring: Keyring) -> None:
    indexes = directory(keyring).phone_indexes("+79991234567")
    assert indexes[0] == keyring.blind_index("phone", "+79991234567")
    assert sorted(indexes) == sorted(keyring.blind_index("phone", "+79991234567", k) for k in keyring.key_ids)
    assert len(set(indexes)) == len(keyring.key_ids)
    assert "79991234567" not in "".join(indexes)


def test_link_outcome_names() -> None:
    subscriber = record({})
    assert LinkOutcome(subscriber, False, False, created=True).outcome == "linked"
    assert LinkOutcome(subscriber, False, False).outcome == "relinked"
    assert LinkOutcome(subscriber, True, False).outcome == "number_changed"
    assert LinkOutcome(subscriber, True, True).outcome == "number_moved"


def test_config_defaults_and_limits() -> None:
    config = load_config(Env({}))
    assert config.link_attempts == 25 and config.stats_interval == 60.0
    env = Env({"OTPGATE_DIRECTORY_LINK_ATTEMPTS": "0"})
    load_config(env)
    with pytest.raises(ConfigError, match="OTPGATE_DIRECTORY_LINK_ATTEMPTS"):
        env.check()

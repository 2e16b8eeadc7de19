from __future__ import annotations

import pytest

from services.core.errors import Violations
from services.directory.validation import MAX_USER_ID, check_bot_id, check_phone, check_user_id


@pytest.mark.parametrize("bot_id", ["smsccode_bot", "abc", "A_1" * 21 + "x"])
def test_good_bot_ids(bot_id: str) -> None:
    violations = Violations()
    assert check_bot_id(violations, bot_id) == bot_id
    assert not violations


@pytest.mark.parametrize("bot_id", ["ab", "a.b", "$set", "links.x", "b" * 65, "bot-1", "bot id", "бот_id"])
def test_bot_ids_that_could_not_be_field_names_are_refused(bot_id: str) -> None:
    violations = Violations()
    check_bot_id(violations, bot_id)
    assert [field for field, _ in violations.items] == ["bot_id"]


def test_optional_bot_id() -> None:
    violations = Violations()
    check_bot_id(violations, "", required=False)
    assert not violations
    check_bot_id(violations, "")
    assert violations.items == [("bot_id", "is required")]


@pytest.mark.parametrize(
    ("value", "ok"), [(1, True), (MAX_USER_ID, True), (0, False), (-1, False), (MAX_USER_ID + 1, False)]
)
def test_user_ids(value: int, ok: bool) -> None:
    violations = Violations()
    check_user_id(violations, value)
    assert (not violations) is ok


def test_phone_plus_is_optional_only_for_contacts() -> None:
    violations = Violations()
    phone = check_phone(violations, "79991234567", plus_optional=True)
    assert phone is not None and phone.e164 == "+79991234567" and not violations
    assert check_phone(violations, "79991234567") is None
    assert [field for field, _ in violations.items] == ["phone"]


def test_phone_violation_never_repeats_the_input() -> None:
    violations = Violations()
    check_phone(violations, "+7999123456789012")
    check_phone(violations, "")
    assert len(violations.items) == 2
    assert all("7999" not in description for _, description in violations.items)

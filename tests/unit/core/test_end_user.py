"""End-user fields and message texts: what passes, what is refused, and one form per address."""

from __future__ import annotations

import pytest

from services.core.end_user import canonical_ip, check_text, has_visible_character, ip_network
from services.core.errors import Violations


def test_addresses_have_one_canonical_form() -> None:
    assert canonical_ip(" 203.0.113.7 ") == "203.0.113.7"
    assert canonical_ip("::ffff:203.0.113.7") == "203.0.113.7"
    assert canonical_ip("2001:DB8:0:0::1") == "2001:db8::1"
    for bad in ("", "localhost", "203.0.113.256", "0.0.0.0", "::", "224.0.0.1", "1.2.3.4/24"):
        with pytest.raises(ValueError):
            canonical_ip(bad)


def test_networks_are_a_24_or_a_48() -> None:
    assert ip_network("203.0.113.7") == "203.0.113.0/24"
    assert ip_network("2001:db8:aa:bb::1") == "2001:db8:aa::/48"
    assert ip_network("") == ""


def test_a_text_must_show_something() -> None:
    assert has_visible_character("Your code: 1234")
    assert has_visible_character("\u200b.")
    assert has_visible_character("😀")
    for blank in ("\x00\x1b\x7f", "\u200b\u200d\u2060", " \t\n\u00a0\u3000", "\u202e"):
        assert not has_visible_character(blank)
    problems = Violations()
    check_text(problems, "text", "", 10)
    check_text(problems, "other", "\x07", 10)
    check_text(problems, "long", "x" * 11, 10)
    assert problems.items == [
        ("text", "must be 1 to 10 characters"),
        ("other", "must contain a visible character"),
        ("long", "must be 1 to 10 characters"),
    ]

"""Status names in logs stay readable: only secrets are redacted."""

from __future__ import annotations

from services.core.logging import redact


def test_status_names_are_logged_and_codes_are_not() -> None:
    event = redact(None, "warning", {"status": "DEADLINE_EXCEEDED", "code": "424242", "reason": "X"})
    assert event == {"status": "DEADLINE_EXCEEDED", "code": "[redacted]", "reason": "X"}

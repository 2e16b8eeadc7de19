"""Business metrics of the verification service. Labels never carry a code or a phone."""

from __future__ import annotations

from prometheus_client import Counter

verifications = Counter(
    "otpgate_verifications_total",
    "Verify API events by outcome (started, resent, approved, wrong_code, expired, max_attempts, canceled, "
    "refused, resend_too_soon, max_sends, too_many_failed_checks, replayed).",
    ("outcome",),
)
confirmations = Counter(
    "otpgate_confirmations_total",
    "Phone re-confirmation events by outcome (started, reused, resent, confirmed, wrong_code, expired, "
    "too_many_attempts, no_pending, refused, superseded).",
    ("outcome",),
)

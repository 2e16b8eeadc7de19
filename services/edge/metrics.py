"""Business metrics of the edge."""

from __future__ import annotations

from prometheus_client import Counter

requests_total = Counter(
    "otpgate_edge_requests_total",
    "Public API requests by route (HTTP template or gRPC method) and gRPC status code name.",
    ("route", "code"),
)
auth_failures_total = Counter(
    "otpgate_edge_auth_failures_total",
    "Refused API keys: missing, malformed, unknown, wrong_secret, revoked, scope.",
    ("reason",),
)
captcha_verifications_total = Counter(
    "otpgate_captcha_verifications_total",
    "CAPTCHA checks: passed, failed, replayed, missing, unavailable.",
    ("outcome",),
)
limited_total = Counter(
    "otpgate_edge_limited_total",
    "Requests refused by the edge's own per-key and per-IP limits.",
    ("limit",),
)

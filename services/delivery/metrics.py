"""Delivery's business metrics (otpgate_*)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

messages_total = Counter(
    "otpgate_messages_total", "Messages reaching a status, by status, channel and bot.", ("status", "channel", "bot")
)
dispatch_lag_seconds = Histogram(
    "otpgate_dispatch_lag_seconds",
    "How late a due message was claimed by a dispatcher.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
limiter_rejections_total = Counter("otpgate_limiter_rejections_total", "Requests refused by a rate limit.", ("limit",))
fraud_decisions_total = Counter(
    "otpgate_fraud_decisions_total", "Fraud guard decisions on SMS legs.", ("decision", "reason")
)
sms_sent_total = Counter("otpgate_sms_sent_total", "SMS handed to a provider, by outcome.", ("provider", "outcome"))
accept_to_sent_seconds = Histogram(
    "otpgate_accept_to_sent_seconds",
    "Time from accepting a message to its first successful send.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
webhooks_total = Counter("otpgate_webhooks_total", "Status webhook attempts, by outcome.", ("outcome",))
gateway_calls_total = Counter(
    "otpgate_gateway_calls_total",
    "Telegram Gateway calls, by method and outcome (ok or the error).",
    ("method", "outcome"),
)
gateway_reports_total = Counter(
    "otpgate_gateway_reports_total", "Telegram Gateway delivery reports received, by outcome.", ("outcome",)
)
delivered_cost_total = Counter(
    "otpgate_delivery_cost_total", "What the sent messages cost (refunds taken off), by channel.", ("channel",)
)
ladder_fallbacks_total = Counter(
    "otpgate_ladder_fallbacks_total",
    "AUTO messages that went past a rung, by the rung left and why.",
    ("channel", "reason"),
)

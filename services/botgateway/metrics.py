"""Business metrics of the bot gateway."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

bot_messages = Counter(
    "otpgate_bot_messages_total",
    "Messages the bots tried to send, by outcome (sent, blocked, not_connected, deactivated, flood_wait, "
    "rate_limited, stopped, unavailable, recipient_is_bot, too_long, write_forbidden, peer_flood, bot_banned, "
    "already_sent, outcome_unknown, error).",
    ("bot", "outcome"),
)
telegram_errors = Counter(
    "otpgate_bot_telegram_errors_total",
    "Telegram errors without an outcome of their own (answered as BOT_UNAVAILABLE), by Telegram's name.",
    ("bot", "error"),
)
differences = Counter(
    "otpgate_bot_differences_total",
    "How updates.getDifference answered, per bot: empty, difference, slice, too_long (updates were lost), "
    "failed (retried), state_reset (the kept state was ahead of Telegram's).",
    ("bot", "kind"),
)
session_replacements = Counter(
    "otpgate_bot_session_replacements_total",
    "Saved sessions replaced by a login with the token: refused (AUTH_KEY_UNREGISTERED, SESSION_REVOKED, "
    "AUTH_KEY_DUPLICATED), another_bot (the session logged in as a different bot) or unreadable.",
    ("bot", "reason"),
)
updates_replayed = Counter(
    "otpgate_bot_updates_replayed_total",
    "Incoming updates seen again (after a restart or handover) and not handled twice.",
    ("bot",),
)
updates_failed = Counter(
    "otpgate_bot_updates_failed_total",
    "Incoming updates whose handling failed after retries (the session restarts and catches up).",
    ("bot",),
)
flood_waits = Counter("otpgate_bot_flood_waits_total", "Telegram flood waits received, per bot.", ("bot",))
bot_sessions = Gauge(
    "otpgate_bot_sessions", "Bot sessions on this replica by state (running, failed, standby).", ("bot", "state")
)
limiter_wait = Histogram(
    "otpgate_bot_limiter_wait_seconds",
    "Time a message waited for the per-bot and per-chat token buckets.",
    buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
bot_updates = Counter("otpgate_bot_updates_total", "Incoming Telegram events by kind.", ("bot", "kind"))
deletions = Counter("otpgate_bot_deletions_total", "Scheduled message deletions by outcome.", ("outcome",))

SESSION_STATES = ("running", "failed", "standby")


def set_session_state(bot_id: str, state: str) -> None:
    for candidate in SESSION_STATES:
        bot_sessions.labels(bot_id, candidate).set(1 if candidate == state else 0)


def drop_session(bot_id: str) -> None:
    for candidate in SESSION_STATES:
        bot_sessions.labels(bot_id, candidate).set(0)

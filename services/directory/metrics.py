"""Business metrics of the directory (never labelled with a phone, a user id or anything personal)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

links = Counter(
    "otpgate_directory_links_total",
    "LinkContact outcomes: linked (new person), relinked (same number again), number_changed, "
    "number_moved (taken from another account), refused_not_own, invalid.",
    ("outcome",),
)
link_retries = Counter(
    "otpgate_directory_link_retries_total",
    "LinkContact attempts repeated after a concurrent change of the same person or number.",
)
connects = Counter(
    "otpgate_directory_connect_known_total", "ConnectKnownUser outcomes: connected, unknown.", ("outcome",)
)
resolves = Counter("otpgate_directory_resolves_total", "ResolvePhone outcomes: found, not_found.", ("outcome",))
bot_status = Counter(
    "otpgate_directory_bot_status_total", "Bot link status changes recorded, by new status.", ("status",)
)
confirmations = Counter(
    "otpgate_directory_confirmations_total",
    "MarkConfirmed outcomes: confirmed, not_linked, unknown.",
    ("outcome",),
)
erasures = Counter("otpgate_directory_erasures_total", "ForgetSubscriber outcomes: erased, absent.", ("outcome",))
subscribers = Gauge("otpgate_directory_subscribers", "Subscribers known, sampled periodically.")

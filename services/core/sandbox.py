"""What the gateway and the simulated Telegram agree on in sandbox mode: the tokens of the shared
bots. BotFather would hand these out; in the sandbox both sides derive them from the bot id, so the
simulated Telegram creates the configured shared bots with the tokens the gateway logs in with."""

from __future__ import annotations

import hashlib


def sandbox_token(bot_id: str) -> str:
    """The token of a configured shared bot inside the sandbox (stable across restarts)."""
    digest = hashlib.sha256(f"otpgate-sandbox/{bot_id.lower()}".encode()).digest()
    telegram_id = 5_000_000_000 + int.from_bytes(digest[:4], "big")
    return f"{telegram_id}:sandbox{digest[4:16].hex()}"

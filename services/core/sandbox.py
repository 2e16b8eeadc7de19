"""What the services and the simulated Telegram agree on in sandbox mode: the tokens of the shared
bots and of the service-wide Telegram Gateway account. BotFather (or Telegram's Gateway account
page) would hand these out; in the sandbox both sides derive them, so the simulated Telegram creates
the shared bots and the Gateway account with the tokens botgateway and delivery use."""

from __future__ import annotations

import hashlib


def sandbox_token(bot_id: str) -> str:
    """The token of a configured shared bot inside the sandbox (stable across restarts)."""
    digest = hashlib.sha256(f"otpgate-sandbox/{bot_id.lower()}".encode()).digest()
    telegram_id = 5_000_000_000 + int.from_bytes(digest[:4], "big")
    return f"{telegram_id}:sandbox{digest[4:16].hex()}"


def sandbox_gateway_token(account: str = "service") -> str:
    """The API token of a local Telegram Gateway account (`service`: the service-wide one)."""
    return "sandbox" + hashlib.sha256(f"otpgate-sandbox-gateway/{account}".encode()).hexdigest()[:40]

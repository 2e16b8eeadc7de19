"""Page tokens (AIP-158): opaque to clients, the URL-safe base64 (unpadded) of what the next page
starts from. Each listing decides what its payload is and checks it after `decode`."""

from __future__ import annotations

import base64


def encode(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(token: str) -> str:
    """The payload `encode` made; ValueError for what cannot be decoded (characters outside the
    alphabet are skipped, as base64 does: each listing checks the payload it gets)."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()

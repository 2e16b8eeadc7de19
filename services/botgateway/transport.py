"""The boundary between the gateway and Telegram: one interface, two implementations.

`TelethonTransport` talks MTProto to the real Telegram; `SandboxTransport` talks to the
simulated Telegram in this process. Both raise the same `TransportError`s and deliver the
same incoming events, so the conversation and the sending logic never know which is in use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BotIdentity:
    """Who a token logs in as."""

    telegram_id: int
    username: str


@dataclass(frozen=True)
class BotCredentials:
    bot_id: str
    token: str
    # A saved session (Telethon StringSession); empty: log in with the token.
    session: str = ""


@dataclass(frozen=True)
class Peer:
    """A person as one bot can address them (access hashes differ per bot)."""

    user_id: int
    access_hash: int = 0


@dataclass(frozen=True)
class Keyboard:
    """A reply keyboard: one button asking for the person's number, or removal of the keyboard."""

    request_contact_label: str = ""
    remove: bool = False


@dataclass(frozen=True)
class OutgoingMessage:
    text: str
    protect_content: bool = False
    silent: bool = False
    keyboard: Keyboard | None = None


# Incoming events -----------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    user_id: int
    access_hash: int = 0
    language_code: str = ""
    first_name: str = ""


@dataclass(frozen=True)
class TextReceived:
    bot_id: str
    sender: Sender
    text: str
    message_id: int = 0


@dataclass(frozen=True)
class ContactReceived:
    bot_id: str
    sender: Sender
    # 0 when the contact is someone without a Telegram account known to the sender, or not theirs.
    contact_user_id: int
    phone: str
    forwarded: bool
    message_id: int = 0


@dataclass(frozen=True)
class BotStopped:
    """The person blocked the bot (stopped=True) or unblocked it (stopped=False)."""

    bot_id: str
    user_id: int
    stopped: bool


IncomingEvent = TextReceived | ContactReceived | BotStopped
# Returns the ids of the messages the bot sent in answer.
EventHandler = Callable[[IncomingEvent], Awaitable[list[int]]]


# Errors (the same for every transport) -----------------------------------------------


class TransportError(Exception):
    """Telegram refused a request."""


class FloodWait(TransportError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"flood wait of {seconds} s")
        self.seconds = seconds


class UserBlocked(TransportError):
    """The person blocked the bot."""


class PeerInvalid(TransportError):
    """The bot cannot address the person (never started it, or no access hash)."""


class UserDeactivated(TransportError):
    """The person's account was deleted."""


class TokenInvalid(TransportError):
    """The bot token does not log in."""


class BotNotRunning(TransportError):
    """This process has no live session for the bot."""


class Transport(Protocol):
    """What the gateway needs from Telegram."""

    def set_handler(self, handler: EventHandler) -> None:
        """Where incoming events go."""
        ...

    async def check_token(self, token: str) -> tuple[BotIdentity, str]:
        """Log in with a token; return who it is and the session to keep (raises TokenInvalid)."""
        ...

    async def start_bot(self, credentials: BotCredentials) -> tuple[BotIdentity, str]:
        """Open the bot's session (reusing a saved one); returns its identity and the session to keep."""
        ...

    async def stop_bot(self, bot_id: str) -> None:
        """Close the bot's session on this process (no-op when not running)."""
        ...

    def running(self, bot_id: str) -> bool: ...

    async def send(self, bot_id: str, peer: Peer, message: OutgoingMessage) -> int:
        """Send a text; returns the bot-side message id."""
        ...

    async def delete(self, bot_id: str, peer: Peer, message_ids: list[int]) -> None:
        """Delete the bot's messages for both sides."""
        ...

    async def close(self) -> None: ...

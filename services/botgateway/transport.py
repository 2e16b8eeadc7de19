"""The boundary between the gateway and Telegram.

One implementation: `TelethonTransport` (telethon_transport.py), a Telethon TelegramClient per bot.
Against Telegram its MTProto sender is Telethon's; in sandbox mode it is the tunnel to the
simulated Telegram (sandbox_link.py), so the conversation, the sending logic and the update state
never know which Telegram they talk to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from services.botgateway.updates import UpdateState


@dataclass(frozen=True)
class BotIdentity:
    """Who a token logs in as."""

    telegram_id: int
    username: str


def token_bot_id(token: str) -> int:
    """The bot id a BotFather token names (the number before the colon); 0 if there is none."""
    head = token.partition(":")[0]
    return int(head) if head.isdigit() else 0


@dataclass(frozen=True)
class BotCredentials:
    bot_id: str
    token: str
    # A saved session (the sealed StringSession); empty: log in with the token.
    session: str = ""
    # The handled update state kept for this bot's account; None: none yet (a new bot).
    update_state: UpdateState | None = None


@dataclass(frozen=True)
class StartedBot:
    identity: BotIdentity
    # The session to keep (a new one when the saved one was refused or belonged to another bot).
    session: str
    # The state updates continue from (to keep when it differs from the one given).
    update_state: UpdateState


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
    # Telegram's idempotency key for a send (0: a random one). A send repeated with the same one is
    # answered with the message the first made (sends.py): replies use one derived from the update
    # they answer, requests one derived from their request_id.
    random_id: int = 0


# Incoming events -----------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    user_id: int
    access_hash: int = 0
    language_code: str = ""
    first_name: str = ""


class _FromPerson:
    """What a person's message carries (the dataclasses below declare the fields)."""

    sender: Sender
    message_id: int

    @property
    def user_id(self) -> int:
        return self.sender.user_id

    @property
    def key(self) -> str:
        """What identifies this update for the bot (incoming message ids are per bot account)."""
        return f"m{self.message_id}"


@dataclass(frozen=True)
class TextReceived(_FromPerson):
    bot_id: str
    sender: Sender
    text: str
    message_id: int = 0


@dataclass(frozen=True)
class ContactReceived(_FromPerson):
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
    qts: int = 0

    @property
    def key(self) -> str:
        return f"q{self.qts}"


IncomingEvent = TextReceived | ContactReceived | BotStopped
# Returns the ids of the messages the bot sent in answer.
EventHandler = Callable[[IncomingEvent], Awaitable[list[int]]]


class StateKeeper(Protocol):
    """Keeps each bot's handled update state (with the bot's account, its Telegram id)."""

    def advance(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        """The handled state moved forward (kept soon, coalesced)."""
        ...

    async def keep(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        """Keep this state now (returns once it is written)."""
        ...


# Errors: what Telegram refused, each with one outcome for the caller -------------------------


class TransportError(Exception):
    """Telegram refused a request (the message names Telegram's error when none below fits)."""


class FloodWait(TransportError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"flood wait of {seconds} s")
        self.seconds = seconds


class UserBlocked(TransportError):
    """The person blocked the bot (USER_IS_BLOCKED)."""


class PeerInvalid(TransportError):
    """The bot cannot address the person: never started, or a wrong access hash (PEER_ID_INVALID)."""


class UserDeactivated(TransportError):
    """The person's account was deleted (INPUT_USER_DEACTIVATED)."""


class RecipientIsBot(TransportError):
    """The recipient is a bot; bots cannot message bots (USER_IS_BOT)."""


class MessageTooLong(TransportError):
    """Telegram measured the text over 4096 UTF-16 units (MESSAGE_TOO_LONG)."""


class ChatWriteForbidden(TransportError):
    """The bot may not write in this chat (CHAT_WRITE_FORBIDDEN)."""


class PeerFlood(TransportError):
    """Telegram limits this bot for sending too much to people (PEER_FLOOD); no duration is given."""


class BotDeactivated(TransportError):
    """Telegram deactivated or banned the bot's own account (USER_DEACTIVATED_BAN, USER_DEACTIVATED)."""


class AlreadySent(TransportError):
    """The send's random_id is being used by a send Telegram is still making (RANDOM_ID_DUPLICATE): that
    one is the message. (A repeat of a finished send is answered with the message it made.)"""


class OutcomeUnknown(TransportError):
    """The request may have reached Telegram and been carried out, or not: the connection broke or
    timed out while it was out, or Telegram failed internally (a 500 such as INTERNAL) after taking
    it. A send repeated with the same random_id settles it."""


class DeleteForbidden(TransportError):
    """Too late to delete: bots delete their messages for 48 hours (MESSAGE_DELETE_FORBIDDEN)."""


class TokenInvalid(TransportError):
    """The bot token does not log in."""


class SessionInvalid(TransportError):
    """The saved session is refused (AUTH_KEY_UNREGISTERED, SESSION_REVOKED, AUTH_KEY_DUPLICATED):
    the bot logs in with its token again."""


class BotNotRunning(TransportError):
    """This process has no live session for the bot."""


class Transport(Protocol):
    """What the gateway needs from Telegram."""

    def set_handler(self, handler: EventHandler) -> None:
        """Where incoming events go."""
        ...

    def set_state_keeper(self, keeper: StateKeeper) -> None:
        """Who keeps each bot's handled update state."""
        ...

    async def check_token(self, token: str) -> tuple[BotIdentity, str, UpdateState]:
        """Log in with a token; who it is, the session to keep and the state to start from."""
        ...

    async def start_bot(self, credentials: BotCredentials) -> StartedBot:
        """Open the bot's session (reusing a saved one), catch up from its state, listen."""
        ...

    async def stop_bot(self, bot_id: str) -> None:
        """Close the bot's session on this process, after the updates in hand (no-op when not running)."""
        ...

    def running(self, bot_id: str) -> bool: ...

    async def send(self, bot_id: str, peer: Peer, message: OutgoingMessage) -> int:
        """Send a text; returns the bot-side message id (0 for a reply Telegram already had)."""
        ...

    async def delete(self, bot_id: str, peer: Peer, message_ids: list[int]) -> None:
        """Delete the bot's messages for both sides."""
        ...

    async def close(self) -> None: ...

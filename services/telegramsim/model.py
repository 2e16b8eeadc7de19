"""The simulated Telegram's records and errors: accounts, chats, the entries of a bot's update
log, and Telegram's rpc_error by its name."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

# The entry kinds of a bot's update log: a message (pts), a deletion (pts), a stop or restart (qts).
MESSAGE = "message"
DELETE = "delete"
STOPPED = "stopped"

# Telegram's own limits on messages and deletions.
MAX_TEXT_UTF16 = 4096
DELETE_WINDOW_SECONDS = 48 * 3600


class RpcError(Exception):
    """Telegram's rpc_error: a code and an UPPER_SNAKE message, as the client library reads it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


def flood_wait(seconds: int) -> RpcError:
    return RpcError(420, f"FLOOD_WAIT_{max(1, seconds)}")


def bad_request(message: str) -> RpcError:
    return RpcError(400, message)


def forbidden(message: str) -> RpcError:
    return RpcError(403, message)


def unauthorized(message: str) -> RpcError:
    return RpcError(401, message)


class SandboxError(Exception):
    """A person's action that Telegram itself would not allow."""


class UnknownUser(SandboxError):
    pass


class UnknownBot(SandboxError):
    pass


class ChatNotStarted(SandboxError):
    pass


@dataclass
class SimUser:
    user_id: int
    first_name: str
    language_code: str
    phone: str
    deactivated: bool = False
    # The person's own message ids (every account numbers its messages itself).
    last_message_id: int = 0


@dataclass
class SimBot:
    telegram_id: int
    username: str
    token: str
    create_time: datetime
    # The update sequences; each only grows. `floor_*` is where the kept history starts (a reset).
    pts: int = 0
    qts: int = 0
    seq: int = 0
    date: datetime | None = None
    last_message_id: int = 0
    floor_pts: int = 0
    floor_qts: int = 0

    @property
    def bot_id(self) -> str:
        return self.username.lower()


@dataclass
class SimChat:
    bot: int  # the bot's Telegram id
    user_id: int
    started: bool = False
    blocked: bool = False
    # (the person's message id, its pts) of every message of the chat, oldest first: the chat's view
    # reads its messages by `_id`, not by scanning the log.
    index: list[tuple[int, int]] = field(default_factory=list)
    # The latest messages, as they are (the sandbox's replies read them).
    recent: list[SimMessage] = field(default_factory=list)


@dataclass
class SimMessage:
    """One message of a private chat, with both sides' ids."""

    bot: int
    user_id: int
    from_bot: bool
    text: str
    date: datetime
    bot_message_id: int
    user_message_id: int
    pts: int
    random_id: int
    protect_content: bool = False
    silent: bool = False
    request_contact: bool = False
    remove_keyboard: bool = False
    deleted: bool = False
    # A shared contact: its number (digits, as Telegram sends it), its user (0: not the sender's own).
    contact_phone: str = ""
    contact_user_id: int = 0
    forwarded: bool = False
    # The MTProto session that sent a bot's message; the monotonic time Telegram accepted it.
    session_id: int = 0
    accepted_at: float = 0.0


@dataclass(frozen=True)
class Deletion:
    pts: int
    pts_count: int
    bot_message_ids: tuple[int, ...]
    date: datetime


@dataclass(frozen=True)
class BotStopped:
    qts: int
    user_id: int
    stopped: bool
    date: datetime


@dataclass(frozen=True)
class State:
    pts: int
    qts: int
    date: datetime
    seq: int


@dataclass(frozen=True)
class Push:
    """One Updates container pushed to a bot's connected sessions."""

    seq: int
    date: datetime
    message: SimMessage | None = None
    stopped: BotStopped | None = None


@dataclass(frozen=True)
class Difference:
    """updates.getDifference's answer: `final` False is a slice; `too_long` the state to jump to."""

    messages: list[SimMessage]
    deletions: list[Deletion]
    stops: list[BotStopped]
    state: State
    final: bool = True
    too_long: bool = False

    @property
    def empty(self) -> bool:
        return self.final and not (self.messages or self.deletions or self.stops)


@dataclass(frozen=True)
class SandboxLimits:
    """Telegram's limits, as the simulated Telegram enforces them (configurable for tests and benches)."""

    bot_rate: float = 30.0
    bot_burst: int = 30
    chat_rate: float = 1.0
    chat_burst: int = 5
    # Bot logins (auth.importBotAuthorization) per bot: a burst, then one per `login_interval` s.
    login_burst: int = 5
    login_interval: float = 30.0
    # updates.getDifference: pts per slice, and how far behind a bot may be before "too long".
    difference_slice: int = 100
    difference_limit: int = 100_000
    # How long a person-side call waits for the bot to handle what the person did.
    reply_wait: float = 10.0

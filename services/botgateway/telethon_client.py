"""Telethon, fitted to keep a bot's update state as handled rather than as received.

Four hooks into Telethon 1.x, each pinned by tests/unit/botgateway/test_telethon_transport.py so
that an upgrade that moves them fails there, not in production:

- `KeptSession` (a StringSession: data centre and auth key, the string kept sealed in MongoDB)
  also carries the bot's handled update state and ignores Telethon's own saves of it: Telethon
  saves its message box, which is ahead of what the handlers finished.
- `TrackedClient._preprocess_updates` is where every batch the message box applied passes, with
  the box's state right after it: the HandledLedger (updates.py) learns it there.
- `TrackedClient._on_login` no longer jumps to Telegram's latest state on login (Telethon does,
  dropping what happened meanwhile): the transport sets the state it continues from.
- `KeptStateBox` (Telethon's MessageBox) counts how each difference ended, reports "too long",
  and hands on the updates a difference carries in `other_updates` for the account and for bots
  (UpdateBotStopped): Telethon 1.x sets the difference's final state before looking at them and
  so drops every one as already seen. A difference that failed is tried again shortly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

from telethon import TelegramClient
from telethon._updates.messagebox import ENTRY_ACCOUNT, ENTRY_SECRET, MessageBox, PtsInfo
from telethon.sessions import StringSession
from telethon.tl import functions, types

from services.botgateway import metrics
from services.botgateway.updates import HandledLedger, UpdateState
from services.core.logging import get_logger

log = get_logger(__name__)

SenderFactory = Callable[["TrackedClient"], Any]
# A failed difference is tried again after 5 s, doubling up to 5 times; then the next gap decides.
DIFFERENCE_RETRY_SECONDS = 5.0
DIFFERENCE_RETRIES = 5


def state_of(ss: dict[str, Any]) -> UpdateState:
    """A message box's session_state() as an UpdateState."""
    return UpdateState(int(ss["pts"]), int(ss["qts"]), ss["date"], int(ss["seq"]))


class KeptSession(StringSession):  # type: ignore[misc]  # Telethon is untyped
    """The sealed session string plus the handled update state."""

    def __init__(self, string: str = "", update_state: UpdateState | None = None) -> None:
        super().__init__(string or None)
        self.update_state = update_state

    def get_update_state(self, entity_id: int) -> Any:
        if entity_id != 0 or self.update_state is None:
            return None
        state = self.update_state
        return types.updates.State(pts=state.pts, qts=state.qts, date=state.date, seq=state.seq, unread_count=0)

    def get_update_states(self) -> list[tuple[int, Any]]:
        state = self.get_update_state(0)
        return [(0, state)] if state is not None else []

    def set_update_state(self, entity_id: int, state: Any) -> None:
        """Telethon's saves of its message box: ahead of the handlers, so not kept (the ledger decides)."""


class KeptStateBox(MessageBox):  # type: ignore[misc]
    def __init__(self, log_: Any, bot_id: str, on_failed: Callable[[], None], on_done: Callable[[], None]) -> None:
        super().__init__(log_)
        self.bot_id = bot_id
        self._on_failed = on_failed
        self._on_done = on_done

    def apply_difference(self, diff: Any, chat_hashes: Any) -> Any:
        kind = {
            types.updates.DifferenceEmpty: "empty",
            types.updates.Difference: "difference",
            types.updates.DifferenceSlice: "slice",
            types.updates.DifferenceTooLong: "too_long",
        }.get(type(diff), "other")
        metrics.differences.labels(self.bot_id, kind).inc()
        if kind == "too_long":
            before = self.map[ENTRY_ACCOUNT].pts if ENTRY_ACCOUNT in self.map else 0
            log.warning("bot_difference_too_long", bot=self.bot_id, pts=before, jump_to=int(diff.pts))
        self._on_done()
        return super().apply_difference(diff, chat_hashes)

    def apply_difference_type(self, diff: Any, chat_hashes: Any) -> Any:
        before = {entry: self.map[entry].pts for entry in (ENTRY_ACCOUNT, ENTRY_SECRET) if entry in self.map}
        updates, users, chats = super().apply_difference_type(diff, chat_hashes)
        returned = {id(update) for update in updates}
        carried = []
        for update in diff.other_updates:
            info = PtsInfo.from_update(update)
            if info is None or info.entry not in (ENTRY_ACCOUNT, ENTRY_SECRET) or id(update) in returned:
                continue
            if info.pts > before.get(info.entry, 0):
                carried.append(update)
        # In time order; at the same second a stop or restart first (it comes before the /start it allows).
        ordered = sorted([*updates, *carried], key=_moment)
        return ordered, users, chats

    def end_difference(self) -> None:
        """A difference that failed (Telegram trouble): Telethon waits for the next gap; we retry soon."""
        super().end_difference()
        metrics.differences.labels(self.bot_id, "failed").inc()
        self._on_failed()


def _moment(update: Any) -> tuple[float, int]:
    message = getattr(update, "message", None)
    date = getattr(message, "date", None) or getattr(update, "date", None)
    stamp = date.timestamp() if isinstance(date, datetime) else 0.0
    return stamp, 0 if isinstance(update, types.UpdateBotStopped) else 1


class TrackedClient(TelegramClient):  # type: ignore[misc]
    """One bot's TelegramClient: dispatches one update at a time in box order, never sleeps on flood
    waits itself, starts without subscribing to updates (the transport subscribes once the state it
    continues from is set) and reports what the handlers finished."""

    def __init__(
        self,
        session: KeptSession,
        api_id: int,
        api_hash: str,
        *,
        bot_id: str,
        sender_factory: SenderFactory | None = None,
    ) -> None:
        super().__init__(
            session,
            api_id,
            api_hash,
            flood_sleep_threshold=0,  # the gateway decides what a flood wait means
            request_retries=1,
            raise_last_call_error=True,
            sequential_updates=True,
            receive_updates=False,
            catch_up=False,
            device_model="otpgate",
            app_version="otpgate",
        )
        self.bot_id = bot_id
        self.ledger: HandledLedger | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._retrying: set[asyncio.Task[None]] = set()
        self._retries = 0
        self._message_box = KeptStateBox(self._log["messagebox"], bot_id, self._retry_difference, self.difference_done)
        if sender_factory is not None:
            self._sender = sender_factory(self)

    def continue_from(self, state: UpdateState, ledger: HandledLedger) -> None:
        """Set the state updates continue from, and who learns what gets handled."""
        self.ledger = ledger
        self._message_box.set_state(
            types.updates.State(pts=state.pts, qts=state.qts, date=state.date, seq=state.seq, unread_count=0),
            reset=False,  # keep a known pts of 0 (a brand-new bot): an empty box would skip its first update
        )

    async def subscribe(self) -> UpdateState:
        """Ask for updates on this connection (a request not wrapped in invokeWithoutUpdates, as
        Telethon's set_receive_updates makes); returns Telegram's state at that moment."""
        self._no_updates = False
        state = await self(functions.updates.GetStateRequest())
        return UpdateState(int(state.pts), int(state.qts), state.date, int(state.seq))

    def box_state(self) -> UpdateState:
        return state_of(self._message_box.session_state()[0])

    async def _preprocess_updates(self, updates: list[Any], users: list[Any], chats: list[Any]) -> list[Any]:
        result: list[Any] = await super()._preprocess_updates(updates, users, chats)
        if self.ledger is not None:
            self.ledger.received(result, self.box_state())
        return result

    async def _on_login(self, user: Any) -> Any:
        self._mb_entity_cache.set_self_user(user.id, user.bot, user.access_hash)
        self._authorized = True
        return user

    async def _handle_auto_reconnect(self) -> None:
        await super()._handle_auto_reconnect()
        if self.ledger is not None:
            await self.catch_up()  # Telethon does not fetch what came while the connection was down

    def _retry_difference(self) -> None:
        if self._retry is not None or self.ledger is None or self._retries >= DIFFERENCE_RETRIES:
            return
        delay = DIFFERENCE_RETRY_SECONDS * 2**self._retries
        self._retries += 1

        def again() -> None:
            self._retry = None
            if self.is_connected():
                task = asyncio.get_running_loop().create_task(self.catch_up())
                self._retrying.add(task)
                task.add_done_callback(self._retrying.discard)

        self._retry = asyncio.get_running_loop().call_later(delay, again)

    def difference_done(self) -> None:
        """A difference completed: failures start counting again from zero."""
        self._retries = 0

    def handled(self, state: UpdateState) -> None:
        """The handlers finished everything up to `state` (a sandbox connection tells the simulated
        Telegram, which answers the person-side calls then)."""
        acknowledge = getattr(self._sender, "acknowledge", None)
        if acknowledge is not None:
            acknowledge(state)

    async def disconnect(self) -> Any:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        return await super().disconnect()

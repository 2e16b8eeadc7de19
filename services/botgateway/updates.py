"""A bot's update state, advanced only as far as its updates were handled, and kept cheaply.

Telegram hands a reconnecting bot what it missed only through updates.getDifference from a kept
state (pts, qts, date, seq). Telethon's message box moves that state forward as soon as updates
arrive, before any handler has run; saving the box's state would acknowledge updates that a crash
then loses. So the state kept here is the handled state:

- `HandledLedger` learns every batch the box applied, with the state the box reached after it (a
  batch of live updates, one slice of a difference, or nothing but a new state, e.g. the bot's
  own sent message). A batch is handled when each of its updates is; the handled state is the
  state after the last batch that is handled together with every batch before it. Updates are
  dispatched one at a time in box order, so when an update of a later batch reaches the handler,
  any update of an earlier batch that never did was skipped by Telethon and counts as handled.
- `StateWriter` persists the handled state coalesced: one write in flight per bot, the newest
  state after it; a stop flushes. The kept state may lag what was handled (a replay is harmless:
  handling is idempotent per bot and incoming message, see gateway.py) but never runs ahead.
- `PerPersonOrder` runs one person's updates one after the other, in the order they came, while
  different people's run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.core.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class UpdateState:
    """Telegram's updates.State for one account: what getDifference continues from."""

    pts: int
    qts: int
    date: datetime
    seq: int

    def to_doc(self) -> dict[str, Any]:
        return {"pts": self.pts, "qts": self.qts, "date": self.date, "seq": self.seq}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> UpdateState:
        date = doc["date"]
        return cls(int(doc["pts"]), int(doc["qts"]), date if date.tzinfo else date.replace(tzinfo=UTC), int(doc["seq"]))

    def behind(self, other: UpdateState) -> bool:
        """Whether this state is strictly behind `other` in either sequence."""
        return self.pts < other.pts or self.qts < other.qts


@dataclass
class _Batch:
    pending: set[int]  # id() of the updates not handled yet
    undispatched: set[int]  # id() of the updates that have not reached the handler yet
    state: UpdateState


class HandledLedger:
    """Which applied updates were handled; the state that may be acknowledged."""

    def __init__(self, handled: UpdateState, on_advance: Callable[[UpdateState], None]) -> None:
        self.handled = handled
        self._on_advance = on_advance
        self._batches: deque[_Batch] = deque()
        self._batch_of: dict[int, _Batch] = {}

    def received(self, updates: list[Any], state: UpdateState) -> None:
        """The box applied `updates` (possibly none) and reached `state`."""
        ids = {id(update) for update in updates}
        batch = _Batch(set(ids), set(ids), state)
        self._batches.append(batch)
        for update_id in ids:
            self._batch_of[update_id] = batch
        self._advance()

    def dispatched(self, update: Any) -> None:
        """An update reached the handler: earlier batches' updates that did not, never will."""
        batch = self._batch_of.get(id(update))
        if batch is None:
            return
        batch.undispatched.discard(id(update))
        for earlier in self._batches:
            if earlier is batch:
                break
            for skipped in earlier.undispatched:
                earlier.pending.discard(skipped)
                self._batch_of.pop(skipped, None)
            earlier.undispatched.clear()
        self._advance()

    def finished(self, update: Any) -> None:
        """The handler is done with an update."""
        batch = self._batch_of.pop(id(update), None)
        if batch is None:
            return
        batch.pending.discard(id(update))
        batch.undispatched.discard(id(update))
        self._advance()

    @property
    def in_flight(self) -> int:
        return sum(len(batch.pending) for batch in self._batches)

    def _advance(self) -> None:
        moved = False
        while self._batches and not self._batches[0].pending:
            state = self._batches.popleft().state
            if not state.behind(self.handled):
                self.handled = state
                moved = True
        if moved:
            self._on_advance(self.handled)


class StateWriter:
    """Persists a bot's handled state: at most one write in flight, the newest state afterwards,
    and at most one write per `spacing` seconds. A bot's own sends advance its state too (one
    write per message otherwise); what a spacing leaves unwritten is at worst replayed after a
    crash, which handling tolerates. `flush` writes at once."""

    def __init__(
        self, write: Callable[[UpdateState], Awaitable[None]], *, what: str = "", spacing: float = 0.0
    ) -> None:
        self._write = write
        self._what = what
        self._spacing = spacing
        self._latest: UpdateState | None = None
        self._written: UpdateState | None = None
        self._task: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()

    def submit(self, state: UpdateState) -> None:
        self._latest = state
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._latest is not None and self._latest != self._written:
            state = self._latest
            try:
                await self._write(state)
            except Exception as exc:
                log.warning("bot_update_state_write_failed", bot=self._what, error=type(exc).__name__)
                return
            self._written = state
            if self._spacing > 0 and not self._hurry.is_set():
                # Stay the writer for a while: what arrives meanwhile is written once, afterwards.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), self._spacing)

    async def flush(self) -> None:
        """Write what is pending now (a stop calls this before the session ends)."""
        self._hurry.set()
        try:
            if self._task is not None and not self._task.done():
                with contextlib.suppress(Exception):
                    await self._task
            if self._latest is not None and self._latest != self._written:
                await self._drain()
        finally:
            self._hurry.clear()


class PerPersonOrder:
    """Runs each person's work in arrival order; different people's work runs concurrently."""

    def __init__(self) -> None:
        self._last: dict[int, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def run(self, person: int, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        previous = self._last.get(person)

        async def in_turn() -> None:
            if previous is not None:
                await asyncio.wait({previous})  # its outcome is its own; only the order matters here
            await work()

        task = asyncio.get_running_loop().create_task(in_turn())
        self._last[person] = task
        self.tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self.tasks.discard(finished)
            if self._last.get(person) is finished:
                del self._last[person]

        task.add_done_callback(done)
        return task

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the work in flight, then cancel what is left."""
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=timeout)
            for task in pending:
                task.cancel()

"""Which bots run on this replica: one lease document per bot, so exactly one replica holds a
live Telegram session for it (two live sessions give AUTH_KEY_DUPLICATED).

Every tick renews the leases this replica holds, takes over bots whose lease lapsed, starts their
sessions, and stops the sessions whose lease was lost. A replica considers its lease usable only
until a safety margin before it expires, so it has stopped sending before anyone can take over.

A session starts from the bot's kept handled update state (updates.py) and this class keeps that
state as it advances, so a replica that takes a bot over continues where the last one stopped:
nothing sent meanwhile is lost, and what the last one handled is not handled again (gateway.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

from services.botgateway import metrics
from services.botgateway.store import BotRecord, GatewayStore
from services.botgateway.transport import (
    BotCredentials,
    BotDeactivated,
    FloodWait,
    TokenInvalid,
    Transport,
    TransportError,
    token_bot_id,
)
from services.botgateway.updates import StateWriter, UpdateState
from services.core.clock import Clock
from services.core.logging import get_logger

log = get_logger(__name__)


def instance_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BotSessions:
    def __init__(
        self,
        store: GatewayStore,
        transport: Transport,
        clock: Clock,
        *,
        holder: str,
        lease_ttl: float = 30.0,
        renew_interval: float = 10.0,
        safety_margin: float = 5.0,
        max_bots: int = 0,
        state_write_spacing: float = 0.0,
    ) -> None:
        self.store = store
        self.transport = transport
        self.clock = clock
        self.holder = holder
        self.lease_ttl = timedelta(seconds=lease_ttl)
        self.renew_interval = renew_interval
        self.safety_margin = timedelta(seconds=min(safety_margin, lease_ttl / 3))
        # At most this many sessions on this replica (0: no cap), so bots spread over replicas.
        self.max_bots = max_bots
        self.state_write_spacing = state_write_spacing
        self._usable_until: dict[str, datetime] = {}
        self._retry_after: dict[str, datetime] = {}
        self._last_attempt: dict[str, float] = {}
        # Every registered bot as of the last tick (read on each send without a database round trip).
        self.bots: dict[str, BotRecord] = {}
        self._lock = asyncio.Lock()
        self._writers: dict[str, StateWriter] = {}
        transport.set_state_keeper(self)

    # Keeping the handled update state (the transport's StateKeeper) -------------------------------

    def _writer(self, bot_id: str, telegram_id: int) -> StateWriter:
        writer = self._writers.get(bot_id)
        if writer is None:

            async def write(state: UpdateState) -> None:
                await self.store.save_update_state(bot_id, telegram_id, state)

            writer = self._writers[bot_id] = StateWriter(write, what=bot_id, spacing=self.state_write_spacing)
        return writer

    def advance(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        self._writer(bot_id, telegram_id).submit(state)

    async def keep(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        writer = self._writer(bot_id, telegram_id)
        writer.submit(state)
        await writer.flush()

    def live(self, bot_id: str) -> bool:
        """Whether this replica may send through the bot now."""
        until = self._usable_until.get(bot_id)
        return until is not None and until > self.clock.now() and self.transport.running(bot_id)

    async def ensure_live(self, bot_id: str, min_interval: float = 1.0) -> bool:
        """Live, or made live now: renew a lapsed lease of ours or take over an expired one on demand
        (at most once per `min_interval` per bot), instead of waiting for the next renewal round."""
        if self.live(bot_id):
            return True
        bot = self.bots.get(bot_id)
        if bot is None:
            return False
        now = time.monotonic()
        if now - self._last_attempt.get(bot_id, float("-inf")) < min_interval:
            return False
        self._last_attempt[bot_id] = now

        async def make_live() -> None:
            async with self._lock:
                if not self.live(bot_id):
                    await self._tick_bot(bot)

        await _on_its_own(make_live())
        return self.live(bot_id)

    def live_bots(self) -> list[str]:
        return [bot_id for bot_id in self._usable_until if self.live(bot_id)]

    async def tick(self) -> None:
        await _on_its_own(self._tick())

    async def _tick(self) -> None:
        async with self._lock:
            bots = await self.store.all_bots()
            self.bots = {bot.bot_id: bot for bot in bots}
            known = set(self.bots)
            for bot_id in list(self._usable_until):
                if bot_id not in known:
                    await self._stop(bot_id, release=True)
                    metrics.drop_session(bot_id)
            for bot in bots:
                await self._tick_bot(bot)

    async def _tick_bot(self, bot: BotRecord) -> None:
        now = self.clock.now()
        if (
            self.max_bots
            and bot.bot_id not in self._usable_until
            and not self.transport.running(bot.bot_id)
            and len(self._usable_until) >= self.max_bots
        ):
            metrics.set_session_state(bot.bot_id, "standby")
            return
        expires = await self.store.acquire_lease(bot.bot_id, self.holder, now, self.lease_ttl)
        if expires is None:
            if bot.bot_id in self._usable_until or self.transport.running(bot.bot_id):
                log.warning("bot_lease_lost", bot=bot.bot_id)
                await self._stop(bot.bot_id, release=False)
            metrics.set_session_state(bot.bot_id, "standby")
            return
        if self.transport.running(bot.bot_id):
            self._usable_until[bot.bot_id] = expires - self.safety_margin
            metrics.set_session_state(bot.bot_id, "running")
            return
        retry = self._retry_after.get(bot.bot_id)
        if retry is not None and retry > now:
            await self.store.release_lease(bot.bot_id, self.holder)
            return
        previous = self._writers.pop(bot.bot_id, None)
        if previous is not None:  # a session that ended by itself
            await previous.flush()
        bot = await self.store.get_bot(bot.bot_id) or bot  # the state kept by whoever ran it last
        # The kept state is the account's: used only when the token names that account.
        kept = bot.update_state if bot.state_telegram_id == token_bot_id(bot.token) else None
        try:
            started = await self.transport.start_bot(BotCredentials(bot.bot_id, bot.token, bot.session, kept))
        except FloodWait as wait:
            self._retry_after[bot.bot_id] = now + timedelta(seconds=wait.seconds)
            await self._failed(bot, "flood_wait")
            return
        except TokenInvalid:
            self._retry_after[bot.bot_id] = now + timedelta(minutes=5)
            await self.store.clear_session(bot.bot_id, now)
            await self._failed(bot, "token_invalid")
            return
        except BotDeactivated:
            self._retry_after[bot.bot_id] = now + timedelta(minutes=5)
            await self._failed(bot, "bot_deactivated")
            return
        except (TransportError, OSError, ConnectionError) as exc:
            self._retry_after[bot.bot_id] = now + timedelta(seconds=self.renew_interval)
            await self._failed(bot, type(exc).__name__)
            return
        self._retry_after.pop(bot.bot_id, None)
        identity = started.identity
        # Another replica may have served this bot meanwhile: forget what was cached about its peers.
        self.store.peer_cache.drop_where(bot_id=bot.bot_id)
        if started.session and started.session != bot.session:
            await self.store.save_session(bot.bot_id, started.session, now)
        if identity.username and identity.username.lower() != bot.bot_id:
            log.warning("bot_username_mismatch", bot=bot.bot_id)
        self._usable_until[bot.bot_id] = expires - self.safety_margin
        metrics.set_session_state(bot.bot_id, "running")
        log.info("bot_session_started", bot=bot.bot_id, holder=self.holder)

    async def _failed(self, bot: BotRecord, why: str) -> None:
        log.warning("bot_session_failed", bot=bot.bot_id, reason=why)
        metrics.set_session_state(bot.bot_id, "failed")
        await self.store.release_lease(bot.bot_id, self.holder)

    async def _stop(self, bot_id: str, *, release: bool) -> None:
        self._usable_until.pop(bot_id, None)
        try:
            await self.transport.stop_bot(bot_id)
            writer = self._writers.pop(bot_id, None)
            if writer is not None:
                await writer.flush()  # the state handled so far, before another replica may start
        finally:
            if release:
                await self.store.release_lease(bot_id, self.holder)
        log.info("bot_session_stopped", bot=bot_id, released=release)

    async def stop_bot(self, bot_id: str) -> None:
        async with self._lock:
            self.bots.pop(bot_id, None)
            await self._stop(bot_id, release=True)
            metrics.drop_session(bot_id)

    async def enforce_expiry(self) -> list[str]:
        """Stop every session whose lease this replica can no longer count on (the watchdog: it runs
        even when renewals fail, so the session is closed before another replica may take over)."""
        now = self.clock.now()
        lapsed = [bot_id for bot_id, until in self._usable_until.items() if until <= now]
        for bot_id in lapsed:
            log.warning("bot_lease_lapsed", bot=bot_id)
            await self._stop(bot_id, release=False)
            metrics.set_session_state(bot_id, "standby")
        return lapsed

    async def run(self, watchdog_interval: float = 1.0) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("bot_sessions_tick_failed")
            slept = 0.0
            while slept < self.renew_interval:
                step = min(watchdog_interval, self.renew_interval - slept)
                await asyncio.sleep(step)
                slept += step
                try:
                    await self.enforce_expiry()
                except Exception:
                    log.exception("bot_sessions_watchdog_failed")

    async def close(self) -> None:
        async with self._lock:
            for bot_id in list(self._usable_until):
                await self._stop(bot_id, release=True)
            await self.transport.close()


async def _on_its_own(work: Coroutine[Any, Any, None]) -> None:
    """Run session work (starting, renewing) apart from the request that asked for it (a send that
    takes over a lapsed lease, a bot registered): a session outlives that request, so what it does
    later carries neither the request's deadlines (gRPC's, the database's) nor its request id, and
    a caller giving up does not cut a start in half."""
    await asyncio.shield(asyncio.get_running_loop().create_task(work, context=contextvars.Context()))

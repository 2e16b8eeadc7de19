"""Sending and receiving through the bots: limits, error mapping, scheduled deletions, events."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc

from services.botgateway import metrics, texts
from services.botgateway.conversation import Conversation
from services.botgateway.limiter import FloodPaused, RateLimited, SendLimiter
from services.botgateway.sessions import BotSessions
from services.botgateway.store import GatewayStore
from services.botgateway.transport import (
    BotNotRunning,
    BotStopped,
    FloodWait,
    IncomingEvent,
    OutgoingMessage,
    Peer,
    PeerInvalid,
    Transport,
    TransportError,
    UserBlocked,
    UserDeactivated,
)
from services.core.clock import Clock
from services.core.errors import ServiceError, failed_precondition, not_found, resource_exhausted, unavailable
from services.core.logging import get_logger

log = get_logger(__name__)

MAX_DELETE_AFTER = timedelta(hours=48)
REPLY_BUDGET = 10.0  # how long an answer to a person may wait for the limiter


def bot_unavailable(bot_id: str) -> ServiceError:
    return unavailable("BOT_UNAVAILABLE", f"bot {bot_id} has no live session on this replica", retry_after=1.0)


class Gateway:
    def __init__(
        self,
        store: GatewayStore,
        transport: Transport,
        limiter: SendLimiter,
        sessions: BotSessions,
        conversation: Conversation,
        directory: directory_pb2_grpc.DirectoryServiceAsyncStub,
        clock: Clock,
        *,
        rpc_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.transport = transport
        self.limiter = limiter
        self.sessions = sessions
        self.conversation = conversation
        self.directory = directory
        self.clock = clock
        self.rpc_timeout = rpc_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        transport.set_handler(self.handle_event)

    # Sending ------------------------------------------------------------------------------

    async def send_bot_message(
        self,
        bot_id: str,
        user_id: int,
        text: str,
        *,
        protect_content: bool = False,
        silent: bool = False,
        delete_after: timedelta | None = None,
        budget: float | None = None,
    ) -> int:
        """Send one message; raises ServiceError with the reasons of the contract."""
        if bot_id not in self.sessions.bots and await self.store.get_bot(bot_id) is None:
            raise not_found(f"bot {bot_id}", "BOT_NOT_FOUND")
        if not await self.sessions.ensure_live(bot_id):
            metrics.bot_messages.labels(bot_id, "unavailable").inc()
            raise bot_unavailable(bot_id)
        peer = await self.store.get_peer(bot_id, user_id)
        if peer is not None and peer.stopped:
            metrics.bot_messages.labels(bot_id, "stopped").inc()
            raise failed_precondition("LINK_STOPPED", "the person stopped this bot (/stop)")
        if peer is None or not peer.access_hash:
            metrics.bot_messages.labels(bot_id, "not_connected").inc()
            raise failed_precondition("NOT_CONNECTED", "the person has not started this bot")
        message_id = await self._send(
            bot_id,
            Peer(user_id, peer.access_hash),
            OutgoingMessage(text, protect_content=protect_content, silent=silent),
            budget,
        )
        if delete_after is not None and delete_after.total_seconds() > 0:
            due = self.clock.now() + min(delete_after, MAX_DELETE_AFTER)
            await self.store.schedule_deletion(bot_id, user_id, peer.access_hash, message_id, due)
        return message_id

    async def _send(self, bot_id: str, peer: Peer, message: OutgoingMessage, budget: float | None) -> int:
        try:
            waited = await self.limiter.acquire(bot_id, peer.user_id, budget)
        except FloodPaused as paused:
            metrics.bot_messages.labels(bot_id, "flood_wait").inc()
            raise resource_exhausted(
                "FLOOD_WAIT", "the bot is paused by a Telegram flood wait", paused.retry_after, [(bot_id, "flood wait")]
            ) from None
        except RateLimited as limited:
            metrics.bot_messages.labels(bot_id, "rate_limited").inc()
            limit = self.limiter.chat_rate if limited.scope == "chat" else self.limiter.bot_rate
            raise resource_exhausted(
                "BOT_RATE_LIMITED",
                f"the {limited.scope} send rate is exhausted for the caller's deadline",
                limited.retry_after,
                [(f"{limited.scope}:{bot_id}", f"{limit.per_second:g} messages per second")],
            ) from None
        metrics.limiter_wait.observe(waited)
        if not await self.sessions.ensure_live(bot_id):  # the lease may have lapsed while waiting
            metrics.bot_messages.labels(bot_id, "unavailable").inc()
            raise bot_unavailable(bot_id)
        try:
            message_id = await self.transport.send(bot_id, peer, message)
        except FloodWait as wait:
            self.limiter.pause(bot_id, wait.seconds)
            metrics.flood_waits.labels(bot_id).inc()
            metrics.bot_messages.labels(bot_id, "flood_wait").inc()
            log.warning("bot_flood_wait", bot=bot_id, seconds=wait.seconds)
            raise resource_exhausted(
                "FLOOD_WAIT", "Telegram asked the bot to wait", wait.seconds, [(bot_id, "flood wait")]
            ) from None
        except UserBlocked:
            metrics.bot_messages.labels(bot_id, "blocked").inc()
            self._background(self._set_status(bot_id, peer.user_id, common_pb2.BOT_LINK_STATUS_BLOCKED))
            raise failed_precondition("BLOCKED_BY_USER", "the person blocked this bot") from None
        except UserDeactivated:
            metrics.bot_messages.labels(bot_id, "deactivated").inc()
            raise failed_precondition("USER_DEACTIVATED", "the Telegram account was deleted") from None
        except PeerInvalid:
            metrics.bot_messages.labels(bot_id, "not_connected").inc()
            raise failed_precondition("NOT_CONNECTED", "the bot cannot reach this person") from None
        except BotNotRunning:
            metrics.bot_messages.labels(bot_id, "unavailable").inc()
            raise bot_unavailable(bot_id) from None
        except TransportError as exc:
            metrics.bot_messages.labels(bot_id, "error").inc()
            log.warning("bot_send_failed", bot=bot_id, error=type(exc).__name__)
            raise unavailable("BOT_UNAVAILABLE", "Telegram refused the message", retry_after=1.0) from None
        metrics.bot_messages.labels(bot_id, "sent").inc()
        return message_id

    def _background(self, work: asyncio.Future[None] | asyncio.Task[None] | object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_status(self, bot_id: str, user_id: int, status: common_pb2.BotLinkStatus.ValueType) -> None:
        try:
            await self.directory.SetBotStatus(
                directory_pb2.SetBotStatusRequest(bot_id=bot_id, telegram_user_id=user_id, status=status),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as err:
            log.info("directory_status_failed", bot=bot_id, status=err.code().name)

    # Receiving ----------------------------------------------------------------------------

    async def handle_event(self, event: IncomingEvent) -> list[int]:
        """An event from Telegram: run the conversation, send its replies, return their ids."""
        metrics.bot_updates.labels(event.bot_id, type(event).__name__).inc()
        if isinstance(event, BotStopped):
            await self.conversation.handle(event, "en")
            return []
        sender = event.sender
        peer = await self.store.remember_peer(
            event.bot_id, sender.user_id, sender.access_hash, sender.language_code, self.clock.now()
        )
        language = texts.language_of(sender.language_code or peer.language_code)
        replies = await self.conversation.handle(event, language)
        sent: list[int] = []
        for reply in replies:
            try:
                sent.append(
                    await self._send(event.bot_id, Peer(sender.user_id, sender.access_hash), reply, REPLY_BUDGET)
                )
            except ServiceError as err:
                log.warning("bot_reply_failed", bot=event.bot_id, reason=err.reason)
                break
        return sent

    # Deletions ----------------------------------------------------------------------------

    async def delete_due(self, limit: int = 100) -> int:
        """Delete the due messages of bots live on this replica; returns how many were handled."""
        handled = 0
        hold = timedelta(seconds=60)
        while handled < limit:
            deletion = await self.store.claim_deletion(self.sessions.live_bots(), self.clock.now(), hold)
            if deletion is None:
                break
            handled += 1
            try:
                await self.transport.delete(
                    deletion.bot_id, Peer(deletion.user_id, deletion.access_hash), [deletion.message_id]
                )
            except FloodWait as wait:
                self.limiter.pause(deletion.bot_id, wait.seconds)
                metrics.flood_waits.labels(deletion.bot_id).inc()
                metrics.deletions.labels("retry").inc()
                continue
            except BotNotRunning:
                metrics.deletions.labels("retry").inc()
                continue
            except TransportError as exc:
                if deletion.attempts < 5 and not isinstance(exc, PeerInvalid | UserDeactivated | UserBlocked):
                    metrics.deletions.labels("retry").inc()
                    continue
                log.info("bot_delete_gave_up", bot=deletion.bot_id, error=type(exc).__name__)
                metrics.deletions.labels("failed").inc()
                await self.store.finish_deletion(deletion.id)
                continue
            metrics.deletions.labels("deleted").inc()
            await self.store.finish_deletion(deletion.id)
        return handled

    async def run_deletions(self, interval: float = 1.0) -> None:
        while True:
            try:
                await self.delete_due()
            except Exception:
                log.exception("bot_deletions_failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

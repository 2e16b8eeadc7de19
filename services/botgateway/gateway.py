"""Sending and receiving through the bots: limits, error mapping, scheduled deletions, events.

An incoming update is handled once per bot and incoming message (or qts), whatever happens
around it: a replay after a crash between handling and keeping the update state, a second look
after a handover, a retry. The handled_updates collection records each one: taken before the
conversation runs, its decided replies kept before they are sent, done after. A replay of a done
update does nothing; one left midway sends the replies decided then without deciding again (so a
typed code is submitted once); the replies carry random_ids derived from the update, so a reply
that did reach Telegram before a crash is refused as a duplicate instead of arriving twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from datetime import timedelta
from typing import Any

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc

from services.botgateway import metrics, texts
from services.botgateway.conversation import Conversation
from services.botgateway.limiter import FloodPaused, RateLimited, SendLimiter
from services.botgateway.sends import SendRecord, Sent, send_random_id
from services.botgateway.sessions import BotSessions
from services.botgateway.store import GatewayStore
from services.botgateway.transport import (
    AlreadySent,
    BotDeactivated,
    BotNotRunning,
    BotStopped,
    ChatWriteForbidden,
    DeleteForbidden,
    FloodWait,
    IncomingEvent,
    Keyboard,
    MessageTooLong,
    OutcomeUnknown,
    OutgoingMessage,
    Peer,
    PeerFlood,
    PeerInvalid,
    RecipientIsBot,
    SessionInvalid,
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
# How long one replica holds an incoming update it is handling before another may take it over.
HANDLING_HOLD = timedelta(seconds=60)
# PEER_FLOOD names no duration: the bot pauses this long before sending again.
PEER_FLOOD_PAUSE = 60.0


class UpdateBusy(Exception):
    """Another replica is handling this update right now; try again when its hold runs out."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"handled elsewhere; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


def reply_random_id(bot_id: str, update_key: str, index: int) -> int:
    """The random_id of the index-th reply to an update: the same every time the update is handled."""
    digest = hashlib.sha256(f"otpgate-reply/{bot_id}/{update_key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True) or 1


def reply_doc(reply: OutgoingMessage) -> dict[str, Any]:
    keyboard = reply.keyboard
    return {
        "text": reply.text,
        "protect_content": reply.protect_content,
        "silent": reply.silent,
        "contact_button": keyboard.request_contact_label if keyboard else "",
        "remove_keyboard": bool(keyboard and keyboard.remove),
    }


def reply_from(doc: dict[str, Any]) -> OutgoingMessage:
    keyboard = None
    if doc.get("contact_button") or doc.get("remove_keyboard"):
        keyboard = Keyboard(str(doc.get("contact_button") or ""), bool(doc.get("remove_keyboard")))
    return OutgoingMessage(str(doc["text"]), bool(doc.get("protect_content")), bool(doc.get("silent")), keyboard)


def bot_unavailable(bot_id: str) -> ServiceError:
    return unavailable("BOT_UNAVAILABLE", f"bot {bot_id} has no live session on this replica", retry_after=1.0)


def outcome_unknown(why: str) -> ServiceError:
    """The message may have reached the person: repeat the send with the same request_id and bot."""
    return unavailable("SEND_OUTCOME_UNKNOWN", f"{why}; repeat with the same request_id", retry_after=1.0)


def refused_by_telegram(reason: str, message: str) -> ServiceError:
    """Telegram answered this send with a refusal: it made no message (its random_id check comes first)."""
    error = failed_precondition(reason, message)
    error.metadata["refused_by"] = "telegram"
    return error


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
        self.sends = SendRecord()
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
        request_id: str = "",
    ) -> Sent:
        """Send one message, once per request_id (sends.py); raises ServiceError with the reasons of the
        contract (SEND_OUTCOME_UNKNOWN: it may have been sent, repeat it). A repeat of a send made here
        is answered first, whatever changed since (the person stopped the bot, the lease moved)."""
        random_id = send_random_id(bot_id, request_id) if request_id else 0
        sent = await self.sends.earlier((bot_id, user_id, random_id)) if random_id else None
        if sent is not None:
            metrics.bot_messages.labels(bot_id, "already_sent").inc()
        else:
            message = OutgoingMessage(text, protect_content=protect_content, silent=silent, random_id=random_id)
            sent = await self._send(bot_id, Peer(user_id, await self._reachable(bot_id, user_id)), message, budget)
        if sent.message_id and delete_after is not None and delete_after.total_seconds() > 0:
            due = self.clock.now() + min(delete_after, MAX_DELETE_AFTER)
            try:
                peer = await self.store.get_peer(bot_id, user_id)
                access_hash = peer.access_hash if peer is not None else 0
                await self.store.schedule_deletion(bot_id, user_id, access_hash, sent.message_id, due)
            except Exception:
                # Sent, but its deletion is not kept: the repeat (answered with the same message) keeps it.
                log.warning("bot_deletion_not_scheduled", bot=bot_id, message=sent.message_id)
                raise outcome_unknown("the message was sent but its deletion could not be scheduled") from None
        return sent

    async def _reachable(self, bot_id: str, user_id: int) -> int:
        """The person's access hash for this bot, if this replica can send to them through it now."""
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
        return peer.access_hash

    async def _send(self, bot_id: str, peer: Peer, message: OutgoingMessage, budget: float | None) -> Sent:
        """One message through the limiter and Telegram. A FLOOD_WAIT means Telegram made no message: the
        bot is paused, and a caller whose budget outlasts the wait gets the message sent after it (as
        Telethon's flood_sleep_threshold would, but never past the caller's deadline)."""
        deadline = None if budget is None else self.limiter.now() + budget
        while True:
            await self._slot(bot_id, peer.user_id, self._left(deadline))
            try:
                return await self._to_telegram(bot_id, peer, message)
            except FloodWait as wait:
                self.limiter.pause(bot_id, wait.seconds)
                metrics.flood_waits.labels(bot_id).inc()
                log.warning("bot_flood_wait", bot=bot_id, seconds=wait.seconds)
                left = self._left(deadline)
                if left is not None and wait.seconds > left:
                    metrics.bot_messages.labels(bot_id, "flood_wait").inc()
                    raise resource_exhausted(
                        "FLOOD_WAIT", "Telegram asked the bot to wait", wait.seconds, [(bot_id, "flood wait")]
                    ) from None
                # Waited out by the next slot's acquire, which sees the pause.

    async def _slot(self, bot_id: str, user_id: int, budget: float | None) -> None:
        """A slot of the bot's and the chat's rates within `budget`, on a session still live here."""
        try:
            waited = await self.limiter.acquire(bot_id, user_id, budget)
        except FloodPaused as paused:
            metrics.bot_messages.labels(bot_id, "flood_wait").inc()
            raise resource_exhausted(
                "FLOOD_WAIT",
                "the bot is paused by a Telegram flood wait",
                paused.retry_after,
                [(bot_id, "flood wait")],
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

    async def _to_telegram(self, bot_id: str, peer: Peer, message: OutgoingMessage) -> Sent:
        """One send request to Telegram, its refusals answered as the contract's errors. A FloodWait
        is raised as it is: what it means depends on the caller's deadline (_send)."""
        key = (bot_id, peer.user_id, message.random_id)
        try:
            if message.random_id:
                sent = await self.sends.once(key, lambda: self.transport.send(bot_id, peer, message))
            else:
                sent = Sent(await self.transport.send(bot_id, peer, message))
        except FloodWait:
            raise
        except UserBlocked:
            metrics.bot_messages.labels(bot_id, "blocked").inc()
            self._background(self._set_status(bot_id, peer.user_id, common_pb2.BOT_LINK_STATUS_BLOCKED))
            raise refused_by_telegram("BLOCKED_BY_USER", "the person blocked this bot") from None
        except UserDeactivated:
            metrics.bot_messages.labels(bot_id, "deactivated").inc()
            raise refused_by_telegram("USER_DEACTIVATED", "the Telegram account was deleted") from None
        except PeerInvalid:
            metrics.bot_messages.labels(bot_id, "not_connected").inc()
            raise refused_by_telegram("NOT_CONNECTED", "the bot cannot reach this person") from None
        except RecipientIsBot:
            metrics.bot_messages.labels(bot_id, "recipient_is_bot").inc()
            raise refused_by_telegram("RECIPIENT_IS_BOT", "the recipient is a bot; bots cannot message bots") from None
        except MessageTooLong:
            metrics.bot_messages.labels(bot_id, "too_long").inc()
            raise refused_by_telegram(
                "MESSAGE_TOO_LONG", "Telegram refused the text as too long (4096 UTF-16 units at most)"
            ) from None
        except ChatWriteForbidden:
            metrics.bot_messages.labels(bot_id, "write_forbidden").inc()
            raise refused_by_telegram("CHAT_WRITE_FORBIDDEN", "the bot may not write to this person") from None
        except PeerFlood:
            self.limiter.pause(bot_id, PEER_FLOOD_PAUSE)
            metrics.bot_messages.labels(bot_id, "peer_flood").inc()
            log.warning("bot_peer_flood", bot=bot_id, pause_seconds=PEER_FLOOD_PAUSE)
            raise resource_exhausted(
                "PEER_FLOOD",
                "Telegram limits this bot for sending too much",
                PEER_FLOOD_PAUSE,
                [(bot_id, "peer flood")],
            ) from None
        except BotDeactivated:
            metrics.bot_messages.labels(bot_id, "bot_banned").inc()
            log.error("bot_deactivated_by_telegram", bot=bot_id)
            raise refused_by_telegram("BOT_BANNED", "Telegram deactivated this bot") from None
        except AlreadySent:
            # Another send of this random_id is being made (elsewhere, or before a restart here): it is the message.
            metrics.bot_messages.labels(bot_id, "already_sent").inc()
            return Sent(self.sends.finished(key) or 0, already=True)
        except (BotNotRunning, SessionInvalid):
            metrics.bot_messages.labels(bot_id, "unavailable").inc()
            raise bot_unavailable(bot_id) from None
        except OutcomeUnknown as exc:
            metrics.bot_messages.labels(bot_id, "outcome_unknown").inc()
            log.warning("bot_send_outcome_unknown", bot=bot_id, error=str(exc) or type(exc).__name__)
            raise outcome_unknown("Telegram may or may not have the message") from None
        except TransportError as exc:
            metrics.bot_messages.labels(bot_id, "error").inc()
            log.warning("bot_send_failed", bot=bot_id, error=str(exc) or type(exc).__name__)
            raise unavailable("BOT_UNAVAILABLE", "Telegram refused the message", retry_after=1.0) from None
        metrics.bot_messages.labels(bot_id, "already_sent" if sent.already else "sent").inc()
        return sent

    def _left(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - self.limiter.now())

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
        """An event from Telegram, handled once (see the module docstring); the ids of its replies."""
        claim = await self.store.claim_update(
            event.bot_id, event.key, self.sessions.holder, self.clock.now(), HANDLING_HOLD
        )
        if claim.outcome == "done":
            metrics.updates_replayed.labels(event.bot_id).inc()
            return claim.sent or []
        if claim.outcome == "busy":
            assert claim.busy_until is not None
            raise UpdateBusy(max(1.0, (claim.busy_until - self.clock.now()).total_seconds()))
        metrics.bot_updates.labels(event.bot_id, type(event).__name__).inc()
        if isinstance(event, BotStopped):
            await self.conversation.handle(event, "en")
            await self.store.finish_update(claim.id, [], self.clock.now())
            return []
        sender = event.sender
        peer = await self.store.remember_peer(
            event.bot_id, sender.user_id, sender.access_hash, sender.language_code, self.clock.now()
        )
        if claim.replies is not None:
            replies = [reply_from(doc) for doc in claim.replies]  # decided before a crash or handover
        else:
            language = texts.language_of(sender.language_code or peer.language_code)
            replies = await self.conversation.handle(event, language)
            await self.store.record_replies(claim.id, [reply_doc(reply) for reply in replies])
        # A short update may carry no access hash (and a restarted client's cache none): use the kept one.
        to = Peer(sender.user_id, sender.access_hash or peer.access_hash)
        sent: list[int] = []
        for index, reply in enumerate(replies):
            reply = replace(reply, random_id=reply_random_id(event.bot_id, event.key, index))
            try:
                sent.append((await self._send(event.bot_id, to, reply, REPLY_BUDGET)).message_id)
            except ServiceError as err:
                log.warning("bot_reply_failed", bot=event.bot_id, reason=err.reason)
                if err.code.name in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                    raise  # not done: handled again (resumed) when the update comes back
                break
        await self.store.finish_update(claim.id, [i for i in sent if i], self.clock.now())
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
                permanent = PeerInvalid | UserDeactivated | UserBlocked | DeleteForbidden
                if deletion.attempts < 5 and not isinstance(exc, permanent):
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

    async def run_purge(self, interval: float = 3600.0) -> None:
        """Forget handled updates past their retention (where TTL indexes are not available)."""
        while True:
            try:
                await self.store.purge_handled(self.clock.now())
            except Exception:
                log.exception("bot_handled_purge_failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

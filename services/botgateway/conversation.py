"""The conversation with people, independent of the transport: incoming events -> directory and
verification calls -> the replies the bot should send."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import grpc
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc

from services.botgateway import texts
from services.botgateway.store import GatewayStore
from services.botgateway.transport import (
    BotStopped,
    ContactReceived,
    IncomingEvent,
    Keyboard,
    OutgoingMessage,
    TextReceived,
)
from services.core.clock import Clock
from services.core.errors import parse_rpc_error
from services.core.logging import get_logger

log = get_logger(__name__)

# A typed confirmation code: 4-10 digits, spaces and dashes ignored.
_CODE_RE = re.compile(r"^\d{4,10}$")
_CODE_SEPARATORS = re.compile(r"[\s\-]")
_COMMAND_RE = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@[A-Za-z0-9_]{1,64})?(?:\s+(.*))?$", re.DOTALL)
# Deep-link payloads: up to 64 of A-Z a-z 0-9 _ - (Telegram's rule).
_PAYLOAD_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONFIRM_WORDS = frozenset({"/confirm", "yes", "да"})
FORGET_WINDOW = timedelta(minutes=5)


def typed_code(text: str) -> str | None:
    """The code in a typed text, if the text is one."""
    compact = _CODE_SEPARATORS.sub("", text)
    return compact if _CODE_RE.match(compact) else None


def parse_command(text: str) -> tuple[str, str] | None:
    """("start", "payload") for "/start@bot payload"; None for plain text."""
    match = _COMMAND_RE.match(text.strip())
    if not match:
        return None
    return match.group(1).lower(), (match.group(2) or "").strip()


@dataclass
class Conversation:
    store: GatewayStore
    directory: directory_pb2_grpc.DirectoryServiceAsyncStub
    verification: verification_pb2_grpc.VerificationServiceAsyncStub
    clock: Clock
    timeout: float = 5.0

    async def handle(self, event: IncomingEvent, language: str) -> list[OutgoingMessage]:
        if isinstance(event, BotStopped):
            await self._bot_stopped(event)
            return []
        if isinstance(event, ContactReceived):
            return await self._contact(event, language)
        return await self._text(event, language)

    # Events ------------------------------------------------------------------------------

    async def _bot_stopped(self, event: BotStopped) -> None:
        if event.stopped:
            await self._set_status(event.bot_id, event.user_id, common_pb2.BOT_LINK_STATUS_BLOCKED)
        # Unblocking alone changes nothing: Telegram sends /start when the person restarts the bot.

    async def _text(self, event: TextReceived, language: str) -> list[OutgoingMessage]:
        bot_id, user_id = event.bot_id, event.sender.user_id
        raw = event.text.strip()
        peer = await self.store.get_peer(bot_id, user_id)
        if peer is not None and peer.forget_until is not None:
            if raw.lower() in _CONFIRM_WORDS:
                return await self._forget_confirmed(bot_id, user_id, language)
            await self.store.set_forget_until(bot_id, user_id, None)
            if parse_command(raw) is None:
                return [OutgoingMessage(texts.text("forget_canceled", language))]
        command = parse_command(raw)
        if command is not None:
            name, argument = command
            if name == "start":
                return await self._start(bot_id, user_id, argument, language)
            if name == "stop":
                return await self._stop(bot_id, user_id, language)
            if name == "forget":
                await self.store.set_forget_until(bot_id, user_id, self.clock.now() + FORGET_WINDOW)
                return [OutgoingMessage(texts.text("forget_ask", language))]
            if name == "help":
                return [OutgoingMessage(texts.text("help", language))]
            return [OutgoingMessage(texts.text("not_understood", language))]
        code = typed_code(raw)
        if code is not None:
            return await self._typed_code(bot_id, user_id, code, language)
        return [OutgoingMessage(texts.text("not_understood", language))]

    async def _start(self, bot_id: str, user_id: int, payload: str, language: str) -> list[OutgoingMessage]:
        await self.store.set_stopped(bot_id, user_id, False, self.clock.now())
        if payload:
            # Deep links carry where the person came from; kept out of the logs unless well-formed.
            log.info("bot_deep_link", bot=bot_id, payload=payload if _PAYLOAD_RE.match(payload) else "[invalid]")
        try:
            reply = await self.directory.ConnectKnownUser(
                directory_pb2.ConnectKnownUserRequest(bot_id=bot_id, telegram_user_id=user_id), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            failure = parse_rpc_error(err)
            if failure.code == grpc.StatusCode.NOT_FOUND:
                return [self._ask_contact(language)]
            log.warning("directory_connect_failed", bot=bot_id, status=failure.code.name, reason=failure.reason)
            return [OutgoingMessage(texts.text("try_later", language))]
        phone = reply.subscriber.phone_masked
        return [OutgoingMessage(texts.text("welcome_known", language, phone=phone), keyboard=Keyboard(remove=True))]

    def _ask_contact(self, language: str) -> OutgoingMessage:
        label = texts.text("contact_button", language)
        return OutgoingMessage(texts.text("ask_contact", language), keyboard=Keyboard(request_contact_label=label))

    async def _contact(self, event: ContactReceived, language: str) -> list[OutgoingMessage]:
        bot_id, user_id = event.bot_id, event.sender.user_id
        if event.forwarded or event.contact_user_id != user_id:
            # Refused here already; the directory refuses the same (CONTACT_NOT_OWN) on its own.
            log.info("contact_refused", bot=bot_id, forwarded=event.forwarded, own=event.contact_user_id == user_id)
            return [self._refuse_contact(language)]
        try:
            reply = await self.directory.LinkContact(
                directory_pb2.LinkContactRequest(
                    bot_id=bot_id,
                    telegram_user_id=user_id,
                    contact_user_id=event.contact_user_id,
                    phone=event.phone,
                    forwarded=event.forwarded,
                ),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            failure = parse_rpc_error(err)
            if failure.code == grpc.StatusCode.PERMISSION_DENIED:
                return [self._refuse_contact(language)]
            if failure.code == grpc.StatusCode.INVALID_ARGUMENT:
                return [OutgoingMessage(texts.text("contact_invalid", language))]
            log.warning("directory_link_failed", bot=bot_id, status=failure.code.name, reason=failure.reason)
            return [OutgoingMessage(texts.text("try_later", language))]
        await self.store.set_stopped(bot_id, user_id, False, self.clock.now())
        phone = reply.subscriber.phone_masked
        key = "number_changed" if reply.number_changed else "linked"
        return [OutgoingMessage(texts.text(key, language, phone=phone), keyboard=Keyboard(remove=True))]

    def _refuse_contact(self, language: str) -> OutgoingMessage:
        label = texts.text("contact_button", language)
        return OutgoingMessage(texts.text("contact_not_own", language), keyboard=Keyboard(request_contact_label=label))

    async def _typed_code(self, bot_id: str, user_id: int, code: str, language: str) -> list[OutgoingMessage]:
        try:
            reply = await self.verification.SubmitConfirmationCode(
                verification_pb2.SubmitConfirmationCodeRequest(telegram_user_id=user_id, code=code, bot_id=bot_id),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            failure = parse_rpc_error(err)
            log.warning("confirmation_submit_failed", bot=bot_id, status=failure.code.name, reason=failure.reason)
            return [OutgoingMessage(texts.text("try_later", language))]
        outcome = reply.outcome
        if outcome == verification_pb2.CONFIRMATION_OUTCOME_CONFIRMED:
            message = texts.text("confirmed", language, phone=reply.phone_masked)
        elif outcome == verification_pb2.CONFIRMATION_OUTCOME_WRONG_CODE:
            message = texts.text("wrong_code", language, left=reply.attempts_left)
        elif outcome == verification_pb2.CONFIRMATION_OUTCOME_EXPIRED:
            message = texts.text("code_expired", language)
        elif outcome == verification_pb2.CONFIRMATION_OUTCOME_TOO_MANY_ATTEMPTS:
            message = texts.text("too_many_attempts", language)
        else:
            message = texts.text("no_pending", language)
        return [OutgoingMessage(message)]

    async def _stop(self, bot_id: str, user_id: int, language: str) -> list[OutgoingMessage]:
        await self.store.set_stopped(bot_id, user_id, True, self.clock.now())
        await self._set_status(bot_id, user_id, common_pb2.BOT_LINK_STATUS_STOPPED)
        return [OutgoingMessage(texts.text("stopped", language), keyboard=Keyboard(remove=True))]

    async def _forget_confirmed(self, bot_id: str, user_id: int, language: str) -> list[OutgoingMessage]:
        if not await self.store.take_forget_confirmation(bot_id, user_id, self.clock.now()):
            return [OutgoingMessage(texts.text("forget_canceled", language))]
        try:
            await self.directory.ForgetSubscriber(
                directory_pb2.ForgetSubscriberRequest(telegram_user_id=user_id), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            failure = parse_rpc_error(err)
            if failure.code != grpc.StatusCode.NOT_FOUND:
                log.warning("directory_forget_failed", bot=bot_id, status=failure.code.name, reason=failure.reason)
                return [OutgoingMessage(texts.text("try_later", language))]
        await self.store.forget_user(user_id)
        log.info("subscriber_forgotten", bot=bot_id)
        return [OutgoingMessage(texts.text("forgotten", language), keyboard=Keyboard(remove=True))]

    async def _set_status(self, bot_id: str, user_id: int, status: common_pb2.BotLinkStatus.ValueType) -> None:
        try:
            await self.directory.SetBotStatus(
                directory_pb2.SetBotStatusRequest(bot_id=bot_id, telegram_user_id=user_id, status=status),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as err:
            failure = parse_rpc_error(err)
            if failure.code != grpc.StatusCode.NOT_FOUND:
                log.warning("directory_status_failed", bot=bot_id, status=failure.code.name, reason=failure.reason)

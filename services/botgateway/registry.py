"""The bot registry: shared bots from configuration, clients' own bots registered by token."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from otpgate.common.v1 import common_pb2

from services.botgateway.sessions import BotSessions
from services.botgateway.store import BotAlreadyRegistered, BotRecord, GatewayStore
from services.botgateway.transport import FloodWait, TokenInvalid, Transport, TransportError
from services.core import page_tokens
from services.core.clock import Clock
from services.core.errors import (
    Violations,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    resource_exhausted,
    unavailable,
)
from services.core.logging import get_logger
from services.core.sandbox import sandbox_token

log = get_logger(__name__)

TOKEN_RE = re.compile(r"^\d{1,15}:[A-Za-z0-9_-]{1,128}$")
BOT_ID_RE = re.compile(r"^[a-z][a-z0-9_]{3,63}$")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_bot_tokens(spec: list[str]) -> dict[str, str]:
    """OTPGATE_BOT_TOKENS items "bot_id:<telegram id>:<secret>" -> {bot_id: token}."""
    tokens: dict[str, str] = {}
    for item in spec:
        bot_id, sep, token = item.partition(":")
        if not sep or not BOT_ID_RE.match(bot_id.lower()) or not TOKEN_RE.match(token):
            raise ValueError("each item must look like bot_id:<numeric id>:<secret>")
        tokens[bot_id.lower()] = token
    return tokens


def bot_proto(bot: BotRecord) -> common_pb2.Bot:
    created = Timestamp()
    created.FromDatetime(bot.create_time)
    return common_pb2.Bot(
        id=bot.bot_id,
        username=bot.username,
        shared=bot.shared,
        owner_client_id=bot.owner_client_id,
        create_time=created,
    )


def encode_page_token(last_id: str) -> str:
    return page_tokens.encode(last_id)


def decode_page_token(token: str) -> str:
    try:
        value = page_tokens.decode(token)
    except ValueError:
        raise invalid_argument([("page_token", "not a token this service issued")]) from None
    if not BOT_ID_RE.match(value):
        raise invalid_argument([("page_token", "not a token this service issued")])
    return value


@dataclass
class BotRegistry:
    store: GatewayStore
    transport: Transport
    sessions: BotSessions
    clock: Clock

    async def ensure_config_bots(self, shared_bots: list[str], tokens: dict[str, str], sandbox: bool) -> None:
        """Make every configured shared bot exist (in sandbox mode with the token the simulated
        Telegram gave it, unless one is configured)."""
        now = self.clock.now()
        for raw_id in shared_bots:
            bot_id = raw_id.lower()
            token = tokens.get(bot_id, "") or (sandbox_token(bot_id) if sandbox else "")
            if not token:
                log.error("shared_bot_without_token", bot=bot_id)
                continue
            existing = await self.store.get_bot(bot_id)
            if existing is None:
                with contextlib.suppress(BotAlreadyRegistered):  # another replica inserted it meanwhile
                    await self.store.insert_bot(
                        bot_id=bot_id,
                        username=bot_id,
                        telegram_id=int(token.split(":", 1)[0]),
                        shared=True,
                        owner_client_id="",
                        source="config",
                        token=token,
                        session="",
                        now=now,
                    )
            elif existing.token != token or not existing.shared:
                if existing.token != token:
                    log.info("bot_token_changed", bot=bot_id)
                await self.store.update_config_bot(bot_id, token, now, token_changed=existing.token != token)

    async def register(self, token: str, owner_client_id: str, shared: bool) -> BotRecord:
        problems = Violations()
        problems.check(bool(TOKEN_RE.match(token)), "token", "must be a BotFather token: <numeric id>:<secret>")
        if shared:
            problems.check(not owner_client_id, "owner_client_id", "must be empty for a shared bot")
        else:
            problems.check(
                bool(CLIENT_ID_RE.match(owner_client_id)), "owner_client_id", "required unless shared is true"
            )
        problems.raise_if_any()
        try:
            identity, session, state = await self.transport.check_token(token)
        except TokenInvalid:
            raise invalid_argument([("token", "does not log in to Telegram as a bot")], "BOT_TOKEN_INVALID") from None
        except FloodWait as wait:
            raise resource_exhausted("FLOOD_WAIT", "Telegram asked to wait before logging in", wait.seconds) from None
        except (TransportError, OSError) as exc:
            log.warning("bot_login_failed", error=type(exc).__name__)
            raise unavailable("TELEGRAM_UNAVAILABLE", "could not reach Telegram to check the token", 5.0) from None
        bot_id = identity.username.lower()
        if not BOT_ID_RE.match(bot_id):
            raise invalid_argument([("token", "the bot's username cannot be used as an id")], "BOT_TOKEN_INVALID")
        existing = await self.store.find_bot_by_telegram_id(identity.telegram_id) or await self.store.get_bot(bot_id)
        if existing is not None:
            if existing.owner_client_id == owner_client_id and existing.shared == shared:
                if existing.token == token:
                    return existing  # the same registration again
                # The owner reissued the token at BotFather: keep the bot, switch its credentials.
                # The kept update state stays if it is this account's (the same bot, a reissued token).
                keep = existing.state_telegram_id == identity.telegram_id and existing.update_state is not None
                updated = await self.store.replace_token(
                    existing.bot_id, token, session, None if keep else state, self.clock.now()
                )
                await self.sessions.stop_bot(existing.bot_id)
                await self.sessions.tick()
                log.info("bot_token_replaced", bot=existing.bot_id)
                return updated or existing
            raise already_exists("this bot is already registered", "BOT_ALREADY_REGISTERED")
        try:
            record = await self.store.insert_bot(
                bot_id=bot_id,
                username=identity.username,
                telegram_id=identity.telegram_id,
                shared=shared,
                owner_client_id=owner_client_id,
                source="api",
                token=token,
                session=session,
                now=self.clock.now(),
                update_state=state,
            )
        except BotAlreadyRegistered:
            raise already_exists("this bot is already registered", "BOT_ALREADY_REGISTERED") from None
        log.info("bot_registered", bot=bot_id, shared=shared)
        await self.sessions.tick()  # start it now rather than at the next renewal
        return record

    async def get(self, bot_id: str) -> BotRecord:
        bot = await self.store.get_bot(bot_id.lower()) if bot_id else None
        if bot is None:
            raise not_found(f"bot {bot_id}", "BOT_NOT_FOUND")
        return bot

    async def list_bots(self, owner_client_id: str, page_size: int, page_token: str) -> tuple[list[BotRecord], str]:
        if page_size < 0:
            raise invalid_argument([("page_size", "must not be negative")])
        size = min(page_size or 50, 100)
        after = decode_page_token(page_token) if page_token else ""
        bots = await self.store.list_bots(owner_client_id, after, size + 1)
        more = len(bots) > size
        bots = bots[:size]
        return bots, (encode_page_token(bots[-1].bot_id) if more and bots else "")

    async def remove(self, bot_id: str, owner_client_id: str) -> None:
        bot = await self.store.get_bot(bot_id.lower()) if bot_id else None
        # Someone else's bot looks exactly like an unknown one.
        if bot is None or bot.owner_client_id != owner_client_id:
            raise not_found(f"bot {bot_id}", "BOT_NOT_FOUND")
        if bot.source == "config":
            raise failed_precondition(
                "BOT_FROM_CONFIG", "shared bots from configuration are removed from OTPGATE_SHARED_BOTS"
            )
        await self.store.delete_bot(bot.bot_id)
        await self.sessions.stop_bot(bot.bot_id)
        log.info("bot_removed", bot=bot.bot_id)

"""Telethon with its network cut at the MTProto sender: the client, its request objects, its error
classes, its session and its update pipeline are all Telethon's own; only the socket is replaced by
a responder that answers each TL request with a TL object (or raises Telethon's RPC error)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from telethon import TelegramClient, errors
from telethon.crypto import AuthKey
from telethon.sessions import StringSession
from telethon.tl import functions, types

Responder = Callable[[Any], Any]


class OfflineSender:
    """Stands where telethon.network.MTProtoSender stands."""

    def __init__(self, telegram: FakeTelegramServer) -> None:
        self.telegram = telegram
        self.auth_key = AuthKey(None)
        self._connected = False
        self._disconnected: asyncio.Future[None] | None = None

    async def connect(self, connection: Any) -> bool:
        if self._connected:
            return False
        if not self.auth_key:
            self.auth_key = AuthKey(os.urandom(256))  # what the DH key exchange would produce
        self._connected = True
        self._disconnected = asyncio.get_running_loop().create_future()
        return True

    def is_connected(self) -> bool:
        return self._connected

    def _transport_connected(self) -> bool:
        return self._connected

    async def disconnect(self) -> None:
        self._connected = False
        if self._disconnected and not self._disconnected.done():
            self._disconnected.set_result(None)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        assert self._disconnected is not None
        return asyncio.shield(self._disconnected)

    def _keepalive_ping(self, rnd: int) -> None:
        pass

    def send(self, request: Any, ordered: bool = False) -> Any:
        if isinstance(request, list):  # Telethon sends batches as lists and gets a future per request
            return [self._one(r) for r in request]
        return self._one(request)

    def _one(self, request: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self.telegram.answer(self, request))
        except errors.RPCError as exc:
            future.set_exception(exc)
        return future


class FakeTelegramServer:
    """Answers requests like Telegram would for one bot account."""

    def __init__(self, bot_id: int, username: str, token: str) -> None:
        self.bot = types.User(id=bot_id, is_self=True, bot=True, username=username, access_hash=77, first_name="Bot")
        self.token = token
        self.authorized_keys: set[bytes] = set()
        self.requests: list[Any] = []
        self.on_send: Responder | None = None
        self.next_message_id = 100
        self.login_count = 0

    def answer(self, sender: OfflineSender, request: Any) -> Any:
        self.requests.append(request)
        key = sender.auth_key.key
        if isinstance(request, functions.InvokeWithLayerRequest):
            return types.Config  # not read by the client
        if isinstance(request, functions.users.GetUsersRequest):
            if key not in self.authorized_keys:
                raise errors.AuthKeyUnregisteredError(request=request)
            return [self.bot]
        if isinstance(request, functions.auth.ImportBotAuthorizationRequest):
            if request.bot_auth_token != self.token:
                raise errors.AccessTokenInvalidError(request=request)
            self.login_count += 1
            self.authorized_keys.add(key)
            return types.auth.Authorization(user=self.bot)
        if isinstance(request, functions.updates.GetStateRequest):
            return types.updates.State(pts=1, qts=0, date=datetime.now(UTC), seq=1, unread_count=0)
        if isinstance(request, functions.updates.GetDifferenceRequest):
            return types.updates.DifferenceEmpty(date=datetime.now(UTC), seq=1)
        if isinstance(request, functions.messages.SendMessageRequest):
            if self.on_send is not None:
                return self.on_send(request)
            self.next_message_id += 1
            return types.UpdateShortSentMessage(
                id=self.next_message_id, pts=2, pts_count=1, date=datetime.now(UTC), out=True
            )
        if isinstance(request, functions.messages.DeleteMessagesRequest):
            return types.messages.AffectedMessages(pts=3, pts_count=len(request.id))
        raise errors.RPCError(request, f"UNEXPECTED_{type(request).__name__}", 400)


def client_factory(telegram: FakeTelegramServer) -> Callable[[StringSession, int, str], TelegramClient]:
    """A factory the transport accepts: real TelegramClients whose sender is offline."""

    def make(session: StringSession, api_id: int, api_hash: str) -> TelegramClient:
        client = TelegramClient(session, api_id, api_hash, flood_sleep_threshold=0, catch_up=False)
        sender = OfflineSender(telegram)
        if session.auth_key:
            sender.auth_key = session.auth_key
        client._sender = sender
        return client

    return make

"""The sandbox transport: Telethon's own client, with the simulated Telegram as its Telegram.

`TunnelSender` stands where Telethon's MTProtoSender stands. It serializes each TL request as
MTProtoSender does, sends it over the simulated Telegram's gRPC API (MtprotoService) instead of an
encrypted socket, and reads the TL result (or rpc_error, raised as Telethon's own error class)
back the same way. Updates the simulated Telegram pushes go into Telethon's update queue, as the
network reader puts them there, and the results of the bot's own requests are fed to it as
MTProtoSender does. So in sandbox mode the gateway runs exactly the code it runs against Telegram:
login and session identity, catch-up and getDifference, error mapping, the update pipeline.

Like MTProtoSender it makes an auth key when it has none (or when Telegram no longer knows it),
and reconnects the update stream with retries when the connection drops (then asks Telethon to
catch up), disconnecting for good when they run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from telethon import errors
from telethon.crypto import AuthKey
from telethon.extensions import BinaryReader
from telethon.network import MTProtoSender
from telethon.tl import types

from services.botgateway.telethon_client import KeptSession, TrackedClient
from services.botgateway.updates import UpdateState
from services.core.errors import parse_rpc_error
from services.core.grpc_client import make_channel
from services.core.logging import get_logger

log = get_logger(__name__)
P = telegramsim_pb2
UNKNOWN_KEY = -404  # MTProto's answer to a key the server does not know
T = TypeVar("T")


class LinkDown(ConnectionError):
    """The simulated Telegram cannot be reached."""


class StreamRefused(Exception):
    """The simulated Telegram closed the update stream with an rpc_error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class Link(Protocol):
    """What the sender needs from the simulated Telegram (gRPC here; in-process in tests)."""

    async def ready(self) -> None:
        """Return once the simulated Telegram can be reached (raise LinkDown if it cannot, soon)."""
        ...

    async def create_auth_key(self) -> bytes: ...

    async def invoke(self, key_id: int, session_id: int, query: bytes) -> bytes | tuple[int, str]:
        """The serialized result, or (error_code, error_message)."""
        ...

    def updates(self, key_id: int, session_id: int) -> AsyncIterator[bytes]: ...

    async def close(self, key_id: int, session_id: int) -> None: ...

    async def acknowledge(self, key_id: int, session_id: int, pts: int, qts: int) -> None: ...


class GrpcLink:
    """The simulated Telegram's MtprotoService over one shared channel. Calls wait for the channel
    to be ready (within their deadline), as MTProtoSender waits for its connection: at start-up the
    simulated Telegram may come up a moment after the gateway."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        service = P.DESCRIPTOR.services_by_name["MtprotoService"]
        self.channel = make_channel(address, [service], timeout=timeout)
        self._stub = telegramsim_pb2_grpc.MtprotoServiceStub(self.channel)

    async def ready(self) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), 2.0)
        except TimeoutError:
            raise LinkDown("not reachable") from None

    async def create_auth_key(self) -> bytes:
        try:
            reply = await self._stub.CreateAuthKey(P.CreateAuthKeyRequest(), wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            raise LinkDown(err.code().name) from None
        return bytes(reply.auth_key)

    async def invoke(self, key_id: int, session_id: int, query: bytes) -> bytes | tuple[int, str]:
        try:
            reply = await self._stub.Invoke(
                P.InvokeRequest(auth_key_id=key_id, session_id=session_id, query=query), wait_for_ready=True
            )
        except grpc.aio.AioRpcError as err:
            raise LinkDown(err.code().name) from None
        if reply.WhichOneof("outcome") == "error":
            return reply.error.error_code, reply.error.error_message
        return bytes(reply.result)

    async def updates(self, key_id: int, session_id: int) -> AsyncIterator[bytes]:
        call = self._stub.StreamUpdates(P.StreamUpdatesRequest(auth_key_id=key_id, session_id=session_id), timeout=None)
        try:
            async for item in call:
                yield bytes(item.updates)
        except grpc.aio.AioRpcError as err:
            failure = parse_rpc_error(err)
            if "error_code" in failure.metadata:
                raise StreamRefused(int(failure.metadata["error_code"]), failure.reason) from None
            raise LinkDown(err.code().name) from None
        finally:
            call.cancel()

    async def close(self, key_id: int, session_id: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.CloseSession(P.CloseSessionRequest(auth_key_id=key_id, session_id=session_id))

    async def acknowledge(self, key_id: int, session_id: int, pts: int, qts: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.AcknowledgeUpdates(
                P.AcknowledgeUpdatesRequest(auth_key_id=key_id, session_id=session_id, pts=pts, qts=qts)
            )


class TunnelSender:
    """The MTProto sender of one TelegramClient, over a Link."""

    def __init__(self, client: TrackedClient, link: Link, *, retries: int = 5, delay: float = 1.0) -> None:
        self._client = client
        self._link = link
        self._retries = retries
        self._delay = delay
        self.auth_key: AuthKey = client.session.auth_key or AuthKey(None)
        self._updates_queue: asyncio.Queue[Any] = client._updates_queue
        self.session_id = _new_session_id()
        self._connected = False
        self._streaming = False
        self._stream: asyncio.Task[None] | None = None
        self._future: asyncio.Future[None] | None = None
        self._acks: asyncio.Task[None] | None = None
        self._acked: UpdateState | None = None
        self._ack_wanted: UpdateState | None = None

    # What TelegramClient calls --------------------------------------------------------------------

    async def connect(self, connection: Any) -> bool:
        if self._connected:
            return False
        if not self.auth_key:
            await self._new_key()
        self._connected = True
        self._future = asyncio.get_running_loop().create_future()
        self._stream = _detached(self._receive())
        return True

    def is_connected(self) -> bool:
        return self._connected

    def _transport_connected(self) -> bool:
        return self._connected and self._streaming

    async def disconnect(self) -> None:
        await self._disconnect(None)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            self._future.set_result(None)
        return asyncio.shield(self._future)

    def _keepalive_ping(self, rnd_id: int) -> None:
        """gRPC keeps the connection alive itself."""

    def send(self, request: Any, ordered: bool = False) -> Any:
        if not self._connected:
            raise ConnectionError("Cannot send requests while disconnected")
        if isinstance(request, list):
            return [self._send_one(item) for item in request]
        return self._send_one(request)

    # The wire -------------------------------------------------------------------------------------

    def _send_one(self, request: Any) -> asyncio.Future[Any]:
        query = bytes(request)  # serialized now, as MTProtoSender does
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().create_task(self._invoke(request, query, future))
        return future

    async def _invoke(self, request: Any, query: bytes, future: asyncio.Future[Any]) -> None:
        try:
            outcome = await self._link.invoke(self.auth_key.key_id, self.session_id, query)
            if isinstance(outcome, tuple) and outcome[0] == UNKNOWN_KEY:
                # Telegram forgot the key (MTProto answers -404): make a new one and send again.
                await self._new_key()
                outcome = await self._link.invoke(self.auth_key.key_id, self.session_id, query)
        except (LinkDown, OSError) as exc:
            _settle(future, exception=ConnectionError(f"the simulated Telegram is unreachable ({exc})"))
            return
        if isinstance(outcome, tuple):
            code, message = outcome
            _settle(future, exception=errors.rpc_message_to_error(types.RpcError(code, message), request))
            return
        try:
            with BinaryReader(outcome) as reader:
                result = request.read_result(reader)
        except Exception as exc:
            _settle(future, exception=exc)
            return
        MTProtoSender._store_own_updates(self, result)  # Telethon's own rule for results that are updates
        if not self._streaming and self._connected and self._stream is not None and self._stream.done():
            self._stream = _detached(self._receive())
        _settle(future, result=result)

    async def _new_key(self) -> None:
        try:
            key = await self._link.create_auth_key()
        except LinkDown as exc:
            raise ConnectionError(f"the simulated Telegram is unreachable ({exc})") from None
        self.auth_key.key = key
        await self._client._auth_key_callback(self.auth_key)

    async def _receive(self) -> None:
        """The update stream; when the connection drops, reconnect with retries (then ask Telethon
        to catch up, as MTProtoSender's reconnect does), or disconnect when they run out."""
        lost = False
        failures = 0  # reconnection attempts in a row that could not reach the simulated Telegram
        while self._connected:
            if lost:
                await asyncio.sleep(self._delay)
                try:
                    await self._link.ready()
                except LinkDown:
                    failures += 1
                    if failures > self._retries:
                        log.warning("sandbox_connection_lost", bot=self._client.bot_id, attempts=failures)
                        await self._disconnect(ConnectionError("connection to the simulated Telegram lost"))
                        return
                    continue
                lost, failures = False, 0
                _detached(self._client._handle_auto_reconnect())
            try:
                self._streaming = True
                async for data in self._link.updates(self.auth_key.key_id, self.session_id):
                    with BinaryReader(data) as reader:
                        self._updates_queue.put_nowait(reader.tgread_object())
                return
            except StreamRefused as refused:
                # The key is dead or not logged in: requests will say so; nothing to reconnect to.
                log.info("sandbox_update_stream_refused", bot=self._client.bot_id, error=refused.message)
                return
            except (LinkDown, OSError) as exc:
                lost = True
                log.info("sandbox_update_stream_lost", bot=self._client.bot_id, error=str(exc))
            finally:
                self._streaming = False

    async def _disconnect(self, error: Exception | None) -> None:
        if not self._connected:
            return
        self._connected = False
        stream, self._stream = self._stream, None
        if stream is not None and stream is not asyncio.current_task():
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream
        if self.auth_key:
            await self._link.close(self.auth_key.key_id, self.session_id)
        if self._future is not None and not self._future.done():
            if error is None:
                self._future.set_result(None)
            else:
                self._future.set_exception(error)

    # The sandbox's acknowledgement of handled updates -------------------------------------------------

    def acknowledge(self, state: UpdateState) -> None:
        self._ack_wanted = state
        if self._acks is None or self._acks.done():
            self._acks = _detached(self._send_acks())

    async def _send_acks(self) -> None:
        while self._connected and self._ack_wanted is not None and self._ack_wanted != self._acked:
            state = self._ack_wanted
            await self._link.acknowledge(self.auth_key.key_id, self.session_id, state.pts, state.qts)
            self._acked = state


def _settle(future: asyncio.Future[Any], *, result: Any = None, exception: BaseException | None = None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def _new_session_id() -> int:
    return int.from_bytes(os.urandom(8), "big", signed=True) or 1


def sandbox_client_factory(link: Link, *, retries: int = 5, delay: float = 1.0) -> Any:
    """A ClientFactory for TelethonTransport: TrackedClients whose Telegram is the simulated one
    (their senders try `retries` times, `delay` seconds apart, to reconnect a lost update stream)."""

    def sender(client: TrackedClient) -> TunnelSender:
        return TunnelSender(client, link, retries=retries, delay=delay)

    def make(session: KeptSession, api_id: int, api_hash: str, bot_id: str) -> TrackedClient:
        return TrackedClient(session, api_id, api_hash, bot_id=bot_id, sender_factory=sender)

    return make


def _detached(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task of the session itself, not of the request that happened to start it: it does not
    inherit that request's deadline (gRPC's, the database's) nor its request id."""
    return asyncio.get_running_loop().create_task(work, context=contextvars.Context())

"""Telethon with its network cut at the MTProto sender, facing the simulated Telegram in this process.

Everything on the client's side is Telethon's own: TelegramClient, its TL request objects, its
error classes (raised through telethon.errors.rpc_message_to_error), its session, its message box
and update pipeline. The sender is the gateway's sandbox sender (services/botgateway/sandbox_link.py),
so requests leave as serialized TL and results come back as TL bytes, as on MTProto. On the other
side is the simulated Telegram's MTProto endpoint (services/telegramsim/mtproto.py) over a real
database: per-bot access hashes, pts/qts/seq sequencing, pushes to connected sessions,
getDifference with what was queued while the bot was away (slices, "too long").

A test scripts Telegram's answer to a request type with `wire.script(RequestType, answer)`, where
`answer(request)` returns a TL result, a (code, "ERROR_NAME") rpc_error, or None to let the simulated
Telegram answer; `wire.cut()` drops the network (every call and stream fails until `wire.restore()`);
`wire.lose_answers(RequestType, n)` lets the next n such requests reach Telegram and be carried out,
then loses the connection before their answers arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from telethon.tl import functions
from telethon.tl.tlobject import TLObject

from services.botgateway.sandbox_link import LinkDown, StreamRefused
from services.botgateway.updates import UpdateState
from services.telegramsim.model import RpcError
from services.telegramsim.mtproto import MtprotoEndpoint, parse, serialize

Answer = Callable[[Any], Any]
_WRAPPERS = (functions.InvokeWithLayerRequest, functions.InitConnectionRequest, functions.InvokeWithoutUpdatesRequest)


def unwrapped(request: Any) -> Any:
    while isinstance(request, _WRAPPERS):
        request = request.query
    return request


class LocalWire:
    """A `Link` (sandbox_link.py) straight to the endpoint, recording what the client sent."""

    def __init__(self, endpoint: MtprotoEndpoint) -> None:
        self.endpoint = endpoint
        self.requests: list[Any] = []
        self._scripts: dict[type[TLObject], Answer] = {}
        self._lost: dict[type[TLObject], int] = {}
        self._down = False
        self._cut = asyncio.Event()
        self.refused_ready = 0  # reconnection attempts refused while cut

    def script(self, kind: type[TLObject], answer: Answer | None) -> None:
        if answer is None:
            self._scripts.pop(kind, None)
        else:
            self._scripts[kind] = answer

    def lose_answers(self, kind: type[TLObject], count: int = 1) -> None:
        self._lost[kind] = self._lost.get(kind, 0) + count

    def sent(self, kind: type[TLObject]) -> list[Any]:
        return [r for r in self.requests if isinstance(r, kind)]

    def cut(self) -> None:
        self._down = True
        self._cut.set()

    def restore(self) -> None:
        self._down = False
        self._cut = asyncio.Event()

    async def ready(self) -> None:
        if self._down:
            self.refused_ready += 1
            raise LinkDown("cut")

    async def create_auth_key(self) -> bytes:
        if self._down:
            raise LinkDown("cut")
        return await self.endpoint.create_auth_key()

    async def invoke(self, key_id: int, session_id: int, query: bytes) -> bytes | tuple[int, str]:
        if self._down:
            raise LinkDown("cut")
        request = unwrapped(parse(query))
        self.requests.append(request)
        answer = self._scripts.get(type(request))
        outcome = answer(request) if answer is not None else None
        if isinstance(outcome, tuple):
            return outcome
        if outcome is not None:
            self.endpoint.telegram.sessions.subscribe(key_id, session_id)
            return serialize(outcome)
        try:
            result = await self.endpoint.invoke(key_id, session_id, query)
        except RpcError as error:
            return error.code, error.message
        if self._lost.get(type(request)):
            self._lost[type(request)] -= 1
            raise LinkDown("connection lost before the answer")
        return result

    async def updates(self, key_id: int, session_id: int) -> AsyncIterator[bytes]:
        if self._down:
            raise LinkDown("cut")
        source = self.endpoint.updates(key_id, session_id)
        cut = asyncio.ensure_future(self._cut.wait())
        item: asyncio.Future[bytes] | None = None
        try:
            while True:
                item = asyncio.ensure_future(anext(source))
                await asyncio.wait({item, cut}, return_when=asyncio.FIRST_COMPLETED)
                if cut.done():
                    raise LinkDown("cut")
                try:
                    data = item.result()
                except StopAsyncIteration:
                    return
                except RpcError as error:
                    raise StreamRefused(error.code, error.message) from None
                yield data
        finally:
            cut.cancel()
            if item is not None and not item.done():
                item.cancel()
                await asyncio.wait({item})
            await source.aclose()

    async def close(self, key_id: int, session_id: int) -> None:
        self.endpoint.close(key_id, session_id)

    async def acknowledge(self, key_id: int, session_id: int, pts: int, qts: int) -> None:
        self.endpoint.acknowledge(key_id, pts, qts)


@dataclass
class KeptStates:
    """A StateKeeper that remembers every state it was given, per bot."""

    kept: dict[str, list[UpdateState]] = field(default_factory=dict)

    def advance(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        self.kept.setdefault(bot_id, []).append(state)

    async def keep(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        self.kept.setdefault(bot_id, []).append(state)

    def last(self, bot_id: str) -> UpdateState | None:
        states = self.kept.get(bot_id)
        return states[-1] if states else None

"""Group commit for inserts: what concurrent callers insert into one collection while an insert is
already on its way goes to the server together, as one unordered `insert` command.

One command instead of many saves a round trip and the server's per-command work (parsing, a
transaction, a commit) for every document but the first. An idle collection adds no wait: the
first caller's documents leave at once, and whatever arrives meanwhile leaves with the next one.
A command serves many requests, so it runs under its own time limit, not under the deadline of
whichever request happened to send it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Sequence
from typing import Any

import pymongo
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, WriteConcernError, WriteError

Document = dict[str, Any]
DUPLICATE_KEY = 11000
_Entry = tuple[list[Document], "asyncio.Future[list[bool]]"]  # one caller's documents and answer


class InsertBatcher:
    """Inserts into one collection, batched across concurrent callers. Each caller learns the
    outcome of its own documents only: inserted, or refused by a unique index. Any other failure
    of a document is raised to its caller; a failure of the whole command to every caller in it
    (as a lone insert's would be, the documents may or may not be stored)."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        *,
        max_batch: int = 256,
        in_flight: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self.collection = collection
        self._max_batch = max_batch
        self._timeout = timeout
        self._in_flight_limit = in_flight
        self._in_flight = 0
        self._waiting: deque[_Entry] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def insert(self, docs: Sequence[Document]) -> list[bool]:
        """Insert `docs`; per document True, or False where a unique index already holds its key."""
        if not docs:
            return []
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        entry = (list(docs), future)
        self._waiting.append(entry)
        self._send_more()
        try:
            return await future
        except asyncio.CancelledError:
            # Not sent yet: never will be. Once sent, the documents may be stored, as with any insert.
            for index, waiting in enumerate(self._waiting):
                if waiting is entry:
                    del self._waiting[index]
                    break
            raise

    async def insert_one(self, doc: Document) -> bool:
        return (await self.insert([doc]))[0]

    def _send_more(self) -> None:
        while self._waiting and self._in_flight < self._in_flight_limit:
            batch: list[_Entry] = []
            size = 0
            while self._waiting and (not batch or size + len(self._waiting[0][0]) <= self._max_batch):
                entry = self._waiting.popleft()
                batch.append(entry)
                size += len(entry[0])
            self._in_flight += 1
            # A fresh context: not the sending request's database deadline (services/core/outage.py).
            task = asyncio.create_task(self._send(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Entry]) -> None:
        try:
            with pymongo.timeout(self._timeout):
                failed = await self._insert_many([doc for docs, _ in batch for doc in docs])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _settle(batch, failed)
        finally:
            self._in_flight -= 1
            self._send_more()

    async def _insert_many(self, docs: list[Document]) -> dict[int, dict[str, Any]]:
        """One unordered insert; the documents that failed, by position."""
        try:
            await self.collection.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            concern = exc.details.get("writeConcernErrors") or []
            if concern:
                raise WriteConcernError(concern[0].get("errmsg", ""), concern[0].get("code"), concern[0]) from exc
            return {int(error["index"]): error for error in exc.details.get("writeErrors", [])}
        return {}


def _settle(batch: list[_Entry], failed: dict[int, dict[str, Any]]) -> None:
    offset = 0
    for group, future in batch:
        results: list[bool] = []
        problem: dict[str, Any] | None = None
        for index in range(offset, offset + len(group)):
            error = failed.get(index)
            if error is not None and error.get("code") != DUPLICATE_KEY:
                problem = problem or error
            results.append(error is None)
        offset += len(group)
        if future.done():  # the caller was cancelled meanwhile
            continue
        if problem is not None:
            future.set_exception(WriteError(problem.get("errmsg", "write failed"), problem.get("code"), problem))
        else:
            future.set_result(results)

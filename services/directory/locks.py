"""In-process keyed locks that serialise writes about one person or one number within a replica.

Across replicas, correctness rests on the unique indexes and on conditional single-document
updates (atomic on MongoDB). The dev database (FerretDB 1.x on SQLite) applies an update as a
read followed by a write of the whole document, so two concurrent updates of one document can
both match their condition and one of them is lost. Serialising writes per key inside the
replica closes that gap for a single replica, and spares MongoDB needless conflict retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Hold the locks of all keys, taken in sorted order so two holders never deadlock."""
        ordered = sorted(set(keys))
        for key in ordered:
            self._users[key] = self._users.get(key, 0) + 1
            self._locks.setdefault(key, asyncio.Lock())
        acquired: list[str] = []
        try:
            for key in ordered:
                await self._locks[key].acquire()
                acquired.append(key)
            yield
        finally:
            for key in reversed(acquired):
                self._locks[key].release()
            for key in ordered:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                    del self._locks[key]

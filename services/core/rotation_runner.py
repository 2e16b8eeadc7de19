"""Key rotation over every service's sealed fields and blind indexes: batched, resumable.

Each service declares, in services/<name>/sealed.py,
    SEALED_FIELDS = [SealedField(collection, field), ...]
    BLIND_INDEXES = [BlindIndex(...), ...]          # optional
and `otpgate keys rotate` (services/cli/rotate.py) runs one CollectionRotation per collection.

Sealed values: every value not sealed with the keyring's primary key id is opened (any key id
still in the keyring opens it) and sealed again with the primary, bound to the same document
and field. Until the run finishes, old key ids keep decrypting; after it reports nothing left,
an old key may be removed from OTPGATE_KEYS.

Blind indexes (dual index during migration): a document records which key id made its index
(`key_field`). Lookups match the value's index under every key id in the keyring, so documents
indexed under the old key stay findable while this runner recomputes their index with the
current index key from the sealed source value. A clash on the unique index (two documents for
one value) is settled by `newest_field`: the newer document keeps the value, the older one is
deleted.

Progress is kept in `_key_rotations` (one document per collection, in the service's own
database): the last `_id` done and the counts so far, for the target keys of that run. A run
stopped at any point resumes after the last finished batch; redoing part of a batch is harmless
because values already on the target keys are skipped, and every write is conditioned on the
value it replaces, so a concurrent writer (always on the current keys) is never overwritten.
Documents are walked in `_id` order; `_id`s of one collection must be of one type.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock, SystemClock
from services.core.crypto import CryptoError, Keyring, SealContext
from services.core.logging import get_logger
from services.core.mongo import Document
from services.core.rotation import SealedField

log = get_logger(__name__)

PROGRESS_COLLECTION = "_key_rotations"
DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class BlindIndex:
    """A deterministic keyed index of a sealed value, e.g. the phone's HMAC for lookups."""

    collection: str
    # Field holding the hex index (usually under a unique index).
    field: str
    # Field holding the key id the index was computed with.
    key_field: str
    # Purpose passed to Keyring.blind_index.
    purpose: str
    # Sealed field whose plaintext the index is computed from (same collection).
    source: SealedField
    # On a clash, the document with the larger value of this field keeps the index and the
    # other one is deleted. Empty: clashes are only counted and left for an operator.
    newest_field: str = ""


@dataclass(frozen=True)
class ServiceDeclarations:
    service: str
    sealed_fields: list[SealedField]
    blind_indexes: list[BlindIndex]


def load_declarations(services: Iterable[str]) -> list[ServiceDeclarations]:
    """SEALED_FIELDS / BLIND_INDEXES of each service that has a services/<name>/sealed.py."""
    found: list[ServiceDeclarations] = []
    for service in services:
        try:
            module = importlib.import_module(f"services.{service}.sealed")
        except ModuleNotFoundError as exc:
            if exc.name in (f"services.{service}", f"services.{service}.sealed"):
                continue
            raise
        sealed = list(getattr(module, "SEALED_FIELDS", []))
        indexes = list(getattr(module, "BLIND_INDEXES", []))
        if sealed or indexes:
            found.append(ServiceDeclarations(service, sealed, indexes))
    return found


@dataclass
class RotationCounts:
    scanned: int = 0  # documents looked at
    resealed: int = 0  # values sealed again with the primary key
    reindexed: int = 0  # blind indexes recomputed with the index key
    clashes: int = 0  # blind-index clashes settled (older document deleted) or left (no newest_field)
    concurrent: int = 0  # documents changed by someone else meanwhile (left as they are: already current)
    failed: int = 0  # values that could not be opened (tampered, misplaced or unknown key id)
    batches: int = 0

    def add(self, other: RotationCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class RotationResult:
    service: str
    collection: str
    finished: bool
    resumed: bool
    # This run only, and the whole rotation of this collection to the current keys (all runs).
    run: RotationCounts = field(default_factory=RotationCounts)
    total: RotationCounts = field(default_factory=RotationCounts)
    # After a finished run: values still on other keys (failed ones), by field and key id.
    remaining: dict[str, dict[str, int]] = field(default_factory=dict)


# Called after every batch with the number of documents it covered.
ProgressCallback = Callable[[int], None]


class CollectionRotation:
    """Rotates the sealed fields and blind indexes of one collection."""

    def __init__(
        self,
        database: AsyncDatabase[Document],
        collection: str,
        keyring: Keyring,
        *,
        sealed_fields: Sequence[str] = (),
        blind_indexes: Sequence[BlindIndex] = (),
        service: str = "",
        batch_size: int = DEFAULT_BATCH_SIZE,
        clock: Clock | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be positive")
        self.collection: AsyncCollection[Document] = database[collection]
        self.progress: AsyncCollection[Document] = database[PROGRESS_COLLECTION]
        self.name = collection
        self.service = service
        self.keyring = keyring
        self.sealed_fields = list(dict.fromkeys(sealed_fields))
        self.blind_indexes = list(blind_indexes)
        for index in self.blind_indexes:
            if index.collection != collection or index.source.collection != collection:
                raise ValueError(f"blind index {index.field} does not belong to {collection}")
        self.batch_size = batch_size
        self.clock = clock or SystemClock()

    @property
    def target(self) -> dict[str, str]:
        return {"seal": self.keyring.primary_id, "index": self.keyring.index_key_id}

    @property
    def _progress_id(self) -> str:
        return self.name

    async def count(self) -> int:
        return int(await self.collection.count_documents({}))

    async def resumable_scanned(self) -> int:
        """Documents already done by an unfinished run towards the current keys (0: a fresh scan)."""
        checkpoint = await self.progress.find_one({"_id": self._progress_id})
        if checkpoint and checkpoint.get("target") == self.target and not checkpoint.get("finished_at"):
            return int((checkpoint.get("counts") or {}).get("scanned", 0))
        return 0

    async def run(
        self,
        *,
        restart: bool = False,
        max_batches: int | None = None,
        on_batch: ProgressCallback | None = None,
        dry_run: bool = False,
    ) -> RotationResult:
        """Rotate until done, or until `max_batches` batches (then finished=False; run again to resume)."""
        result = RotationResult(self.service, self.name, finished=False, resumed=False)
        checkpoint = None if (restart or dry_run) else await self.progress.find_one({"_id": self._progress_id})
        last_id: Any = None
        if checkpoint and checkpoint.get("target") == self.target and not checkpoint.get("finished_at"):
            last_id = checkpoint.get("last_id")
            result.resumed = True
            result.total = RotationCounts(**{k: int(v) for k, v in (checkpoint.get("counts") or {}).items()})
            log.info("key_rotation_resumed", collection=self.name, batches_done=result.total.batches)
        elif not dry_run:
            await self._save(None, result.total, started=True)
        while max_batches is None or result.run.batches < max_batches:
            query: Document = {} if last_id is None else {"_id": {"$gt": last_id}}
            batch = [doc async for doc in self.collection.find(query).sort("_id", 1).limit(self.batch_size)]
            if not batch:
                result.finished = True
                break
            counts = RotationCounts(batches=1)
            for doc in batch:
                await self._rotate_document(doc, counts, dry_run)
            last_id = batch[-1]["_id"]
            result.run.add(counts)
            result.total.add(counts)
            if not dry_run:
                await self._save(last_id, result.total)
            if on_batch:
                on_batch(len(batch))
            if len(batch) < self.batch_size:
                result.finished = True
                break
        if result.finished:
            if not dry_run:
                await self._save(last_id, result.total, finished=True)
            result.remaining = await self.census(only_stale=True)
        log.info(
            "key_rotation_stopped" if not result.finished else "key_rotation_finished",
            collection=self.name,
            dry_run=dry_run,
            **{f"run_{k}": v for k, v in asdict(result.run).items()},
        )
        return result

    async def census(self, *, only_stale: bool = False) -> dict[str, dict[str, int]]:
        """How many values of each field are under each key id (only_stale: not the target ones)."""
        found: dict[str, dict[str, int]] = {}
        fields = [*self.sealed_fields, *(index.key_field for index in self.blind_indexes)]
        projection = dict.fromkeys(fields, 1)
        async for doc in self.collection.find({}, projection):
            for name in self.sealed_fields:
                value = doc.get(name)
                if value is None:
                    continue
                try:
                    key_id = self.keyring.key_id_of(bytes(value))
                except CryptoError:
                    key_id = "(unreadable)"
                if not (only_stale and key_id == self.keyring.primary_id):
                    found.setdefault(name, {}).setdefault(key_id, 0)
                    found[name][key_id] += 1
            for index in self.blind_indexes:
                if doc.get(index.field) is None and doc.get(index.source.field) is None:
                    continue
                key_id = str(doc.get(index.key_field) or "(none)")
                if not (only_stale and key_id == self.keyring.index_key_id):
                    found.setdefault(index.field, {}).setdefault(key_id, 0)
                    found[index.field][key_id] += 1
        return found

    async def _save(
        self, last_id: Any, counts: RotationCounts, *, started: bool = False, finished: bool = False
    ) -> None:
        now = self.clock.now()
        update: Document = {"target": self.target, "last_id": last_id, "counts": asdict(counts), "updated_at": now}
        if started:
            update["started_at"] = now
            update["finished_at"] = None
        if finished:
            update["finished_at"] = now
        await self.progress.update_one({"_id": self._progress_id}, {"$set": update}, upsert=True)

    async def _rotate_document(self, doc: Document, counts: RotationCounts, dry_run: bool) -> None:
        counts.scanned += 1
        doc_id = doc["_id"]
        condition: Document = {"_id": doc_id}
        changes: Document = {}
        plaintexts: dict[str, bytes] = {}
        for name in self.sealed_fields:
            value = doc.get(name)
            if value is None:
                continue
            sealed = bytes(value)
            context = SealContext(self.name, str(doc_id), name)
            try:
                if self.keyring.needs_rotation(sealed) or any(i.source.field == name for i in self._stale(doc)):
                    plaintexts[name] = self.keyring.open(sealed, context)
            except CryptoError as exc:
                counts.failed += 1
                log.error(
                    "key_rotation_unreadable", collection=self.name, field=name, doc_id=str(doc_id), error=str(exc)
                )
                continue
            if self.keyring.needs_rotation(sealed):
                changes[name] = self.keyring.seal(plaintexts[name], context)
                condition[name] = value
        index_changes: list[BlindIndex] = []
        for index in self._stale(doc):
            plaintext = plaintexts.get(index.source.field)
            if plaintext is None:
                continue  # its source could not be opened: counted above
            changes[index.field] = self.keyring.blind_index(index.purpose, plaintext.decode())
            changes[index.key_field] = self.keyring.index_key_id
            condition[index.field] = doc.get(index.field)
            index_changes.append(index)
        if not changes:
            return
        resealed = sum(1 for name in self.sealed_fields if name in changes)
        if dry_run:
            counts.resealed += resealed
            counts.reindexed += len(index_changes)
            return
        for _ in range(3):
            try:
                result = await self.collection.update_one(condition, {"$set": changes})
            except DuplicateKeyError:
                if await self._settle_clash(doc, changes, index_changes, counts):
                    continue  # the other document lost: try again
                return  # this document lost (deleted) or the clash is left for an operator
            if result.matched_count:
                counts.resealed += resealed
                counts.reindexed += len(index_changes)
            else:
                counts.concurrent += 1
            return

    def _stale(self, doc: Document) -> list[BlindIndex]:
        return [
            index
            for index in self.blind_indexes
            if doc.get(index.source.field) is not None and doc.get(index.key_field) != self.keyring.index_key_id
        ]

    async def _settle_clash(
        self, doc: Document, changes: Document, indexes: list[BlindIndex], counts: RotationCounts
    ) -> bool:
        """True if the other document was removed (retry), False if this one was or nothing could be done."""
        for index in indexes:
            other = await self.collection.find_one({index.field: changes[index.field], "_id": {"$ne": doc["_id"]}})
            if other is None:
                continue
            counts.clashes += 1
            if not index.newest_field:
                log.error("key_rotation_index_clash", collection=self.name, field=index.field, doc_id=str(doc["_id"]))
                return False
            mine, theirs = doc.get(index.newest_field), other.get(index.newest_field)
            loser = other if _is_newer(mine, theirs) else doc
            await self.collection.delete_one({"_id": loser["_id"], index.field: loser.get(index.field)})
            log.warning(
                "key_rotation_index_clash_settled",
                collection=self.name,
                field=index.field,
                kept=str((doc if loser is other else other)["_id"]),
                deleted=str(loser["_id"]),
            )
            return loser is other
        return True  # the clash vanished meanwhile


def _is_newer(left: Any, right: Any) -> bool:
    if isinstance(left, datetime) and isinstance(right, datetime):
        return left.replace(tzinfo=None) >= right.replace(tzinfo=None)
    if right is None:
        return True
    if left is None:
        return False
    try:
        return bool(left >= right)
    except TypeError:
        return True


def plan_collections(declarations: ServiceDeclarations) -> dict[str, tuple[list[str], list[BlindIndex]]]:
    """Collection -> (sealed fields, blind indexes), in declaration order."""
    plan: dict[str, tuple[list[str], list[BlindIndex]]] = {}
    for sealed in declarations.sealed_fields:
        plan.setdefault(sealed.collection, ([], []))[0].append(sealed.field)
    for index in declarations.blind_indexes:
        fields, indexes = plan.setdefault(index.collection, ([], []))
        indexes.append(index)
        if index.source.field not in fields:
            fields.append(index.source.field)
    return plan

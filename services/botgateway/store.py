"""The gateway's own database: bots (sealed tokens and sessions, handled update state), peers,
leases, scheduled deletions, and the incoming updates handled (so none is handled twice)."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bson.int64 import Int64
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.botgateway.updates import UpdateState
from services.core.clock import as_utc
from services.core.crypto import Keyring, SealContext
from services.core.mongo import Document, ensure_index, purge_before

BOTS = "bots"
PEERS = "peers"
LEASES = "leases"
DELETIONS = "deletions"
HANDLED = "handled_updates"
HANDLED_RETENTION = timedelta(days=7)  # longer than Telegram keeps a difference for a bot


@dataclass(frozen=True)
class BotRecord:
    bot_id: str
    username: str
    telegram_id: int
    shared: bool
    owner_client_id: str
    source: str  # "config" | "api"
    create_time: datetime
    token: str
    session: str
    # The handled update state, and the Telegram account it belongs to (0: none kept).
    update_state: UpdateState | None = None
    state_telegram_id: int = 0


@dataclass(frozen=True)
class PeerRecord:
    bot_id: str
    user_id: int
    access_hash: int
    language_code: str
    stopped: bool
    forget_until: datetime | None


@dataclass(frozen=True)
class Deletion:
    id: str
    bot_id: str
    user_id: int
    access_hash: int
    message_id: int
    attempts: int


class BotAlreadyRegistered(Exception):
    pass


@dataclass(frozen=True)
class Claim:
    """This replica's hold on handling one incoming update (see GatewayStore.claim_update)."""

    id: str
    outcome: str  # "new" | "resumed" (an earlier attempt stopped midway) | "done" | "busy"
    replies: list[Document] | None = None  # decided by an earlier attempt, not all sent
    sent: list[int] | None = None  # the reply ids of a finished one
    busy_until: datetime | None = None


def _peer_id(bot_id: str, user_id: int) -> str:
    return f"{bot_id}:{user_id}"


class PeerCache:
    """Recently used peers in memory. The replica that holds a bot's lease is the one that both receives
    that bot's events and sends through it, so its cache stays in step with the database; entries
    expire after `ttl` seconds to pick up changes made through other bots (e.g. /forget)."""

    def __init__(self, max_entries: int = 200_000, ttl: float = 60.0) -> None:
        self._entries: OrderedDict[str, tuple[float, PeerRecord]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl

    def get(self, key: str) -> PeerRecord | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stamp, peer = entry
        if time.monotonic() - stamp > self._ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return peer

    def put(self, key: str, peer: PeerRecord) -> None:
        self._entries[key] = (time.monotonic(), peer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def drop_where(self, *, bot_id: str | None = None, user_id: int | None = None) -> None:
        for key, (_, peer) in list(self._entries.items()):
            if (bot_id is None or peer.bot_id == bot_id) and (user_id is None or peer.user_id == user_id):
                del self._entries[key]


class GatewayStore:
    def __init__(
        self, database: AsyncDatabase[Document], keyring: Keyring, peer_cache: PeerCache | None = None
    ) -> None:
        self.db = database
        self.keyring = keyring
        self.peer_cache = peer_cache or PeerCache()
        self.bots = database[BOTS]
        self.peers = database[PEERS]
        self.leases = database[LEASES]
        self.deletions = database[DELETIONS]
        self.handled = database[HANDLED]

    async def create_indexes(self) -> None:
        await ensure_index(self.bots, [("telegram_id", 1)], unique=True)
        await ensure_index(self.bots, [("owner_client_id", 1), ("_id", 1)])
        await ensure_index(self.peers, [("user_id", 1)])
        await ensure_index(self.peers, [("bot_id", 1)])
        await ensure_index(self.deletions, [("due_time", 1)])
        await ensure_index(self.deletions, [("bot_id", 1), ("due_time", 1)])
        await ensure_index(self.handled, [("create_time", 1)])

    # Bots ---------------------------------------------------------------------------

    def _bot(self, doc: Document) -> BotRecord:
        bot_id = str(doc["_id"])
        token = doc.get("token_sealed")
        session = doc.get("session_sealed")
        return BotRecord(
            bot_id=bot_id,
            username=str(doc.get("username", bot_id)),
            telegram_id=int(doc.get("telegram_id", 0)),
            shared=bool(doc.get("shared")),
            owner_client_id=str(doc.get("owner_client_id", "")),
            source=str(doc.get("source", "api")),
            create_time=as_utc(doc["create_time"]),
            token=self.keyring.open_str(token, SealContext(BOTS, bot_id, "token_sealed")) if token else "",
            session=self.keyring.open_str(session, SealContext(BOTS, bot_id, "session_sealed")) if session else "",
            update_state=UpdateState.from_doc(state) if (state := doc.get("update_state")) else None,
            state_telegram_id=int((doc.get("update_state") or {}).get("telegram_id", 0)),
        )

    async def insert_bot(
        self,
        *,
        bot_id: str,
        username: str,
        telegram_id: int,
        shared: bool,
        owner_client_id: str,
        source: str,
        token: str,
        session: str,
        now: datetime,
        update_state: UpdateState | None = None,
    ) -> BotRecord:
        doc: Document = {
            "_id": bot_id,
            "username": username,
            "telegram_id": Int64(telegram_id),
            "shared": shared,
            "owner_client_id": owner_client_id,
            "source": source,
            "token_sealed": self.keyring.seal(token, SealContext(BOTS, bot_id, "token_sealed")),
            "create_time": now,
            "update_time": now,
        }
        if session:
            doc["session_sealed"] = self.keyring.seal(session, SealContext(BOTS, bot_id, "session_sealed"))
        if update_state is not None:
            doc["update_state"] = {**update_state.to_doc(), "telegram_id": Int64(telegram_id)}
        try:
            await self.bots.insert_one(doc)
        except DuplicateKeyError:
            raise BotAlreadyRegistered(bot_id) from None
        return self._bot(doc)

    async def update_config_bot(self, bot_id: str, token: str, now: datetime, *, token_changed: bool) -> None:
        """A shared bot from configuration: its token may change between deployments. A new token
        drops the old session (it was logged in with the old token, maybe as another bot); the update
        state stays with the account it belongs to and is used only for that account."""
        update: Document = {
            "$set": {
                "token_sealed": self.keyring.seal(token, SealContext(BOTS, bot_id, "token_sealed")),
                "telegram_id": Int64(int(token.split(":", 1)[0])),
                "shared": True,
                "source": "config",
                "update_time": now,
            }
        }
        if token_changed:
            update["$unset"] = {"session_sealed": ""}
        await self.bots.update_one({"_id": bot_id}, update)

    async def replace_token(
        self, bot_id: str, token: str, session: str, state: UpdateState | None, now: datetime
    ) -> BotRecord | None:
        """A new token for a registered bot (revoked and reissued at BotFather): new session too."""
        fields: Document = {
            "token_sealed": self.keyring.seal(token, SealContext(BOTS, bot_id, "token_sealed")),
            "update_time": now,
        }
        if state is not None:
            fields["update_state"] = {**state.to_doc(), "telegram_id": Int64(int(token.split(":", 1)[0]))}
        update: Document = {"$set": fields}
        if session:
            fields["session_sealed"] = self.keyring.seal(session, SealContext(BOTS, bot_id, "session_sealed"))
        else:
            update["$unset"] = {"session_sealed": ""}
        doc = await self.bots.find_one_and_update({"_id": bot_id}, update, return_document=ReturnDocument.AFTER)
        return self._bot(doc) if doc else None

    async def get_bot(self, bot_id: str) -> BotRecord | None:
        doc = await self.bots.find_one({"_id": bot_id})
        return self._bot(doc) if doc else None

    async def find_bot_by_telegram_id(self, telegram_id: int) -> BotRecord | None:
        doc = await self.bots.find_one({"telegram_id": Int64(telegram_id)})
        return self._bot(doc) if doc else None

    async def all_bots(self) -> list[BotRecord]:
        return [self._bot(doc) async for doc in self.bots.find({}).sort("_id", 1)]

    async def list_bots(self, owner_client_id: str, after: str, limit: int) -> list[BotRecord]:
        owners: list[Any] = [{"shared": True}]
        if owner_client_id:
            owners.append({"owner_client_id": owner_client_id})
        query: Document = {"$or": owners}
        if after:
            query = {"$and": [query, {"_id": {"$gt": after}}]}
        cursor = self.bots.find(query).sort("_id", 1).limit(limit)
        return [self._bot(doc) async for doc in cursor]

    async def save_session(self, bot_id: str, session: str, now: datetime) -> None:
        sealed = self.keyring.seal(session, SealContext(BOTS, bot_id, "session_sealed"))
        await self.bots.update_one({"_id": bot_id}, {"$set": {"session_sealed": sealed, "update_time": now}})

    async def clear_session(self, bot_id: str, now: datetime) -> None:
        await self.bots.update_one({"_id": bot_id}, {"$unset": {"session_sealed": ""}, "$set": {"update_time": now}})

    async def save_update_state(self, bot_id: str, telegram_id: int, state: UpdateState) -> None:
        """The handled update state of the bot's account (written as it advances, coalesced)."""
        await self.bots.update_one(
            {"_id": bot_id}, {"$set": {"update_state": {**state.to_doc(), "telegram_id": Int64(telegram_id)}}}
        )

    async def delete_bot(self, bot_id: str) -> bool:
        result = await self.bots.delete_one({"_id": bot_id})
        await self.peers.delete_many({"bot_id": bot_id})
        self.peer_cache.drop_where(bot_id=bot_id)
        await self.deletions.delete_many({"bot_id": bot_id})
        await self.leases.delete_one({"_id": bot_id})
        await self.handled.delete_many({"bot_id": bot_id})
        return result.deleted_count > 0

    # Peers ----------------------------------------------------------------------------

    def _peer(self, doc: Document) -> PeerRecord:
        until = doc.get("forget_until")
        return PeerRecord(
            bot_id=str(doc["bot_id"]),
            user_id=int(doc["user_id"]),
            access_hash=int(doc.get("access_hash", 0)),
            language_code=str(doc.get("language_code", "")),
            stopped=bool(doc.get("stopped")),
            forget_until=as_utc(until) if until else None,
        )

    async def remember_peer(
        self, bot_id: str, user_id: int, access_hash: int, language_code: str, now: datetime
    ) -> PeerRecord:
        """Record what a person's message tells us: the access hash for this bot and their language."""
        fields: Document = {"bot_id": bot_id, "user_id": Int64(user_id), "update_time": now}
        if access_hash:
            fields["access_hash"] = Int64(access_hash)
        if language_code:
            fields["language_code"] = language_code
        doc = await self.peers.find_one_and_update(
            {"_id": _peer_id(bot_id, user_id)},
            {"$set": fields, "$setOnInsert": {"create_time": now}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None  # upserted
        peer = self._peer(doc)
        self.peer_cache.put(_peer_id(bot_id, user_id), peer)
        return peer

    async def get_peer(self, bot_id: str, user_id: int, *, fresh: bool = False) -> PeerRecord | None:
        key = _peer_id(bot_id, user_id)
        if not fresh:
            cached = self.peer_cache.get(key)
            if cached is not None:
                return cached
        doc = await self.peers.find_one({"_id": key})
        if doc is None:
            self.peer_cache.drop(key)
            return None
        peer = self._peer(doc)
        self.peer_cache.put(key, peer)
        return peer

    async def _refresh(self, key: str, doc: Document | None) -> None:
        if doc is None:
            self.peer_cache.drop(key)
        else:
            self.peer_cache.put(key, self._peer(doc))

    async def set_stopped(self, bot_id: str, user_id: int, stopped: bool, now: datetime) -> None:
        key = _peer_id(bot_id, user_id)
        doc = await self.peers.find_one_and_update(
            {"_id": key},
            {"$set": {"stopped": stopped, "update_time": now, "bot_id": bot_id, "user_id": Int64(user_id)}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        await self._refresh(key, doc)

    async def set_forget_until(self, bot_id: str, user_id: int, until: datetime | None) -> None:
        key = _peer_id(bot_id, user_id)
        doc = await self.peers.find_one_and_update(
            {"_id": key}, {"$set": {"forget_until": until}}, return_document=ReturnDocument.AFTER
        )
        await self._refresh(key, doc)

    async def take_forget_confirmation(self, bot_id: str, user_id: int, now: datetime) -> bool:
        """Atomically consume a pending /forget confirmation that has not expired."""
        key = _peer_id(bot_id, user_id)
        doc = await self.peers.find_one_and_update(
            {"_id": key, "forget_until": {"$gt": now}},
            {"$set": {"forget_until": None}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            await self._refresh(key, doc)
        return doc is not None

    async def forget_user(self, user_id: int) -> int:
        """Erase what the gateway keeps about a person (every bot)."""
        result = await self.peers.delete_many({"user_id": Int64(user_id)})
        self.peer_cache.drop_where(user_id=user_id)
        await self.deletions.delete_many({"user_id": Int64(user_id)})
        return int(result.deleted_count)

    # Leases ---------------------------------------------------------------------------

    async def acquire_lease(self, bot_id: str, holder: str, now: datetime, ttl: timedelta) -> datetime | None:
        """Take or renew the lease on a bot; returns its expiry, or None when another live holder has it."""
        expires = now + ttl
        try:
            doc = await self.leases.find_one_and_update(
                {"_id": bot_id, "$or": [{"holder": holder}, {"expire_time": {"$lte": now}}]},
                {"$set": {"holder": holder, "expire_time": expires, "renew_time": now}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return None
        if doc is None or doc.get("holder") != holder:
            return None
        return expires

    async def release_lease(self, bot_id: str, holder: str) -> None:
        await self.leases.delete_one({"_id": bot_id, "holder": holder})

    async def lease_holder(self, bot_id: str, now: datetime) -> str | None:
        doc = await self.leases.find_one({"_id": bot_id})
        if doc is None or as_utc(doc["expire_time"]) <= now:
            return None
        return str(doc["holder"])

    # Deletions --------------------------------------------------------------------------

    async def schedule_deletion(
        self, bot_id: str, user_id: int, access_hash: int, message_id: int, due: datetime
    ) -> None:
        """Once per message: a repeated send of it (the same request_id) schedules nothing more."""
        with contextlib.suppress(DuplicateKeyError):
            await self.deletions.insert_one(
                {
                    "_id": f"{bot_id}:{message_id}",
                    "bot_id": bot_id,
                    "user_id": Int64(user_id),
                    "access_hash": Int64(access_hash),
                    "message_id": Int64(message_id),
                    "due_time": due,
                    "claim_until": due,
                    "attempts": 0,
                }
            )

    async def claim_deletion(self, bot_ids: list[str], now: datetime, hold: timedelta) -> Deletion | None:
        """Claim one due deletion of a bot this process runs (retried after `hold` if not completed)."""
        if not bot_ids:
            return None
        doc = await self.deletions.find_one_and_update(
            {"bot_id": {"$in": bot_ids}, "due_time": {"$lte": now}, "claim_until": {"$lte": now}},
            {"$set": {"claim_until": now + hold}, "$inc": {"attempts": 1}},
            sort=[("due_time", 1)],
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        return Deletion(
            id=str(doc["_id"]),
            bot_id=str(doc["bot_id"]),
            user_id=int(doc["user_id"]),
            access_hash=int(doc.get("access_hash", 0)),
            message_id=int(doc["message_id"]),
            attempts=int(doc.get("attempts", 1)),
        )

    async def finish_deletion(self, deletion_id: str) -> None:
        await self.deletions.delete_one({"_id": deletion_id})

    async def pending_deletions(self, bot_id: str) -> int:
        return int(await self.deletions.count_documents({"bot_id": bot_id}))

    # Handled updates ------------------------------------------------------------------------

    async def claim_update(self, bot_id: str, key: str, holder: str, now: datetime, hold: timedelta) -> Claim:
        """Take the handling of one incoming update (`key`: its message id or qts). An update handled
        before is "done"; one an earlier attempt left midway (a crash, a lapsed lease) is "resumed"
        once that attempt's hold ran out, with the replies it had decided; one another replica is
        handling now is "busy"."""
        claim_id = f"{bot_id}:{key}"
        until = now + hold
        try:
            await self.handled.insert_one(
                {
                    "_id": claim_id,
                    "bot_id": bot_id,
                    "state": "handling",
                    "holder": holder,
                    "claim_until": until,
                    "create_time": now,
                }
            )
            return Claim(claim_id, "new")
        except DuplicateKeyError:
            pass
        doc = await self.handled.find_one_and_update(
            {"_id": claim_id, "state": {"$ne": "done"}, "$or": [{"holder": holder}, {"claim_until": {"$lte": now}}]},
            {"$set": {"holder": holder, "claim_until": until}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return Claim(claim_id, "resumed", replies=doc.get("replies"))
        doc = await self.handled.find_one({"_id": claim_id})
        if doc is None:  # purged meanwhile: handled long ago
            return Claim(claim_id, "done", sent=[])
        if doc["state"] == "done":
            return Claim(claim_id, "done", sent=[int(i) for i in doc.get("sent", [])])
        return Claim(claim_id, "busy", busy_until=as_utc(doc["claim_until"]))

    async def record_replies(self, claim_id: str, replies: list[Document]) -> None:
        """What the conversation decided, before it is sent: a resumed attempt sends these, never
        deciding again (no second confirmation submission)."""
        await self.handled.update_one({"_id": claim_id}, {"$set": {"state": "replying", "replies": replies}})

    async def finish_update(self, claim_id: str, sent: list[int], now: datetime) -> None:
        await self.handled.update_one(
            {"_id": claim_id},
            {"$set": {"state": "done", "sent": sent, "finish_time": now}, "$unset": {"replies": ""}},
        )

    async def purge_handled(self, now: datetime) -> int:
        return await purge_before(self.handled, "create_time", now - HANDLED_RETENTION)

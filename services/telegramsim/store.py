"""The simulated Telegram's own database: accounts, chats, auth keys and every bot's update log.

The update log is the history: one document per pts entry (a message, with both sides' ids, or
a deletion) and per qts entry (a stop or restart), keyed `<bot>:p<pts>` / `<bot>:q<qts>` so that
getDifference reads a range by `_id`. A bot's counters are not written on every send: they are
what its log says (the highest entry), recovered when the process starts, with a floor kept on
the bot's document for what a reset erased. Texts and phone numbers are sealed (they hold codes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from bson.int64 import Int64
from pymongo.asynchronous.database import AsyncDatabase

from services.core.batching import InsertBatcher
from services.core.clock import as_utc
from services.core.crypto import Keyring, SealContext
from services.core.mongo import Document, ensure_index, put_by_id
from services.telegramsim.model import (
    DELETE,
    MESSAGE,
    STOPPED,
    BotStopped,
    Deletion,
    SimBot,
    SimChat,
    SimMessage,
    SimUser,
)

USERS = "users"
BOTS = "bots"
CHATS = "chats"
UPDATES = "updates"
AUTH_KEYS = "auth_keys"
META = "meta"


def pts_id(bot: int, pts: int) -> str:
    return f"{bot}:p{pts}"


def qts_id(bot: int, qts: int) -> str:
    return f"{bot}:q{qts}"


@dataclass(frozen=True)
class AuthKeyRecord:
    key_id: int
    bot: int  # 0: not logged in
    state: str  # "active" | "revoked" | "duplicated"


@dataclass
class Snapshot:
    """Everything the simulated Telegram keeps in memory, as loaded at start."""

    salt: bytes
    users: dict[int, SimUser]
    bots: dict[str, SimBot]
    chats: dict[tuple[int, int], SimChat]
    auth_keys: dict[int, AuthKeyRecord]
    # Per bot: (person, random_id) -> the bot-side id of the message that random_id sent.
    random_ids: dict[int, dict[tuple[int, int], int]]


class TelegramStore:
    def __init__(self, database: AsyncDatabase[Document], keyring: Keyring) -> None:
        self.db = database
        self.keyring = keyring
        self.users = database[USERS]
        self.bots = database[BOTS]
        self.chats = database[CHATS]
        self.updates = database[UPDATES]
        self.auth_keys = database[AUTH_KEYS]
        self.meta = database[META]
        self._entries = InsertBatcher(self.updates)

    async def create_indexes(self) -> None:
        await ensure_index(self.bots, [("telegram_id", 1)], unique=True)
        await ensure_index(self.updates, [("bot", 1), ("user", 1)])

    # Loading -------------------------------------------------------------------------------

    async def load(self) -> Snapshot:
        salt = await self._salt()
        users = {int(doc["_id"]): self._user(doc) async for doc in self.users.find({})}
        bots = {str(doc["_id"]): self._bot(doc) async for doc in self.bots.find({})}
        by_telegram_id = {bot.telegram_id: bot for bot in bots.values()}
        chats = {
            (int(doc["bot"]), int(doc["user"])): SimChat(
                int(doc["bot"]), int(doc["user"]), bool(doc.get("started")), bool(doc.get("blocked"))
            )
            async for doc in self.chats.find({})
        }
        keys = {
            int(doc["key_id"]): AuthKeyRecord(int(doc["key_id"]), int(doc.get("bot") or 0), str(doc["state"]))
            async for doc in self.auth_keys.find({})
        }
        # One pass over the log (a sandbox's size) gives every counter back, and the random_ids used.
        random_ids: dict[int, dict[tuple[int, int], int]] = {}
        fields = {f: 1 for f in ("bot", "user", "kind", "pts", "qts", "seq", "date", "bot_message_id")}
        fields |= {"user_message_id": 1, "from_bot": 1, "random_id": 1}
        async for doc in self.updates.find({}, fields):
            bot = by_telegram_id.get(int(doc["bot"]))
            if bot is None:
                continue
            bot.pts = max(bot.pts, int(doc.get("pts") or 0))
            bot.qts = max(bot.qts, int(doc.get("qts") or 0))
            bot.seq = max(bot.seq, int(doc.get("seq") or 0))
            date = as_utc(doc["date"])
            bot.date = date if bot.date is None else max(bot.date, date)
            if doc["kind"] != MESSAGE:
                continue
            bot.last_message_id = max(bot.last_message_id, int(doc["bot_message_id"]))
            user_id, user_message_id = int(doc["user"]), int(doc["user_message_id"])
            user = users.get(user_id)
            if user is not None:
                user.last_message_id = max(user.last_message_id, user_message_id)
            chat = chats.get((bot.telegram_id, user_id))
            if chat is None:
                chat = chats[(bot.telegram_id, user_id)] = SimChat(bot.telegram_id, user_id)
            chat.index.append((user_message_id, int(doc["pts"])))
            if doc.get("from_bot"):
                sent = random_ids.setdefault(bot.telegram_id, {})
                sent[(user_id, int(doc["random_id"]))] = int(doc["bot_message_id"])
        for chat in chats.values():
            chat.index.sort()
        return Snapshot(salt, users, bots, chats, keys, random_ids)

    async def _salt(self) -> bytes:
        doc = await self.meta.find_one({"_id": "access_hash_salt"})
        if doc is None:
            await put_by_id(self.meta, "access_hash_salt", {"value": os.urandom(16)})
            doc = await self.meta.find_one({"_id": "access_hash_salt"})
        assert doc is not None
        return bytes(doc["value"])

    # Accounts, chats, keys -------------------------------------------------------------------

    def _user(self, doc: Document) -> SimUser:
        user_id = int(doc["_id"])
        sealed = doc.get("phone_sealed")
        phone = self.keyring.open_str(sealed, SealContext(USERS, str(user_id), "phone_sealed")) if sealed else ""
        return SimUser(user_id, str(doc["first_name"]), str(doc["language_code"]), phone, bool(doc.get("deactivated")))

    async def save_user(self, user: SimUser) -> None:
        fields: Document = {
            "first_name": user.first_name,
            "language_code": user.language_code,
            "deactivated": user.deactivated,
        }
        if user.phone:
            fields["phone_sealed"] = self.keyring.seal(
                user.phone, SealContext(USERS, str(user.user_id), "phone_sealed")
            )
        await self.users.replace_one({"_id": Int64(user.user_id)}, fields, upsert=True)

    def _bot(self, doc: Document) -> SimBot:
        username = str(doc["username"])
        floor = doc.get("floor") or {}
        return SimBot(
            telegram_id=int(doc["telegram_id"]),
            username=username,
            token=self.keyring.open_str(doc["token_sealed"], SealContext(BOTS, str(doc["_id"]), "token_sealed")),
            create_time=as_utc(doc["create_time"]),
            pts=int(floor.get("pts", 0)),
            qts=int(floor.get("qts", 0)),
            seq=int(floor.get("seq", 0)),
            last_message_id=int(floor.get("message_id", 0)),
            floor_pts=int(floor.get("pts", 0)),
            floor_qts=int(floor.get("qts", 0)),
        )

    async def save_bot(self, bot: SimBot) -> None:
        await self.bots.replace_one(
            {"_id": bot.bot_id},
            {
                "telegram_id": Int64(bot.telegram_id),
                "username": bot.username,
                "token_sealed": self.keyring.seal(bot.token, SealContext(BOTS, bot.bot_id, "token_sealed")),
                "create_time": bot.create_time,
                "floor": {
                    "pts": bot.floor_pts,
                    "qts": bot.floor_qts,
                    "seq": bot.seq,
                    "message_id": bot.last_message_id,
                },
            },
            upsert=True,
        )

    async def save_chat(self, chat: SimChat) -> None:
        await put_by_id(
            self.chats,
            f"{chat.bot}:{chat.user_id}",
            {"bot": Int64(chat.bot), "user": Int64(chat.user_id), "started": chat.started, "blocked": chat.blocked},
        )

    async def save_auth_key(self, key: AuthKeyRecord) -> None:
        await put_by_id(
            self.auth_keys, str(key.key_id), {"key_id": str(key.key_id), "bot": Int64(key.bot), "state": key.state}
        )

    # The update log ----------------------------------------------------------------------------

    def _message_doc(self, message: SimMessage) -> Document:
        doc_id = pts_id(message.bot, message.pts)
        doc: Document = {
            "_id": doc_id,
            "kind": MESSAGE,
            "bot": Int64(message.bot),
            "user": Int64(message.user_id),
            "pts": message.pts,
            "date": message.date,
            "from_bot": message.from_bot,
            "bot_message_id": message.bot_message_id,
            "user_message_id": message.user_message_id,
            "random_id": Int64(message.random_id),
            "protect_content": message.protect_content,
            "silent": message.silent,
            "request_contact": message.request_contact,
            "remove_keyboard": message.remove_keyboard,
            "deleted": message.deleted,
            "contact_user_id": Int64(message.contact_user_id),
            "forwarded": message.forwarded,
            "session_id": Int64(message.session_id),
            "accepted_at": message.accepted_at,
        }
        if message.text:
            doc["text_sealed"] = self.keyring.seal(message.text, SealContext(UPDATES, doc_id, "text_sealed"))
        if message.contact_phone:
            doc["contact_sealed"] = self.keyring.seal(
                message.contact_phone, SealContext(UPDATES, doc_id, "contact_sealed")
            )
        return doc

    def _message(self, doc: Document) -> SimMessage:
        doc_id = str(doc["_id"])
        text = doc.get("text_sealed")
        contact = doc.get("contact_sealed")
        return SimMessage(
            bot=int(doc["bot"]),
            user_id=int(doc["user"]),
            from_bot=bool(doc["from_bot"]),
            text=self.keyring.open_str(text, SealContext(UPDATES, doc_id, "text_sealed")) if text else "",
            date=as_utc(doc["date"]),
            bot_message_id=int(doc["bot_message_id"]),
            user_message_id=int(doc["user_message_id"]),
            pts=int(doc["pts"]),
            random_id=int(doc["random_id"]),
            protect_content=bool(doc.get("protect_content")),
            silent=bool(doc.get("silent")),
            request_contact=bool(doc.get("request_contact")),
            remove_keyboard=bool(doc.get("remove_keyboard")),
            deleted=bool(doc.get("deleted")),
            contact_phone=(
                self.keyring.open_str(contact, SealContext(UPDATES, doc_id, "contact_sealed")) if contact else ""
            ),
            contact_user_id=int(doc.get("contact_user_id") or 0),
            forwarded=bool(doc.get("forwarded")),
            session_id=int(doc.get("session_id") or 0),
            accepted_at=float(doc.get("accepted_at") or 0.0),
        )

    async def add_message(self, message: SimMessage, seq: int) -> None:
        doc = self._message_doc(message)
        doc["seq"] = seq
        await self._entries.insert_one(doc)

    async def add_deletion(self, bot: int, deletion: Deletion) -> None:
        await self._entries.insert_one(
            {
                "_id": pts_id(bot, deletion.pts),
                "kind": DELETE,
                "bot": Int64(bot),
                "pts": deletion.pts,
                "pts_count": deletion.pts_count,
                "message_ids": list(deletion.bot_message_ids),
                "date": deletion.date,
            }
        )

    async def add_stop(self, bot: int, stop: BotStopped, seq: int) -> None:
        await self._entries.insert_one(
            {
                "_id": qts_id(bot, stop.qts),
                "kind": STOPPED,
                "bot": Int64(bot),
                "user": Int64(stop.user_id),
                "qts": stop.qts,
                "stopped": stop.stopped,
                "date": stop.date,
                "seq": seq,
            }
        )

    async def mark_deleted(self, message: SimMessage) -> None:
        await self.updates.update_one(
            {"_id": pts_id(message.bot, message.pts)},
            {"$set": {"deleted": True}, "$unset": {"text_sealed": "", "contact_sealed": ""}},
        )

    async def pts_entries(self, bot: int, first: int, last: int) -> tuple[list[SimMessage], list[Deletion]]:
        """The log's pts entries first..last (by `_id`), oldest first."""
        ids = [pts_id(bot, pts) for pts in range(first, last + 1)]
        messages: list[SimMessage] = []
        deletions: list[Deletion] = []
        for chunk in _chunks(ids, 500):
            async for doc in self.updates.find({"_id": {"$in": chunk}}):
                if doc["kind"] == MESSAGE:
                    messages.append(self._message(doc))
                else:
                    deletions.append(
                        Deletion(
                            int(doc["pts"]),
                            int(doc["pts_count"]),
                            tuple(int(i) for i in doc["message_ids"]),
                            as_utc(doc["date"]),
                        )
                    )
        messages.sort(key=lambda m: m.pts)
        deletions.sort(key=lambda d: d.pts)
        return messages, deletions

    async def stops(self, bot: int, first: int, last: int) -> list[BotStopped]:
        ids = [qts_id(bot, qts) for qts in range(first, last + 1)]
        found: list[BotStopped] = []
        for chunk in _chunks(ids, 500):
            async for doc in self.updates.find({"_id": {"$in": chunk}}):
                found.append(BotStopped(int(doc["qts"]), int(doc["user"]), bool(doc["stopped"]), as_utc(doc["date"])))
        return sorted(found, key=lambda s: s.qts)

    async def messages(self, bot: int, pts_list: list[int]) -> list[SimMessage]:
        """The messages of a bot's log at these pts (by `_id`)."""
        found: list[SimMessage] = []
        for chunk in _chunks([pts_id(bot, pts) for pts in pts_list], 500):
            found += [self._message(doc) async for doc in self.updates.find({"_id": {"$in": chunk}})]
        return found

    async def bot_message(self, bot: int, bot_message_id: int) -> SimMessage | None:
        doc = await self.updates.find_one({"bot": Int64(bot), "kind": MESSAGE, "bot_message_id": bot_message_id})
        return self._message(doc) if doc is not None else None

    async def reset(self, bots: Iterable[SimBot]) -> tuple[int, int]:
        """Erase people, chats and history; the bots keep their counters as the new floor."""
        for bot in bots:
            bot.floor_pts, bot.floor_qts = bot.pts, bot.qts
            await self.save_bot(bot)
        users = await self.users.delete_many({})
        messages = await self.updates.count_documents({"kind": MESSAGE})
        await self.updates.delete_many({})
        await self.chats.delete_many({})
        return int(users.deleted_count), int(messages)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

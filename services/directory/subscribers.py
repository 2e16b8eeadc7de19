"""Directory domain: linking numbers to Telegram users, per-bot link state, confirmation, erasure.

Rules:
- only a person's own, non-forwarded contact links a number (checked by the caller of link_contact);
- a person holds one number: sharing another replaces it and resets the confirmation;
- a number belongs to one person: when another account shares it, the newest owner wins and the
  previous owner's record is erased (it held nothing but that number and its bot links);
- a person known through any bot is recognised on any other bot by Telegram user id.

Uniqueness is enforced by the unique indexes on phone_index and telegram_user_id; every write is
conditioned on what was read, and a concurrent change makes the whole step start again.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import grpc

from services.core.clock import Clock
from services.core.crypto import CryptoError, Keyring, SealContext
from services.core.errors import ServiceError, aborted, failed_precondition, not_found
from services.core.ids import new_id
from services.core.logging import get_logger
from services.core.phone import Phone, mask_phone
from services.directory import metrics
from services.directory.sealed import SUBSCRIBERS
from services.directory.store import SubscriberRecord, SubscriberStore, UniqueViolation, link_path

log = get_logger(__name__)

INDEX_PURPOSE = "phone"
PHONE_FIELD = "phone"


class LinkStatus(StrEnum):
    CONNECTED = "CONNECTED"
    BLOCKED = "BLOCKED"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class LinkOutcome:
    subscriber: SubscriberRecord
    number_changed: bool
    number_moved: bool
    # A new record (the person was not known before).
    created: bool = False

    @property
    def outcome(self) -> str:
        if self.number_moved:
            return "number_moved"
        if self.number_changed:
            return "number_changed"
        return "linked" if self.created else "relinked"


@dataclass(frozen=True)
class Resolution:
    subscriber: SubscriberRecord
    connected_bot_ids: list[str]
    shared_bot_ids: list[str]
    blocked_bot_ids: list[str]


def subscriber_not_found() -> ServiceError:
    return not_found("subscriber", reason="SUBSCRIBER_NOT_FOUND")


class Directory:
    def __init__(
        self,
        store: SubscriberStore,
        keyring: Keyring,
        clock: Clock,
        shared_bots: Sequence[str],
        *,
        max_attempts: int = 25,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.clock = clock
        self.shared_bots = list(shared_bots)
        self.max_attempts = max_attempts

    # Keys ----------------------------------------------------------------------

    def phone_indexes(self, e164: str) -> list[str]:
        """The number's blind index under the current index key first, then under every other key
        (dual index during an index-key rotation)."""
        return self.keyring.blind_indexes(INDEX_PURPOSE, e164)

    def seal_phone(self, subscriber_id: str, e164: str) -> bytes:
        return self.keyring.seal(e164, SealContext(SUBSCRIBERS, subscriber_id, PHONE_FIELD))

    def open_phone(self, record: SubscriberRecord) -> str:
        return self.keyring.open_str(record.phone_sealed, SealContext(SUBSCRIBERS, record.id, PHONE_FIELD))

    def masked_phone(self, record: SubscriberRecord) -> str:
        try:
            return mask_phone(self.open_phone(record))
        except CryptoError:
            log.error("sealed_phone_unreadable", subscriber_id=record.id)
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS, "SEALED_VALUE_UNREADABLE", "the subscriber's number cannot be read"
            ) from None

    # Linking -------------------------------------------------------------------

    def _link_update(self, bot_id: str, status: LinkStatus, now: datetime) -> dict[str, dict[str, object]]:
        path = link_path(bot_id)
        return {
            "$set": {f"{path}.status": status.value, f"{path}.updated_at": now, "updated_at": now},
            # $min on an absent field sets it: the link's creation time is kept once written.
            "$min": {f"{path}.created_at": now},
        }

    async def _backoff(self, attempt: int) -> None:
        """Exponential backoff with full jitter: writers racing for one person's record spread
        out, so each round has fewer of them (a linear one kept dozens colliding to the end)."""
        metrics.link_retries.inc()
        if attempt > 1:
            await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))

    async def link_contact(self, bot_id: str, telegram_user_id: int, phone: Phone) -> LinkOutcome:
        """Link `phone` to the person and connect them to `bot_id`. The contact was checked to be theirs."""
        indexes = self.phone_indexes(phone.e164)
        current_index, index_key = indexes[0], self.keyring.index_key_id
        moved = False
        for attempt in range(self.max_attempts):
            if attempt:
                await self._backoff(attempt)
            now = self.clock.now()
            mine = await self.store.by_user(telegram_user_id)
            holder = await self.store.by_phone(indexes)
            if holder is not None and holder.telegram_user_id != telegram_user_id:
                # The number moves to the newest owner; the previous owner's record goes with it.
                if not await self.store.delete_if_unchanged(holder):
                    continue
                moved = True
                log.info("number_moved", from_subscriber_id=holder.id, bot_id=bot_id, phone=phone.masked)
            if mine is None:
                subscriber_id = new_id()
                doc = {
                    "_id": subscriber_id,
                    "telegram_user_id": telegram_user_id,
                    "phone": self.seal_phone(subscriber_id, phone.e164),
                    "phone_index": current_index,
                    "phone_index_key": index_key,
                    "region": phone.region,
                    "links": {bot_id: {"status": LinkStatus.CONNECTED.value, "created_at": now, "updated_at": now}},
                    "linked_at": now,
                    "confirmed_at": None,
                    "created_at": now,
                    "updated_at": now,
                }
                try:
                    record = await self.store.insert(doc)
                except UniqueViolation:
                    continue
                log.info("subscriber_linked", subscriber_id=subscriber_id, bot_id=bot_id, phone=phone.masked)
                return LinkOutcome(record, number_changed=False, number_moved=moved, created=True)
            update = self._link_update(bot_id, LinkStatus.CONNECTED, now)
            changed = mine.phone_index not in indexes
            if changed:
                update["$set"].update(
                    {
                        "phone": self.seal_phone(mine.id, phone.e164),
                        "phone_index": current_index,
                        "phone_index_key": index_key,
                        "region": phone.region,
                        "linked_at": now,
                        "confirmed_at": None,
                    }
                )
            elif mine.phone_index != current_index or self.keyring.needs_rotation(mine.phone_sealed):
                # Same number under an older key: bring it to the current keys while we are here.
                update["$set"].update(
                    {
                        "phone": self.seal_phone(mine.id, phone.e164),
                        "phone_index": current_index,
                        "phone_index_key": index_key,
                    }
                )
            try:
                updated = await self.store.update_if_unchanged(mine, update)
            except UniqueViolation:
                continue
            if updated is None:
                continue
            if changed:
                log.info("subscriber_number_changed", subscriber_id=updated.id, bot_id=bot_id, phone=phone.masked)
            return LinkOutcome(updated, number_changed=changed, number_moved=moved)
        log.warning("link_contact_contended", bot_id=bot_id, attempts=self.max_attempts)
        raise aborted("the person or number changed concurrently; retry", reason="CONCURRENT_UPDATE")

    async def connect_known_user(self, bot_id: str, telegram_user_id: int) -> SubscriberRecord:
        record = await self.store.update_by_user(
            telegram_user_id, self._link_update(bot_id, LinkStatus.CONNECTED, self.clock.now())
        )
        if record is None:
            metrics.connects.labels("unknown").inc()
            raise subscriber_not_found()
        metrics.connects.labels("connected").inc()
        log.info("subscriber_connected", subscriber_id=record.id, bot_id=bot_id)
        return record

    async def set_bot_status(self, bot_id: str, telegram_user_id: int, status: LinkStatus) -> SubscriberRecord:
        record = await self.store.update_by_user(telegram_user_id, self._link_update(bot_id, status, self.clock.now()))
        if record is None:
            raise subscriber_not_found()
        metrics.bot_status.labels(status.value.lower()).inc()
        log.info("bot_status_set", subscriber_id=record.id, bot_id=bot_id, status=status.value)
        return record

    # Reading -------------------------------------------------------------------

    async def get_by_user(self, telegram_user_id: int) -> SubscriberRecord:
        record = await self.store.by_user(telegram_user_id)
        if record is None:
            raise subscriber_not_found()
        return record

    async def get_by_phone(self, e164: str) -> SubscriberRecord:
        record = await self.store.by_phone(self.phone_indexes(e164))
        if record is None:
            raise subscriber_not_found()
        return record

    async def resolve(self, e164: str, preferred_bot_id: str = "") -> Resolution | None:
        record = await self.store.by_phone(self.phone_indexes(e164))
        if record is None:
            metrics.resolves.labels("not_found").inc()
            return None
        metrics.resolves.labels("found").inc()
        return self.resolution(record, preferred_bot_id)

    def resolution(self, record: SubscriberRecord, preferred_bot_id: str = "") -> Resolution:
        """Connected bots: the preferred one first, then the most recently (re)connected.
        Shared bots: those of the shared pool among them, in the same order."""
        connected = sorted(
            (bot for bot, link in record.links.items() if link.status == LinkStatus.CONNECTED),
            key=lambda bot: (bot != preferred_bot_id, -record.links[bot].updated_at.timestamp(), bot),
        )
        pool = set(self.shared_bots)
        blocked = sorted(bot for bot, link in record.links.items() if link.status == LinkStatus.BLOCKED)
        return Resolution(
            subscriber=record,
            connected_bot_ids=connected,
            shared_bot_ids=[bot for bot in connected if bot in pool],
            blocked_bot_ids=blocked,
        )

    # Confirmation and erasure --------------------------------------------------------

    async def mark_confirmed(self, telegram_user_id: int, e164: str) -> datetime:
        now = self.clock.now()
        record = await self.store.update_by_user_and_phone(
            telegram_user_id, self.phone_indexes(e164), {"$set": {"confirmed_at": now, "updated_at": now}}
        )
        if record is None:
            if await self.store.by_user(telegram_user_id) is None:
                metrics.confirmations.labels("unknown").inc()
                raise subscriber_not_found()
            metrics.confirmations.labels("not_linked").inc()
            raise failed_precondition(
                "PHONE_NOT_LINKED",
                "the number is not the one currently linked to this Telegram user",
                [("PHONE_NOT_LINKED", "phone", "not the subscriber's current number")],
            )
        metrics.confirmations.labels("confirmed").inc()
        log.info("subscriber_confirmed", subscriber_id=record.id)
        return now

    async def forget_user(self, telegram_user_id: int) -> bool:
        erased = await self.store.delete_by_user(telegram_user_id) > 0
        metrics.erasures.labels("erased" if erased else "absent").inc()
        log.info("subscriber_forgotten", by="telegram_user_id", erased=erased)
        return erased

    async def forget_phone(self, e164: str) -> bool:
        erased = await self.store.delete_by_phone(self.phone_indexes(e164)) > 0
        metrics.erasures.labels("erased" if erased else "absent").inc()
        log.info("subscriber_forgotten", by="phone", erased=erased)
        return erased

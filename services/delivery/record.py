"""A message of the outbox as the code sees it: `MessageRecord`, read from and written to its document.

One document per accepted message in `messages`, `_id` = the message id (time-ordered). The
document's keys are the record's fields, except `_id` (-> `id`) and the two sealed ones:
`phone` (-> `phone_sealed`, SealContext("messages", _id, "phone")), `text` (-> `text_sealed`,
SealContext("messages", _id, "text")) and, for a code, `code` (-> `code_sealed`, SealContext
("messages", _id, "code")); all become None when the text is purged. The fields
below the line "set once sent" are absent from the document until a leg writes them.

A record is immutable: a dispatch attempt describes what it changes as `MessageChanges` (the
`$set` of one write under the message's claim, see store.py) and carries on with
`record.updated(changes)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from google.protobuf import duration_pb2, timestamp_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2

from services.core.clock import as_utc
from services.core.mongo import Document

AUTO, TELEGRAM, SMS = common_pb2.CHANNEL_AUTO, common_pb2.CHANNEL_TELEGRAM, common_pb2.CHANNEL_SMS
GATEWAY = common_pb2.CHANNEL_TELEGRAM_GATEWAY
P_MESSAGE = delivery_pb2.MESSAGE_PURPOSE_MESSAGE
P_CONFIRMATION = delivery_pb2.MESSAGE_PURPOSE_CONFIRMATION  # the bot prompt of a re-confirmation: ours
P_VERIFICATION = delivery_pb2.MESSAGE_PURPOSE_VERIFICATION

QUEUED = common_pb2.MESSAGE_STATUS_QUEUED
HELD = common_pb2.MESSAGE_STATUS_HELD
SENT = common_pb2.MESSAGE_STATUS_SENT
DELIVERED = common_pb2.MESSAGE_STATUS_DELIVERED
FAILED = common_pb2.MESSAGE_STATUS_FAILED
EXPIRED = common_pb2.MESSAGE_STATUS_EXPIRED
CANCELED = common_pb2.MESSAGE_STATUS_CANCELED
READ = common_pb2.MESSAGE_STATUS_READ
OPEN_STATUSES = (QUEUED, HELD)
FINAL_STATUSES = (DELIVERED, READ, FAILED, EXPIRED, CANCELED)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

STATUS_NAMES: dict[int, str] = {
    v: common_pb2.MessageStatus.Name(v).removeprefix("MESSAGE_STATUS_") for v in common_pb2.MessageStatus.values()
}
CHANNEL_NAMES: dict[int, str] = {
    v: common_pb2.Channel.Name(v).removeprefix("CHANNEL_") for v in common_pb2.Channel.values()
}
REASON_NAMES: dict[int, str] = {
    v: common_pb2.FailureReason.Name(v).removeprefix("FAILURE_REASON_") for v in common_pb2.FailureReason.values()
}


class MessageChanges(TypedDict, total=False):
    """What one write under a message's claim sets (document keys = record fields)."""

    status: int
    failure_reason: int
    channel: int
    bot_id: str
    attempts: int
    telegram_user_id: int
    sms_admitted: bool
    confirmation_started: bool
    updated_at: datetime
    next_attempt_at: datetime
    lease_until: datetime
    claim_seq: int
    released_at: datetime | None
    sms_poll_at: datetime | None
    purge_at: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    sms_provider: str | None
    provider_id: str | None
    sms_error: str | None
    sms_status: str | None
    sms_poll_until: datetime | None
    sms_parts: int | None
    code_sealed: bytes | None
    rung: int
    caps_taken: int
    gateway_state: str | None
    gateway_error: str | None
    gateway_own_token: bool | None
    cost_micros: int | None
    refunded: bool | None
    read_at: datetime | None
    gateway_code_length: int | None
    bot_pinned: bool
    fallback_at: datetime | None
    revoked_request_id: str | None
    revoked_cost_micros: int | None


# Set once a leg has tried the message: absent from the document until then (None here).
_LATER = (
    "sent_at",
    "delivered_at",
    "sms_provider",
    "provider_id",
    "sms_error",
    "sms_status",
    "sms_poll_until",
    "sms_parts",
    "origin_keys",
    "gateway_state",
    "gateway_error",
    "gateway_own_token",
    "cost_micros",
    "refunded",
    "read_at",
    "gateway_code_length",
    "fallback_at",
    "revoked_request_id",
    "revoked_cost_micros",
)


@dataclass(frozen=True)
class MessageRecord:
    id: str
    idem: str  # unique: "<client_id>\x1f<request_id>", or "\x1f<id>" without a request_id
    fingerprint: str  # blind index of the request's content, to tell a repeat from a conflict
    client_id: str
    request_id: str
    purpose: int
    phone_sealed: bytes | None
    phone_index: str  # blind index of the E.164 number
    phone_masked: str
    region: str
    text_sealed: bytes | None
    requested_channel: int
    channel: int
    requested_bot: str
    bot_owner: str  # the client owning requested_bot; "" for a shared bot or none
    bot_id: str
    status: int
    failure_reason: int
    confirm_days: int
    sms_fallback: bool
    sms_admitted: bool  # the SMS leg passed admission (limits, fraud guard) and was counted
    billed: bool
    protect_content: bool
    delete_after: int
    callback_url: str
    captcha_verified: bool
    created_at: datetime
    updated_at: datetime
    expire_at: datetime
    next_attempt_at: datetime
    lease_until: datetime  # the claim lease: nobody else touches the message before it passes
    claim_seq: int
    attempts: int
    telegram_user_id: int
    confirmation_started: bool
    released_at: datetime | None
    sms_poll_at: datetime | None
    purge_at: datetime | None
    # set once sent ------------------------------------------------------------------------------
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    sms_provider: str | None = None
    provider_id: str | None = None
    sms_error: str | None = None
    sms_status: str | None = None
    sms_poll_until: datetime | None = None
    sms_parts: int | None = None  # the SMS the text went as (each part is billed)
    # An AUTO message that may fall back to SMS later: the fraud guard's (hashed) keys of who
    # asked for it, so the SMS leg is judged with them at dispatch. Absent otherwise.
    origin_keys: dict[str, str] | None = None
    # The ladder (ladder.py): the rung being tried, and how many rungs had their daily cap counted.
    rung: int = 0
    caps_taken: int = 0
    # The Telegram Gateway leg (gateway_leg.py): the request id is `provider_id`; "sending" once a
    # check paid for it (a send may have gone out), "sent" once the Gateway answered the send.
    gateway_state: str | None = None
    gateway_error: str | None = None
    gateway_own_token: bool | None = None  # sent with the client's own Gateway token
    cost_micros: int | None = None  # what the leg cost (millionths of the provider's currency)
    refunded: bool | None = None
    read_at: datetime | None = None
    gateway_code_length: int | None = None  # the Gateway makes the code (no code of ours)
    code_sealed: bytes | None = None  # the bare code, for the Gateway (sealed like the text)
    # A bot send's outcome is unknown: every try goes through bot_id to telegram_user_id again, with the
    # same request id, until Telegram settles it (legs.py). Absent from the document while False.
    bot_pinned: bool = False
    # Fallback on timeout (dispatch.py `_fall_back`): when a SENT Gateway code not yet delivered is
    # revoked so the message may climb; once it did, the revoked request and what it cost (0 once
    # refunded), while `provider_id`, `channel` and `cost_micros` are the next rung's.
    fallback_at: datetime | None = None
    revoked_request_id: str | None = None
    revoked_cost_micros: int | None = None

    @classmethod
    def from_doc(cls, doc: Document) -> MessageRecord:
        created = as_utc(doc["created_at"])
        return cls(
            id=str(doc["_id"]),
            idem=str(doc.get("idem", "")),
            fingerprint=str(doc.get("fingerprint", "")),
            client_id=str(doc["client_id"]),
            request_id=str(doc.get("request_id", "")),
            purpose=int(doc.get("purpose", 0)),
            phone_sealed=_bytes(doc.get("phone")),
            phone_index=str(doc.get("phone_index", "")),
            phone_masked=str(doc.get("phone_masked", "")),
            region=str(doc.get("region", "")),
            text_sealed=_bytes(doc.get("text")),
            requested_channel=int(doc.get("requested_channel", 0)),
            channel=int(doc.get("channel", 0)),
            requested_bot=str(doc.get("requested_bot", "")),
            bot_owner=str(doc.get("bot_owner", "")),
            bot_id=str(doc.get("bot_id", "")),
            status=int(doc["status"]),
            failure_reason=int(doc.get("failure_reason", 0)),
            confirm_days=int(doc.get("confirm_days", 0)),
            sms_fallback=bool(doc.get("sms_fallback")),
            sms_admitted=bool(doc.get("sms_admitted")),
            billed=bool(doc.get("billed")),
            protect_content=bool(doc.get("protect_content")),
            delete_after=int(doc.get("delete_after") or 0),
            callback_url=str(doc.get("callback_url", "")),
            captcha_verified=bool(doc.get("captcha_verified")),
            created_at=created,
            updated_at=_moment(doc.get("updated_at")) or created,
            expire_at=as_utc(doc["expire_at"]),
            next_attempt_at=_moment(doc.get("next_attempt_at")) or created,
            lease_until=_moment(doc.get("lease_until")) or EPOCH,
            claim_seq=int(doc.get("claim_seq", 0)),
            attempts=int(doc.get("attempts", 0)),
            telegram_user_id=int(doc.get("telegram_user_id", 0)),
            confirmation_started=bool(doc.get("confirmation_started")),
            released_at=_moment(doc.get("released_at")),
            sms_poll_at=_moment(doc.get("sms_poll_at")),
            purge_at=_moment(doc.get("purge_at")),
            sent_at=_moment(doc.get("sent_at")),
            delivered_at=_moment(doc.get("delivered_at")),
            sms_provider=_text(doc.get("sms_provider")),
            provider_id=_text(doc.get("provider_id")),
            sms_error=_text(doc.get("sms_error")),
            sms_status=_text(doc.get("sms_status")),
            sms_poll_until=_moment(doc.get("sms_poll_until")),
            sms_parts=int(doc["sms_parts"]) if doc.get("sms_parts") else None,
            origin_keys={str(k): str(v) for k, v in doc["origin_keys"].items()} if doc.get("origin_keys") else None,
            rung=int(doc.get("rung") or 0),
            caps_taken=int(doc.get("caps_taken") or 0),
            gateway_state=_text(doc.get("gateway_state")),
            gateway_error=_text(doc.get("gateway_error")),
            gateway_own_token=bool(doc["gateway_own_token"]) if "gateway_own_token" in doc else None,
            cost_micros=int(doc["cost_micros"]) if doc.get("cost_micros") is not None else None,
            refunded=bool(doc["refunded"]) if "refunded" in doc else None,
            read_at=_moment(doc.get("read_at")),
            gateway_code_length=int(doc["gateway_code_length"]) if doc.get("gateway_code_length") else None,
            code_sealed=_bytes(doc.get("code")),
            bot_pinned=bool(doc.get("bot_pinned")),
            fallback_at=_moment(doc.get("fallback_at")),
            revoked_request_id=_text(doc.get("revoked_request_id")),
            revoked_cost_micros=int(doc["revoked_cost_micros"]) if doc.get("revoked_cost_micros") is not None else None,
        )

    def to_doc(self) -> Document:
        doc: Document = {
            "_id": self.id,
            "idem": self.idem,
            "fingerprint": self.fingerprint,
            "client_id": self.client_id,
            "request_id": self.request_id,
            "purpose": self.purpose,
            "phone": self.phone_sealed,
            "phone_index": self.phone_index,
            "phone_masked": self.phone_masked,
            "region": self.region,
            "text": self.text_sealed,
            "requested_channel": self.requested_channel,
            "channel": self.channel,
            "requested_bot": self.requested_bot,
            "bot_owner": self.bot_owner,
            "bot_id": self.bot_id,
            "status": self.status,
            "failure_reason": self.failure_reason,
            "confirm_days": self.confirm_days,
            "sms_fallback": self.sms_fallback,
            "sms_admitted": self.sms_admitted,
            "billed": self.billed,
            "protect_content": self.protect_content,
            "delete_after": self.delete_after,
            "callback_url": self.callback_url,
            "captcha_verified": self.captcha_verified,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expire_at": self.expire_at,
            "next_attempt_at": self.next_attempt_at,
            "lease_until": self.lease_until,
            "claim_seq": self.claim_seq,
            "attempts": self.attempts,
            "telegram_user_id": self.telegram_user_id,
            "confirmation_started": self.confirmation_started,
            "released_at": self.released_at,
            "sms_poll_at": self.sms_poll_at,
            "purge_at": self.purge_at,
        }
        # Written once they mean something: a message on its first rung keeps the document it had.
        if self.rung:
            doc["rung"] = self.rung
        if self.caps_taken:
            doc["caps_taken"] = self.caps_taken
        if self.code_sealed is not None:
            doc["code"] = self.code_sealed
        for name in _LATER:
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        if self.bot_pinned:
            doc["bot_pinned"] = True
        return doc

    def updated(self, changes: MessageChanges) -> MessageRecord:
        """This record with `changes` applied, as the document reads after they are written."""
        # A copy of the fields: dataclasses.replace would run __init__ over all of them again
        # (7 µs against 1 µs, two or three times per message). MessageChanges names only fields.
        record = object.__new__(MessageRecord)
        record.__dict__.update(self.__dict__, **changes)
        return record

    def status_at(self, now: datetime) -> tuple[int, int]:
        """Status and failure reason as of `now`: expiry is decided at read time."""
        if self.status in OPEN_STATUSES and self.expire_at <= now:
            held = self.status == HELD
            return EXPIRED, (
                common_pb2.FAILURE_REASON_CONFIRMATION_TIMEOUT if held else common_pb2.FAILURE_REASON_TTL_EXPIRED
            )
        return self.status, self.failure_reason

    def to_proto(self, now: datetime) -> common_pb2.Message:
        status, reason = self.status_at(now)
        message = common_pb2.Message(
            id=self.id,
            request_id=self.request_id,
            phone_masked=self.phone_masked,
            requested_channel=self.requested_channel,  # type: ignore[arg-type]
            channel=self.channel,  # type: ignore[arg-type]
            bot_id=self.bot_id,
            status=status,  # type: ignore[arg-type]
            failure_reason=reason,  # type: ignore[arg-type]
            confirm_days=self.confirm_days,
            protect_content=self.protect_content,
            callback_url=self.callback_url,
            attempts=self.attempts,
            cost=((self.cost_micros or 0) + (self.revoked_cost_micros or 0)) / 1_000_000,
        )
        if self.delete_after:
            message.delete_after.CopyFrom(duration_pb2.Duration(seconds=self.delete_after))
        for name, moment in (
            ("create_time", self.created_at),
            ("update_time", self.updated_at),
            ("expire_time", self.expire_at),
            ("sent_time", self.sent_at),
            ("delivered_time", self.delivered_at),
            ("read_time", self.read_at),
        ):
            if moment is not None:
                getattr(message, name).CopyFrom(_timestamp(moment))
        if status == EXPIRED and self.status != EXPIRED:
            message.update_time.CopyFrom(_timestamp(self.expire_at))
        return message


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _moment(value: Any) -> datetime | None:
    return as_utc(value) if isinstance(value, datetime) else None


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def _text(value: Any) -> str | None:
    return str(value) if value is not None else None

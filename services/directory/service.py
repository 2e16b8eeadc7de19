"""otpgate.directory.v1.DirectoryService: a thin servicer over services.directory.subscribers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc

from services.core.errors import Violations, invalid_argument, permission_denied
from services.core.logging import get_logger
from services.directory import metrics
from services.directory.store import SubscriberRecord
from services.directory.subscribers import Directory, LinkStatus
from services.directory.validation import check_bot_id, check_phone, check_user_id

log = get_logger(__name__)
Context = Any  # grpc.aio.ServicerContext

_STATUS_TO_PROTO = {
    LinkStatus.CONNECTED: common_pb2.BOT_LINK_STATUS_CONNECTED,
    LinkStatus.BLOCKED: common_pb2.BOT_LINK_STATUS_BLOCKED,
    LinkStatus.STOPPED: common_pb2.BOT_LINK_STATUS_STOPPED,
}
_STATUS_FROM_PROTO = {value: key for key, value in _STATUS_TO_PROTO.items()}
_STATUS_BY_NAME = {key.value: value for key, value in _STATUS_TO_PROTO.items()}


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class DirectoryServicer(directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def _subscriber(self, record: SubscriberRecord) -> directory_pb2.Subscriber:
        message = directory_pb2.Subscriber(
            telegram_user_id=record.telegram_user_id,
            phone_masked=self.directory.masked_phone(record),
            region_code=record.region,
            create_time=timestamp(record.created_at),
            update_time=timestamp(record.updated_at),
        )
        for bot_id in sorted(record.links):
            link = record.links[bot_id]
            message.bot_links.append(
                directory_pb2.BotLink(
                    bot_id=bot_id,
                    status=_STATUS_BY_NAME.get(link.status, common_pb2.BOT_LINK_STATUS_UNSPECIFIED),
                    update_time=timestamp(link.updated_at),
                )
            )
        if record.confirmed_at is not None:
            message.confirm_time.CopyFrom(timestamp(record.confirmed_at))
        return message

    async def LinkContact(
        self, request: directory_pb2.LinkContactRequest, context: Context
    ) -> directory_pb2.LinkContactResponse:
        violations = Violations()
        bot_id = check_bot_id(violations, request.bot_id)
        user_id = check_user_id(violations, request.telegram_user_id)
        if violations:
            check_phone(violations, request.phone, plus_optional=True)
            metrics.links.labels("invalid").inc()
            raise invalid_argument(violations.items)
        # Only the sender's own contact links a number: never someone else's, never a forwarded one.
        if request.contact_user_id != user_id or request.forwarded:
            metrics.links.labels("refused_not_own").inc()
            log.info("contact_refused", bot_id=bot_id, forwarded=request.forwarded)
            raise permission_denied("CONTACT_NOT_OWN", "only your own contact can be shared, not someone else's")
        phone = check_phone(violations, request.phone, plus_optional=True)
        if phone is None:
            metrics.links.labels("invalid").inc()
            raise invalid_argument(violations.items)
        outcome = await self.directory.link_contact(bot_id, user_id, phone)
        metrics.links.labels(outcome.outcome).inc()
        return directory_pb2.LinkContactResponse(
            subscriber=self._subscriber(outcome.subscriber),
            number_changed=outcome.number_changed,
            number_moved=outcome.number_moved,
        )

    async def ConnectKnownUser(
        self, request: directory_pb2.ConnectKnownUserRequest, context: Context
    ) -> directory_pb2.ConnectKnownUserResponse:
        violations = Violations()
        bot_id = check_bot_id(violations, request.bot_id)
        user_id = check_user_id(violations, request.telegram_user_id)
        violations.raise_if_any()
        record = await self.directory.connect_known_user(bot_id, user_id)
        return directory_pb2.ConnectKnownUserResponse(subscriber=self._subscriber(record))

    async def ResolvePhone(
        self, request: directory_pb2.ResolvePhoneRequest, context: Context
    ) -> directory_pb2.ResolvePhoneResponse:
        violations = Violations()
        phone = check_phone(violations, request.phone)
        check_bot_id(violations, request.bot_id, required=False)
        violations.raise_if_any()
        assert phone is not None
        resolution = await self.directory.resolve(phone.e164, request.bot_id)
        if resolution is None:
            return directory_pb2.ResolvePhoneResponse(found=False)
        record = resolution.subscriber
        response = directory_pb2.ResolvePhoneResponse(
            found=True,
            telegram_user_id=record.telegram_user_id,
            connected_bot_ids=resolution.connected_bot_ids,
            shared_bot_ids=resolution.shared_bot_ids,
            blocked_bot_ids=resolution.blocked_bot_ids,
            region_code=record.region,
        )
        if record.confirmed_at is not None:
            response.confirm_time.CopyFrom(timestamp(record.confirmed_at))
        return response

    async def GetSubscriber(
        self, request: directory_pb2.GetSubscriberRequest, context: Context
    ) -> directory_pb2.GetSubscriberResponse:
        who = _selected(request)
        record = await (self.directory.get_by_user(who) if isinstance(who, int) else self.directory.get_by_phone(who))
        return directory_pb2.GetSubscriberResponse(subscriber=self._subscriber(record))

    async def SetBotStatus(
        self, request: directory_pb2.SetBotStatusRequest, context: Context
    ) -> directory_pb2.SetBotStatusResponse:
        violations = Violations()
        bot_id = check_bot_id(violations, request.bot_id)
        user_id = check_user_id(violations, request.telegram_user_id)
        status = _STATUS_FROM_PROTO.get(request.status)
        if status is None:
            violations.add("status", "must be CONNECTED, BLOCKED or STOPPED")
        violations.raise_if_any()
        assert status is not None
        record = await self.directory.set_bot_status(bot_id, user_id, status)
        return directory_pb2.SetBotStatusResponse(subscriber=self._subscriber(record))

    async def MarkConfirmed(
        self, request: directory_pb2.MarkConfirmedRequest, context: Context
    ) -> directory_pb2.MarkConfirmedResponse:
        violations = Violations()
        user_id = check_user_id(violations, request.telegram_user_id)
        phone = check_phone(violations, request.phone)
        violations.raise_if_any()
        assert phone is not None
        confirmed = await self.directory.mark_confirmed(user_id, phone.e164)
        return directory_pb2.MarkConfirmedResponse(confirm_time=timestamp(confirmed))

    async def ForgetSubscriber(
        self, request: directory_pb2.ForgetSubscriberRequest, context: Context
    ) -> directory_pb2.ForgetSubscriberResponse:
        who = _selected(request)
        erased = await (self.directory.forget_user(who) if isinstance(who, int) else self.directory.forget_phone(who))
        return directory_pb2.ForgetSubscriberResponse(erased=erased)


def _selected(request: directory_pb2.GetSubscriberRequest | directory_pb2.ForgetSubscriberRequest) -> int | str:
    """The Telegram user id, or the E.164 number, that a by-user-or-phone request names."""
    violations = Violations()
    selector = request.WhichOneof("selector")
    if selector == "telegram_user_id":
        user_id = check_user_id(violations, request.telegram_user_id)
        violations.raise_if_any()
        return user_id
    if selector == "phone":
        phone = check_phone(violations, request.phone)
        violations.raise_if_any()
        assert phone is not None
        return phone.e164
    raise invalid_argument([("selector", "telegram_user_id or phone is required")])

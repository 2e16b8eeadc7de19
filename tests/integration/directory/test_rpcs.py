"""DirectoryService behaviour through real gRPC against the dev database."""

from __future__ import annotations

import grpc
import pytest
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2 as pb
from otpgate.directory.v1 import directory_pb2_grpc
from prometheus_client import REGISTRY, generate_latest
from pymongo.asynchronous.collection import AsyncCollection

from services.core.clock import ManualClock
from services.core.errors import parse_rpc_error
from services.core.mongo import Document
from services.core.phone import mask_phone
from tests.integration.directory.conftest import new_phone, new_user_id

Stub = directory_pb2_grpc.DirectoryServiceStub
CONNECTED = common_pb2.BOT_LINK_STATUS_CONNECTED
BLOCKED = common_pb2.BOT_LINK_STATUS_BLOCKED
STOPPED = common_pb2.BOT_LINK_STATUS_STOPPED


async def link(directory: Stub, user: int, phone: str, bot: str = "smsccode_bot") -> pb.LinkContactResponse:
    return await directory.LinkContact(
        pb.LinkContactRequest(bot_id=bot, telegram_user_id=user, contact_user_id=user, phone=phone)
    )


async def failure(call: object) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    parsed = parse_rpc_error(info.value)
    return parsed.code, parsed.reason, parsed.field_violations


async def test_link_then_resolve_and_get_masked(directory: Stub, clock: ManualClock) -> None:
    user, phone = new_user_id(), new_phone()
    # Telegram sends contact numbers without "+": accepted and normalised.
    linked = await link(directory, user, phone.lstrip("+"))
    assert not linked.number_changed and not linked.number_moved
    assert linked.subscriber.telegram_user_id == user
    assert linked.subscriber.phone_masked == mask_phone(phone)
    assert phone[-7:] not in linked.subscriber.phone_masked
    assert linked.subscriber.region_code == "RU"
    assert [(b.bot_id, b.status) for b in linked.subscriber.bot_links] == [("smsccode_bot", CONNECTED)]
    assert not linked.subscriber.HasField("confirm_time")
    assert linked.subscriber.create_time.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now()

    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert resolved.found and resolved.telegram_user_id == user
    assert list(resolved.connected_bot_ids) == ["smsccode_bot"]
    assert list(resolved.shared_bot_ids) == ["smsccode_bot"]
    assert not resolved.HasField("confirm_time")
    assert resolved.region_code == "RU"

    by_user = await directory.GetSubscriber(pb.GetSubscriberRequest(telegram_user_id=user))
    by_phone = await directory.GetSubscriber(pb.GetSubscriberRequest(phone=phone))
    assert by_user.subscriber == by_phone.subscriber
    assert by_user.subscriber.phone_masked == mask_phone(phone)


async def test_unknown_number_is_not_found_not_an_error(directory: Stub) -> None:
    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=new_phone(), bot_id="smsccode_bot"))
    assert not resolved.found
    assert resolved.telegram_user_id == 0 and not resolved.connected_bot_ids
    code, reason, _ = await failure(directory.GetSubscriber(pb.GetSubscriberRequest(phone=new_phone())))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIBER_NOT_FOUND")
    code, reason, _ = await failure(directory.GetSubscriber(pb.GetSubscriberRequest(telegram_user_id=new_user_id())))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIBER_NOT_FOUND")


@pytest.mark.parametrize(
    ("contact_user_id", "forwarded"),
    [(0, False), (-1, False), ("other", False), ("self", True)],
    ids=["contact-of-nobody", "negative", "someone-else", "forwarded-own"],
)
async def test_spoofed_contact_refused(
    directory: Stub, subscribers: AsyncCollection[Document], contact_user_id: object, forwarded: bool
) -> None:
    user, phone = new_user_id(), new_phone()
    contact = {"other": new_user_id(), "self": user}.get(str(contact_user_id), contact_user_id)
    request = pb.LinkContactRequest(
        bot_id="smsccode_bot", telegram_user_id=user, contact_user_id=int(contact), phone=phone, forwarded=forwarded
    )
    code, reason, _ = await failure(directory.LinkContact(request))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CONTACT_NOT_OWN")
    assert await subscribers.count_documents({}) == 0
    assert not (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))).found


async def test_someone_elses_contact_does_not_steal_a_linked_number(directory: Stub) -> None:
    owner, thief, phone = new_user_id(), new_user_id(), new_phone()
    await link(directory, owner, phone)
    request = pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=thief, contact_user_id=owner, phone=phone)
    code, reason, _ = await failure(directory.LinkContact(request))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CONTACT_NOT_OWN")
    assert (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))).telegram_user_id == owner


async def test_number_change_resets_confirmation(
    directory: Stub, clock: ManualClock, subscribers: AsyncCollection[Document]
) -> None:
    user, first, second = new_user_id(), new_phone(), new_phone()
    await link(directory, user, first)
    confirmed = await directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=user, phone=first))
    assert confirmed.confirm_time.ToSeconds() == int(clock.now().timestamp())
    assert (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=first))).HasField("confirm_time")

    clock.advance(3600)
    again = await link(directory, user, first, bot="smsc_code_bot")
    assert not again.number_changed  # sharing the same number again keeps the confirmation
    assert again.subscriber.confirm_time.ToSeconds() == confirmed.confirm_time.ToSeconds()

    changed = await link(directory, user, second)
    assert changed.number_changed and not changed.number_moved
    assert not changed.subscriber.HasField("confirm_time")
    assert changed.subscriber.phone_masked == mask_phone(second)
    # Links with the bots belong to the person and survive the new number.
    assert {b.bot_id for b in changed.subscriber.bot_links} == {"smsccode_bot", "smsc_code_bot"}

    assert not (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=first))).found
    now = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=second))
    assert now.found and now.telegram_user_id == user and not now.HasField("confirm_time")
    assert await subscribers.count_documents({}) == 1

    # The old number can no longer be confirmed for this person.
    code, reason, _ = await failure(
        directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=user, phone=first))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PHONE_NOT_LINKED")
    code, reason, _ = await failure(
        directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=new_user_id(), phone=second))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIBER_NOT_FOUND")


async def test_number_moves_to_the_newest_owner(directory: Stub, subscribers: AsyncCollection[Document]) -> None:
    old_owner, new_owner, phone = new_user_id(), new_user_id(), new_phone()
    await link(directory, old_owner, phone)
    await directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=old_owner, phone=phone))

    moved = await link(directory, new_owner, phone, bot="smscodes_bot")
    assert moved.number_moved and not moved.number_changed
    assert not moved.subscriber.HasField("confirm_time")  # the new owner never confirmed it

    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert resolved.telegram_user_id == new_owner
    assert list(resolved.connected_bot_ids) == ["smscodes_bot"]
    # The old owner holds nothing any more: not by user id, not by number.
    code, reason, _ = await failure(directory.GetSubscriber(pb.GetSubscriberRequest(telegram_user_id=old_owner)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIBER_NOT_FOUND")
    code, _, _ = await failure(
        directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="x_bot", telegram_user_id=old_owner))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert await subscribers.count_documents({}) == 1
    assert await subscribers.count_documents({"telegram_user_id": old_owner}) == 0


async def test_connect_known_user_across_bots(directory: Stub, clock: ManualClock) -> None:
    user, phone = new_user_id(), new_phone()
    await link(directory, user, phone, bot="smsccode_bot")
    clock.advance(60)
    # The person starts a client's own bot: recognised by Telegram user id, no number shared again.
    connected = await directory.ConnectKnownUser(
        pb.ConnectKnownUserRequest(bot_id="shop_own_bot", telegram_user_id=user)
    )
    assert {(b.bot_id, b.status) for b in connected.subscriber.bot_links} == {
        ("smsccode_bot", CONNECTED),
        ("shop_own_bot", CONNECTED),
    }
    clock.advance(60)
    await directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="smscodes_bot", telegram_user_id=user))

    preferred = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone, bot_id="smsccode_bot"))
    assert preferred.connected_bot_ids[0] == "smsccode_bot"
    assert set(preferred.connected_bot_ids) == {"smsccode_bot", "shop_own_bot", "smscodes_bot"}
    assert list(preferred.shared_bot_ids) == ["smsccode_bot", "smscodes_bot"]
    own = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone, bot_id="shop_own_bot"))
    assert own.connected_bot_ids[0] == "shop_own_bot"
    # Shared bots: the most recently connected first when the preferred one is not shared.
    assert list(own.shared_bot_ids) == ["smscodes_bot", "smsccode_bot"]

    code, reason, _ = await failure(
        directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="shop_own_bot", telegram_user_id=new_user_id()))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIBER_NOT_FOUND")


async def test_bot_status_blocked_stopped_and_back(directory: Stub, clock: ManualClock) -> None:
    user, phone = new_user_id(), new_phone()
    await link(directory, user, phone, bot="smsccode_bot")
    await directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="smscodes_bot", telegram_user_id=user))
    clock.advance(5)
    blocked = await directory.SetBotStatus(
        pb.SetBotStatusRequest(bot_id="smsccode_bot", telegram_user_id=user, status=BLOCKED)
    )
    link_state = {b.bot_id: b for b in blocked.subscriber.bot_links}
    assert link_state["smsccode_bot"].status == BLOCKED
    assert link_state["smsccode_bot"].update_time.ToSeconds() == int(clock.now().timestamp())
    await directory.SetBotStatus(pb.SetBotStatusRequest(bot_id="smscodes_bot", telegram_user_id=user, status=STOPPED))

    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone, bot_id="smsccode_bot"))
    assert resolved.found and not resolved.connected_bot_ids and not resolved.shared_bot_ids
    assert list(resolved.blocked_bot_ids) == ["smsccode_bot"]

    # /start again reconnects.
    await directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="smsccode_bot", telegram_user_id=user))
    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert list(resolved.connected_bot_ids) == ["smsccode_bot"] and not resolved.blocked_bot_ids

    code, reason, violations = await failure(
        directory.SetBotStatus(pb.SetBotStatusRequest(bot_id="smsccode_bot", telegram_user_id=user))
    )
    assert (code, [f for f, _ in violations]) == (grpc.StatusCode.INVALID_ARGUMENT, ["status"])
    code, reason, _ = await failure(
        directory.SetBotStatus(
            pb.SetBotStatusRequest(bot_id="smsccode_bot", telegram_user_id=new_user_id(), status=BLOCKED)
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIBER_NOT_FOUND")


async def test_mark_confirmed_sets_the_time_everywhere(directory: Stub, clock: ManualClock) -> None:
    user, phone = new_user_id(), new_phone()
    await link(directory, user, phone)
    clock.advance(86400)
    confirmed = await directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=user, phone=phone))
    assert confirmed.confirm_time.ToSeconds() == int(clock.now().timestamp())
    resolved = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert resolved.confirm_time == confirmed.confirm_time
    got = await directory.GetSubscriber(pb.GetSubscriberRequest(telegram_user_id=user))
    assert got.subscriber.confirm_time == confirmed.confirm_time


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_business_metrics_count_outcomes_without_personal_labels(directory: Stub) -> None:
    names = ("linked", "relinked", "number_changed", "number_moved", "refused_not_own", "invalid")
    before = {o: counter("otpgate_directory_links_total", outcome=o) for o in names}
    resolves = counter("otpgate_directory_resolves_total", outcome="not_found")
    user, other, phone = new_user_id(), new_user_id(), new_phone()
    await link(directory, user, phone)
    await link(directory, user, phone)
    await link(directory, user, new_phone())
    await link(directory, other, phone)
    await failure(
        directory.LinkContact(pb.LinkContactRequest(bot_id="smsccode_bot", telegram_user_id=user, phone=phone))
    )
    await failure(directory.LinkContact(pb.LinkContactRequest(bot_id="x", telegram_user_id=user, contact_user_id=user)))
    await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=new_phone()))
    after = {o: counter("otpgate_directory_links_total", outcome=o) for o in names}
    # The third call changed the user's number, so `phone` was free again: `other` linked it anew.
    assert {o: after[o] - before[o] for o in names} == {
        "linked": 2,
        "relinked": 1,
        "number_changed": 1,
        "number_moved": 0,
        "refused_not_own": 1,
        "invalid": 1,
    }
    assert counter("otpgate_directory_resolves_total", outcome="not_found") == resolves + 1
    exposition = generate_latest(REGISTRY).decode()
    assert str(user) not in exposition and phone.lstrip("+") not in exposition

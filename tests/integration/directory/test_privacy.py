"""What is stored and what can be read back: no plaintext numbers, bound ciphertexts, real erasure."""

from __future__ import annotations

import bson
import grpc
import pytest
from otpgate.common.v1 import common_pb2
from otpgate.directory.v1 import directory_pb2 as pb
from otpgate.directory.v1 import directory_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from services.core.crypto import DecryptionError, Keyring, SealContext
from services.core.mongo import Document
from services.directory.subscribers import INDEX_PURPOSE
from tests.integration.directory.conftest import new_phone, new_user_id
from tests.support.stack import Stack

Stub = directory_pb2_grpc.DirectoryServiceStub


async def link(directory: Stub, user: int, phone: str, bot: str = "smsccode_bot") -> None:
    await directory.LinkContact(
        pb.LinkContactRequest(bot_id=bot, telegram_user_id=user, contact_user_id=user, phone=phone)
    )


def digit_forms(e164: str) -> list[bytes]:
    """Ways a number could sit in plaintext: E.164, digits only, the national number."""
    digits = e164.lstrip("+")
    return [e164.encode(), digits.encode(), digits[1:].encode(), e164.encode("utf-16-le")]


async def test_raw_collections_hold_no_plaintext_number(
    directory: Stub, stack: Stack, mongo_client: AsyncMongoClient[Document], keyring: Keyring
) -> None:
    phones = [new_phone() for _ in range(8)]
    users = [new_user_id() for _ in phones]
    for user, phone in zip(users, phones, strict=True):
        await link(directory, user, phone)
        await directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=user, phone=phone))
        await directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="shop_own_bot", telegram_user_id=user))
    replaced = new_phone()
    await link(directory, users[0], replaced)  # the first number is replaced: no trace of it either
    phones.append(replaced)

    database = mongo_client[stack.commons["directory"].database]
    raw = b""
    for name in await database.list_collection_names():
        async for doc in database[name].find({}):
            raw += bson.encode(doc)
    assert raw, "nothing stored?"
    for phone in phones:
        for form in digit_forms(phone):
            assert form not in raw
    # What is there: a sealed value under the primary key and a keyed index.
    doc = await database["subscribers"].find_one({"telegram_user_id": users[1]})
    assert doc is not None
    assert keyring.key_id_of(doc["phone"]) == keyring.primary_id
    assert keyring.open_str(doc["phone"], SealContext("subscribers", doc["_id"], "phone")) == phones[1]
    assert doc["phone_index"] == keyring.blind_index(INDEX_PURPOSE, phones[1])
    assert doc["phone_index_key"] == keyring.index_key_id
    assert set(doc) == {
        "_id",
        "telegram_user_id",
        "phone",
        "phone_index",
        "phone_index_key",
        "region",
        "links",
        "linked_at",
        "confirmed_at",
        "created_at",
        "updated_at",
    }


async def _sealed(subscribers: AsyncCollection[Document], user: int) -> tuple[str, bytes]:
    doc = await subscribers.find_one({"telegram_user_id": user})
    assert doc is not None
    return doc["_id"], bytes(doc["phone"])


async def _unreadable(directory: Stub, user: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await directory.GetSubscriber(pb.GetSubscriberRequest(telegram_user_id=user))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS


async def test_tampered_ciphertext_fails_to_open(
    directory: Stub, subscribers: AsyncCollection[Document], keyring: Keyring
) -> None:
    user, phone = new_user_id(), new_phone()
    await link(directory, user, phone)
    doc_id, sealed = await _sealed(subscribers, user)
    flipped = bytearray(sealed)
    flipped[-5] ^= 0x01
    await subscribers.update_one({"_id": doc_id}, {"$set": {"phone": bytes(flipped)}})
    with pytest.raises(DecryptionError):
        keyring.open(bytes(flipped), SealContext("subscribers", doc_id, "phone"))
    await _unreadable(directory, user)

    # Relabelling the key id in the header does not help either: the key id is bound too.
    other_key = next(k for k in keyring.key_ids if k != keyring.primary_id)
    relabelled = bytes([sealed[0], len(other_key)]) + other_key.encode() + sealed[2 + sealed[1] :]
    with pytest.raises(DecryptionError):
        keyring.open(relabelled, SealContext("subscribers", doc_id, "phone"))


async def test_swapped_ciphertexts_fail_to_open(
    directory: Stub, subscribers: AsyncCollection[Document], keyring: Keyring
) -> None:
    first, second = new_user_id(), new_user_id()
    await link(directory, first, new_phone())
    await link(directory, second, new_phone())
    first_id, first_sealed = await _sealed(subscribers, first)
    second_id, second_sealed = await _sealed(subscribers, second)
    # Moved to another document, or read as another field: both refused.
    with pytest.raises(DecryptionError):
        keyring.open(first_sealed, SealContext("subscribers", second_id, "phone"))
    with pytest.raises(DecryptionError):
        keyring.open(first_sealed, SealContext("subscribers", first_id, "region"))
    await subscribers.update_one({"_id": first_id}, {"$set": {"phone": second_sealed}})
    await subscribers.update_one({"_id": second_id}, {"$set": {"phone": first_sealed}})
    await _unreadable(directory, first)
    await _unreadable(directory, second)


@pytest.mark.parametrize("by", ["telegram_user_id", "phone"])
async def test_erasure_leaves_nothing_findable(
    directory: Stub, subscribers: AsyncCollection[Document], keyring: Keyring, by: str
) -> None:
    user, phone = new_user_id(), new_phone()
    bystander, bystander_phone = new_user_id(), new_phone()
    await link(directory, user, phone)
    await link(directory, bystander, bystander_phone)
    await directory.MarkConfirmed(pb.MarkConfirmedRequest(telegram_user_id=user, phone=phone))
    await directory.SetBotStatus(
        pb.SetBotStatusRequest(bot_id="smsccode_bot", telegram_user_id=user, status=common_pb2.BOT_LINK_STATUS_BLOCKED)
    )

    request = (
        pb.ForgetSubscriberRequest(telegram_user_id=user)
        if by == "telegram_user_id"
        else pb.ForgetSubscriberRequest(phone=phone)
    )
    assert (await directory.ForgetSubscriber(request)).erased
    assert not (await directory.ForgetSubscriber(request)).erased  # idempotent: nothing left to erase

    assert not (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))).found
    for lookup in (pb.GetSubscriberRequest(telegram_user_id=user), pb.GetSubscriberRequest(phone=phone)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await directory.GetSubscriber(lookup)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError):
        await directory.ConnectKnownUser(pb.ConnectKnownUserRequest(bot_id="smsccode_bot", telegram_user_id=user))
    # Nothing in the raw collection by user id or by the number's index under any key.
    indexes = [keyring.blind_index(INDEX_PURPOSE, phone, key_id) for key_id in keyring.key_ids]
    assert await subscribers.count_documents({"telegram_user_id": user}) == 0
    assert await subscribers.count_documents({"phone_index": {"$in": indexes}}) == 0
    assert await subscribers.count_documents({}) == 1  # the bystander is untouched
    assert (await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=bystander_phone))).telegram_user_id == bystander

    # Coming back is a fresh start: never confirmed, one bot.
    await link(directory, user, phone, bot="smscodes_bot")
    again = await directory.ResolvePhone(pb.ResolvePhoneRequest(phone=phone))
    assert not again.HasField("confirm_time") and list(again.connected_bot_ids) == ["smscodes_bot"]

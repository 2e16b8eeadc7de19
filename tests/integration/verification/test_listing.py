"""ListVerifications: a client's verifications newest first, paged and filtered, read by `_id`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from otpgate.common.v1 import common_pb2
from otpgate.verification.v1 import verification_pb2 as V
from pymongo import AsyncMongoClient

from services.core.mongo import Document
from services.verification import listing
from services.verification.listing import encode_token, list_verifications
from services.verification.store import Store
from services.verification.verify import Verifier
from tests.integration.core.test_feed import Finds
from tests.integration.verification.conftest import Env, new_phone, refused

SMS = common_pb2.CHANNEL_SMS
APPROVED = common_pb2.VERIFICATION_STATUS_APPROVED
PENDING = common_pb2.VERIFICATION_STATUS_PENDING
EXPIRED = common_pb2.VERIFICATION_STATUS_EXPIRED


async def _start(env: Env, client_id: str, phone: str = "") -> V.StartVerificationResponse:
    request = V.StartVerificationRequest(client_id=client_id, phone=phone or new_phone(), channel=SMS)
    reply: V.StartVerificationResponse = await env.verification.StartVerification(request)
    env.clock.advance(timedelta(seconds=1))
    return reply


async def _list(env: Env, client_id: str, **fields: Any) -> V.ListVerificationsResponse:
    reply: V.ListVerificationsResponse = await env.verification.ListVerifications(
        V.ListVerificationsRequest(client_id=client_id, **fields)
    )
    return reply


async def _all_pages(env: Env, client_id: str, **fields: Any) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(50):
        page = await _list(env, client_id, page_token=token, **fields)
        ids += [v.id for v in page.verifications]
        token = page.next_page_token
        if not token:
            return ids
    raise AssertionError("the listing never ended")


async def test_pages_newest_first_per_client(env: Env) -> None:
    mine = [(await _start(env, "list-a")).verification.id for _ in range(7)]
    theirs = (await _start(env, "list-b")).verification.id
    first = await _list(env, "list-a", page_size=3)
    assert [v.id for v in first.verifications] == mine[::-1][:3]
    assert first.next_page_token
    assert await _all_pages(env, "list-a", page_size=3) == mine[::-1]
    assert await _all_pages(env, "list-b") == [theirs]
    assert (await _list(env, "nobody")).verifications == []
    # A page shows the same verification as GetVerification does.
    got = await env.verification.GetVerification(V.GetVerificationRequest(client_id="list-a", id=mine[-1]))
    assert first.verifications[0] == got.verification


async def test_filters(env: Env) -> None:
    phone = new_phone()
    approved = (await _start(env, "filter-a", phone)).verification
    (code,) = await env.codes_by_sms(phone)
    check = V.CheckVerificationRequest(client_id="filter-a", id=approved.id, code=code)
    assert (await env.verification.CheckVerification(check)).approved
    middle = env.clock.now()
    pending = [(await _start(env, "filter-a")).verification.id for _ in range(3)]
    assert await _all_pages(env, "filter-a", filter="status = APPROVED") == [approved.id]
    assert await _all_pages(env, "filter-a", filter="status = VERIFICATION_STATUS_PENDING") == pending[::-1]
    assert await _all_pages(env, "filter-a", filter="status != PENDING") == [approved.id]
    assert await _all_pages(env, "filter-a", filter=f'phone = "{phone}"') == [approved.id]
    assert await _all_pages(env, "filter-a", filter="channel = SMS AND status = PENDING") == pending[::-1]
    assert await _all_pages(env, "filter-a", filter="channel = TELEGRAM") == []
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(middle)
    after = f'create_time >= "{stamp.ToJsonString()}"'
    assert await _all_pages(env, "filter-a", filter=after) == pending[::-1]
    assert await _all_pages(env, "filter-a", filter=after.replace(">=", "<")) == [approved.id]
    # Lapsed codes read as EXPIRED, in the filter too.
    env.clock.advance(timedelta(hours=2))
    assert await _all_pages(env, "filter-a", filter="status = EXPIRED") == pending[::-1]
    page = await _list(env, "filter-a", page_size=1)
    assert page.verifications[0].status == EXPIRED


async def test_bad_requests_name_the_field(env: Env) -> None:
    await _start(env, "bad-a")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"filter": "status = NOPE"}, "filter"),
        ({"filter": "status > APPROVED"}, "filter"),
        ({"filter": "colour = red"}, "filter"),
        ({"filter": 'phone = "12"'}, "filter"),
        ({"filter": 'create_time >= "yesterday"'}, "filter"),
        ({"filter": "status = APPROVED OR status = PENDING"}, "filter"),
        ({"page_size": 101}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": encode_token(5, "status = APPROVED")}, "page_token"),  # made for another filter
    ]
    for fields, name in cases:
        failure = await refused(
            env.verification.ListVerifications(V.ListVerificationsRequest(client_id="bad-a", **fields))
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert [v[0] for v in failure.field_violations] == [name], (fields, failure.field_violations)
    failure = await refused(env.verification.ListVerifications(V.ListVerificationsRequest()))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_reads_only_by_id_and_a_selective_filter_stops_early(
    env: Env, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(5):
        await _start(env, "scan-a")
    records, slots = Finds("verifications"), Finds("code_slots")
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_uri, tz_aware=True, event_listeners=[records, slots])
    try:
        running: Verifier = env.stack.app("verification").verifier  # type: ignore[attr-defined]
        store = Store(client[running.store.database.name])
        verifier = Verifier(store, running.keyring, env.clock, running.policy, running.delivery)
        reply = await list_verifications(verifier, V.ListVerificationsRequest(client_id="scan-a", page_size=2))
        assert len(reply.verifications) == 2 and reply.next_page_token
        # A filter nothing matches reads a bounded number of candidates per request: an empty
        # page that says where to go on, until the feed ends.
        monkeypatch.setattr(listing, "MAX_CANDIDATES", 3)
        wanted = V.ListVerificationsRequest(client_id="scan-a", filter="status = APPROVED")
        first = await list_verifications(verifier, wanted)
        assert list(first.verifications) == [] and first.next_page_token
        wanted.page_token = first.next_page_token
        last = await list_verifications(verifier, wanted)
        assert list(last.verifications) == [] and not last.next_page_token
    finally:
        await client.close()
    assert records.filters and all("_id" in f and "$in" in f["_id"] for f in records.filters), records.filters
    assert slots.filters == []  # a record holds its attempts and sends

"""The SMPP provider against a third-party SMSC: jSMPP's server session (tools/smppsim), real
PDUs on loopback. Binds, submits with registered delivery, receipts, throttling, bad
destinations, enquire_link, a dropped connection mid-traffic, the window and the TPS limit,
GSM-7 / UCS-2 and concatenated long texts reassembled on the SMSC side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.delivery.smpp import SmppProvider, SmppSettings, SmppStore
from services.delivery.smpp_link import LinkSettings, LinkState, SmppLink
from services.delivery.sms import DELIVERED, FAILED, PENDING, SmsError
from tests.integration.delivery.support import QUIET, engine_of, sms_request, stubs
from tests.support.smppsim import SmppSim, smpp_server
from tests.support.stack import running_stack

PHONE = "+79991234567"


@pytest.fixture
async def sim() -> AsyncIterator[SmppSim]:
    async with smpp_server(system_id="otpgate", password="s3cret") as server:
        yield server


def settings(sim: SmppSim, **link: Any) -> SmppSettings:
    base = LinkSettings(
        host="127.0.0.1",
        port=sim.port,
        system_id="otpgate",
        password="s3cret",
        system_type="otp",
        response_timeout=5.0,
        reconnect_min=0.05,
        reconnect_max=0.2,
    )
    return SmppSettings(link=replace(base, **link), submit_timeout=8.0, throttle_backoff=3.0)


@asynccontextmanager
async def provider(
    database: AsyncDatabase[Document], sim: SmppSim, link: SmppLink | None = None, **link_settings: Any
) -> AsyncIterator[SmppProvider]:
    store = SmppStore(database["smpp_messages"], database["smpp_receipts"], ManualClock())
    smpp = SmppProvider(settings(sim, **link_settings), store, ManualClock(), link=link)
    smpp.start()
    try:
        yield smpp
    finally:
        await smpp.close()


def smpp_env(sim: SmppSim, **extra: str) -> dict[str, str]:
    """A delivery service on the SMPP provider, bound to `sim`."""
    return {
        **QUIET,
        "OTPGATE_SMS_PROVIDER": "smpp",
        "OTPGATE_SMPP_HOST": "127.0.0.1",
        "OTPGATE_SMPP_PORT": str(sim.port),
        "OTPGATE_SMPP_SYSTEM_ID": "otpgate",
        "OTPGATE_SMPP_PASSWORD": "s3cret",
        **extra,
    }


def taken_texts(sim: SmppSim) -> list[tuple[str, int, int, str]]:
    """(destination, parts, data_coding, text) of every whole message the SMSC took."""
    return [
        (w[1], int(w[2]), int(w[3]), bytes.fromhex(w[4]).decode() if w[4] != "-" else "") for w in sim.seen("message")
    ]


async def test_binds_as_transceiver_and_a_refused_bind_makes_the_provider_unavailable(
    database: AsyncDatabase[Document], sim: SmppSim
) -> None:
    async with provider(database, sim) as smpp:
        assert (await sim.expect("bind"))[1:4] == ["ok", "otpgate", "otp"]
        assert await smpp.link.wait_bound(10)
    await sim.send("credentials", "otpgate", "other")
    async with provider(database, sim) as smpp:
        assert (await sim.expect("bind"))[1] == "refused"
        await sim.expect("bind")  # tried again, with backoff
        with pytest.raises(SmsError) as refused:
            await smpp.send("01JBIND", PHONE, "Code 1234", "otpgate")
        assert refused.value.code == "SMPP_BIND_REFUSED" and not refused.value.permanent
        assert "ESME_RINVPASWD" in str(refused.value)
        assert not sim.submits()
        await sim.send("credentials", "otpgate", "s3cret")  # fixed on the SMSC side: binds by itself
        assert await smpp.link.wait_bound(10)
        sent = await smpp.send("01JBIND", PHONE, "Code 1234", "otpgate")
        assert sent.provider_id == sim.submits()[0].message_id


async def test_delivery_receipts_turn_the_message_delivered_or_failed(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, sim: SmppSim, captured_logs: Any
) -> None:
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=smpp_env(sim), clock=clock) as stack:
        delivery, _ = stubs(stack)
        await sim.expect("bind")
        ok = (await delivery.SendMessage(sms_request(PHONE, text="Your code is 4821"))).message
        assert ok.status == common_pb2.MESSAGE_STATUS_SENT
        submit = sim.submits()[0]
        assert (submit.dest, submit.registered_delivery, submit.data_coding) == ("79991234567", 1, 0)
        assert (submit.source, submit.source_ton, submit.source_npi) == ("otpgate", 5, 0)
        # A receipt in TLVs (receipted_message_id, message_state), answered once it is applied.
        await sim.send("receipt", submit.message_id, "DELIVRD", "000", "tlv")
        assert (await sim.expect("receipt_answered"))[1] == "0"
        get = delivery_pb2.GetMessageRequest(client_id="shop", id=ok.id)
        delivered = (await delivery.GetMessage(get)).message
        assert delivered.status == common_pb2.MESSAGE_STATUS_DELIVERED and delivered.HasField("delivered_time")

        bad = (await delivery.SendMessage(sms_request("+79991234568", text="Your code is 4822"))).message
        await sim.send("receipt", sim.submits()[1].message_id, "UNDELIV", "012", "text")  # receipt text only
        await sim.expect("receipt_answered")
        failed = (await delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=bad.id))).message
        assert failed.status == common_pb2.MESSAGE_STATUS_FAILED
        assert failed.failure_reason == common_pb2.FAILURE_REASON_SMS_FAILED
        doc = await engine_of(stack).store.get(bad.id)
        assert doc is not None and doc.sms_status == "UNDELIV:err=012" and doc.sms_provider == "smpp"
    assert "s3cret" not in captured_logs.text() and "4821" not in captured_logs.text()


async def test_throttling_is_retried_later_and_a_bad_destination_fails_for_good(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, sim: SmppSim
) -> None:
    overrides = smpp_env(sim, OTPGATE_SMPP_THROTTLE_BACKOFF="0")
    async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
        delivery, _ = stubs(stack)
        await sim.expect("bind")
        await sim.send("answer", "0x58")  # ESME_RTHROTTLED
        throttled = (await delivery.SendMessage(sms_request(PHONE))).message
        assert throttled.status == common_pb2.MESSAGE_STATUS_QUEUED
        doc = await engine_of(stack).store.get(throttled.id)
        assert doc is not None and doc.sms_error == "ESME_RTHROTTLED"
        clock.advance(3)
        assert await engine_of(stack).dispatch_due_once() == 1
        again = (await delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=throttled.id))).message
        assert again.status == common_pb2.MESSAGE_STATUS_SENT and again.attempts == 2

        await sim.send("answer", "0x0b")  # ESME_RINVDSTADR
        invalid = (await delivery.SendMessage(sms_request("+79991234568"))).message
        assert invalid.status == common_pb2.MESSAGE_STATUS_FAILED
        assert invalid.failure_reason == common_pb2.FAILURE_REASON_SMS_FAILED
        assert [s.status for s in sim.submits()] == [0x58, 0, 0x0B]


async def test_enquire_link_keeps_a_quiet_bind_alive(database: AsyncDatabase[Document], sim: SmppSim) -> None:
    async with provider(database, sim, enquire_link_interval=0.1) as smpp:
        await sim.expect("bind")
        for _ in range(3):
            await sim.expect("enquire_link", timeout=5)
        assert smpp.link.state is LinkState.BOUND and smpp.link.binds == 1


async def test_a_drop_mid_traffic_loses_and_doubles_nothing(database: AsyncDatabase[Document], sim: SmppSim) -> None:
    async with provider(database, sim, window=1) as smpp:
        await sim.expect("bind")
        await sim.send("drop-on-submit", 4)  # the 4th submit is never answered: the connection drops
        phones = [f"+7999123450{n}" for n in range(8)]
        sent = await asyncio.gather(
            *(smpp.send(f"01JDROP{n}", p, f"Code {n}", "otpgate") for n, p in enumerate(phones))
        )
        assert len(sim.seen("dropped")) == 1 and smpp.link.binds == 2
        answered = [s for s in sim.submits() if s.message_id in sim.answered()]
        assert sorted(s.dest for s in answered) == sorted(p.lstrip("+") for p in phones)  # each once
        assert {x.provider_id for x in sent} == {s.message_id for s in answered}
        assert len(sim.submits()) == 9  # the dropped one, sent again after the new bind


async def test_the_window_bounds_outstanding_submits(database: AsyncDatabase[Document], sim: SmppSim) -> None:
    async with provider(database, sim, window=3) as smpp:
        await sim.expect("bind")
        await sim.send("hold")
        sends = [asyncio.create_task(smpp.send(f"01JWIN{n}", f"+7999123460{n}", "Code", "otpgate")) for n in range(7)]
        assert (await sim.expect("held"))[1] == "1"
        await sim.expect("held")
        assert (await sim.expect("held"))[1] == "3"
        while smpp.link.waiting_for_window < 4:  # noqa: ASYNC110 - the other four queue for a slot
            await asyncio.sleep(0)
        assert smpp.link.outstanding == 3 and len(sim.submits()) == 0
        await sim.send("release")
        await asyncio.gather(*sends)
        assert max(int(w[1]) for w in sim.seen("held")) == 3
        assert len(sim.answered()) == 7


async def test_the_tps_limit_paces_submits(database: AsyncDatabase[Document], sim: SmppSim) -> None:
    start = 1000.0
    now = [start]
    woke: list[float] = []

    async def sleep(seconds: float) -> None:
        # Concurrent sleepers: time moves to the latest wake-up asked for, never adds up.
        now[0] = max(now[0], now[0] + seconds)
        woke.append(now[0] - start)
        await asyncio.sleep(0)

    link = SmppLink(settings(sim, tps=4.0, window=10).link, _no_receipts, now=lambda: now[0], sleep=sleep)
    async with provider(database, sim, link=link) as smpp:
        assert await smpp.link.wait_bound(10)
        await asyncio.gather(*(smpp.send(f"01JTPS{n}", f"+7999123470{n}", "Code", "otpgate") for n in range(9)))
        # 9 submits at 4/s: the first at once, then one every 0.25 s.
        assert sorted(woke) == pytest.approx([0.25 * k for k in range(1, 9)])
        assert now[0] - start == pytest.approx(2.0)
        assert len(sim.answered()) == 9


async def test_gsm7_ucs2_and_long_texts_arrive_whole(database: AsyncDatabase[Document], sim: SmppSim) -> None:
    cases = {
        "+79991234501": "Your code is 4821, not @£$ [€]",  # GSM 03.38 with extension characters
        "+79991234502": "Ваш код 4821",
        "+79991234503": "A long GSM text, with an escaped € in every sentence. " * 6,
        "+79991234504": "Длинное сообщение на кириллице, которое не помещается в одну SMS. " * 2,
    }
    async with provider(database, sim) as smpp:
        await sim.expect("bind")
        parts = {p: (await smpp.send(f"01JTXT{p[-1]}", p, text, "otpgate")).parts for p, text in cases.items()}
    assert parts == {"+79991234501": 1, "+79991234502": 1, "+79991234503": 3, "+79991234504": 2}
    got = {dest: (n, coding, text) for dest, n, coding, text in taken_texts(sim)}
    for phone, text in cases.items():
        coding = 0 if phone in ("+79991234501", "+79991234503") else 8
        assert got[phone.lstrip("+")] == (parts[phone], coding, text)
    long = [s for s in sim.submits() if s.dest == "79991234503"]
    assert all(s.esm_class & 0x40 for s in long) and [s.short_message[5] for s in long] == [1, 2, 3]


async def test_a_message_retried_after_a_refused_part_never_sends_a_part_twice(
    database: AsyncDatabase[Document], sim: SmppSim
) -> None:
    text = "x" * 400  # three parts
    async with provider(database, sim) as smpp:
        await sim.expect("bind")
        await sim.send("answer", "0")
        await sim.send("answer", "0x14")  # ESME_RMSGQFUL on the second part
        with pytest.raises(SmsError) as full:
            await smpp.send("01JPART", PHONE, text, "otpgate")
        assert full.value.code == "ESME_RMSGQFUL" and full.value.retry_after == 3.0
        sent = await smpp.send("01JPART", PHONE, text, "otpgate")
        assert sent.parts == 3 and sent.provider_id == sim.submits()[0].message_id
    taken = [s for s in sim.submits() if s.status == 0]
    assert [s.short_message[5] for s in taken] == [1, 2, 3]
    assert taken_texts(sim) == [("79991234567", 3, 0, text)]


async def test_receipts_for_every_part_decide_a_long_message_and_status_answers_the_poller(
    database: AsyncDatabase[Document], sim: SmppSim
) -> None:
    reports: list[tuple[str, bool, str]] = []

    async def sink(provider_id: str, delivered: bool, code: str) -> bool:
        reports.append((provider_id, delivered, code))
        return True

    async with provider(database, sim) as smpp:
        smpp.report_to(sink)
        await sim.expect("bind")
        sent = await smpp.send("01JLONG", PHONE, "x" * 200, "otpgate")
        first, second = (s.message_id for s in sim.submits())
        assert await smpp.status(sent.provider_id, PHONE) == (PENDING, "no_receipt")
        await sim.send("receipt", second, "DELIVRD", "000", "both")
        await sim.expect("receipt_answered")
        assert reports == [] and (await smpp.status(sent.provider_id, PHONE))[0] == PENDING
        await sim.send("receipt", first, "DELIVRD", "000", "both")
        await sim.expect("receipt_answered")
        assert reports == [(first, True, "DELIVRD")]
        assert await smpp.status(sent.provider_id, PHONE) == (DELIVERED, "DELIVRD")

        other = await smpp.send("01JLONG2", "+79991234568", "y" * 200, "otpgate")
        await sim.send("receipt", sim.submits()[2].message_id, "EXPIRED", "000", "text")
        await sim.expect("receipt_answered")
        assert reports[-1] == (other.provider_id, False, "EXPIRED")
        assert (await smpp.status(other.provider_id, PHONE))[0] == FAILED


async def _no_receipts(message: Any) -> int:
    return 0

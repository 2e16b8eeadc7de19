"""The code engine against the real dev database: generation, single use, attempts, expiry,
concurrency, sealing."""

from __future__ import annotations

import asyncio
import re

import pytest

from services.core.clock import ManualClock
from services.verification.codes import (
    CheckOutcome,
    SendRefusal,
    View,
    generate_code,
    is_code_shaped,
    normalize_typed_code,
)
from services.verification.store import APPROVED, CANCELED, EXPIRED, MAX_ATTEMPTS_REACHED, PENDING, Store
from services.verification.verify import Verifier
from tests.unit.verification.conftest import start_request


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


async def issue(verifier: Verifier, **fields: object) -> tuple[View, str]:
    issued = await verifier.issue(verifier.validate_start(start_request(**fields)))
    assert issued is not None
    record, code = issued
    view = await verifier.engine.load(record["_id"])
    assert view is not None
    return view, code


async def load(verifier: Verifier, view: View) -> View:
    fresh = await verifier.engine.load(view.id)
    assert fresh is not None
    return fresh


def test_generated_codes_are_digits_of_the_asked_length_and_vary() -> None:
    for length in range(4, 11):
        codes = {generate_code(length) for _ in range(200)}
        assert all(len(c) == length and c.isdigit() for c in codes)
        assert len(codes) > 150  # not a constant, not a tiny space
    with pytest.raises(ValueError):
        generate_code(3)
    with pytest.raises(ValueError):
        generate_code(11)
    # Leading zeros survive (the whole space is used).
    assert any(generate_code(4).startswith("0") for _ in range(2000))


def test_typed_code_normalisation() -> None:
    assert normalize_typed_code("123 456") == "123456"
    assert normalize_typed_code("12-34-56") == "123456"
    assert is_code_shaped("0000")
    assert not is_code_shaped("123")
    assert not is_code_shaped("12345678901")
    assert not is_code_shaped("12a456")
    assert not is_code_shaped("١٢٣٤٥٦")  # non-ASCII digits


async def test_correct_code_approves_once_and_only_once(verifier: Verifier) -> None:
    view, code = await issue(verifier)
    first = await verifier.engine.check(view, code)
    assert first.outcome is CheckOutcome.APPROVED and first.view.status == APPROVED
    assert (await verifier.engine.check(first.view, code)).outcome is CheckOutcome.FINAL
    # A stale copy read before the approval cannot approve a second time either.
    assert (await verifier.engine.check(view, code)).outcome is CheckOutcome.FINAL
    assert (await load(verifier, view)).status == APPROVED


async def test_brute_force_stops_at_five_checks(verifier: Verifier) -> None:
    view, code = await issue(verifier)
    seen = []
    for _ in range(5):
        result = await verifier.engine.check(await load(verifier, view), wrong(code))
        seen.append((result.outcome, result.attempts_left))
    assert seen == [
        (CheckOutcome.WRONG_CODE, 4),
        (CheckOutcome.WRONG_CODE, 3),
        (CheckOutcome.WRONG_CODE, 2),
        (CheckOutcome.WRONG_CODE, 1),
        (CheckOutcome.EXHAUSTED, 0),
    ]
    after = await load(verifier, view)
    assert after.status == MAX_ATTEMPTS_REACHED and after.record["status"] == MAX_ATTEMPTS_REACHED
    # The right code is useless after the fifth wrong one, even through a copy read earlier.
    assert (await verifier.engine.check(after, code)).outcome is CheckOutcome.FINAL
    assert (await verifier.engine.check(view, code)).outcome is CheckOutcome.EXHAUSTED
    assert (await load(verifier, view)).status == MAX_ATTEMPTS_REACHED


async def test_hundred_concurrent_correct_checks_approve_exactly_once(verifier: Verifier) -> None:
    view, code = await issue(verifier)
    results = await asyncio.gather(*(verifier.engine.check(view, code) for _ in range(100)))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(CheckOutcome.APPROVED) == 1
    assert CheckOutcome.WRONG_CODE not in outcomes
    after = await load(verifier, view)
    assert after.status == APPROVED and after.record["status"] == APPROVED
    assert after.attempts <= 5  # no more comparisons than the budget, however many raced
    assert "code" not in after.record


async def test_concurrent_wrong_checks_never_exceed_the_attempt_budget(verifier: Verifier) -> None:
    view, code = await issue(verifier)
    results = await asyncio.gather(*(verifier.engine.check(view, wrong(code)) for _ in range(30)))
    assert sum(r.counted_failure for r in results) == 5
    after = await load(verifier, view)
    assert after.status == MAX_ATTEMPTS_REACHED and after.attempts == 5
    assert "code" not in after.record
    # A right code racing wrong ones can never be the sixth comparison.
    view2, code2 = await issue(verifier, phone="+79991234500")
    mixed = await asyncio.gather(
        *(verifier.engine.check(view2, wrong(code2)) for _ in range(10)), verifier.engine.check(view2, code2)
    )
    after2 = await load(verifier, view2)
    # Every answered check took an attempt; once the record is final, no check takes one.
    answered = [r for r in mixed if r.counted_failure or r.outcome is CheckOutcome.APPROVED]
    assert len(answered) == after2.attempts <= 5
    approved = [r for r in mixed if r.outcome is CheckOutcome.APPROVED]
    assert len(approved) <= 1 and (after2.status == APPROVED) == bool(approved)


async def test_expired_code_is_rejected_while_the_document_still_exists(verifier: Verifier, clock: ManualClock) -> None:
    view, code = await issue(verifier, ttl={"seconds": 60})
    clock.advance(60)
    raw = await verifier.store.verifications.find_one({"_id": view.id})
    assert raw is not None and raw["status"] == PENDING  # nothing wrote EXPIRED yet
    stale = await load(verifier, view)
    assert stale.status == EXPIRED  # decided at read time
    result = await verifier.engine.check(stale, code)
    assert result.outcome is CheckOutcome.EXPIRED
    stored = await verifier.store.verifications.find_one({"_id": view.id})
    assert stored["status"] == EXPIRED and "code" not in stored


async def test_a_check_read_before_expiry_cannot_approve_after_it(verifier: Verifier, clock: ManualClock) -> None:
    view, code = await issue(verifier, ttl={"seconds": 60})
    clock.advance(59.999)
    read_in_time = await load(verifier, view)
    assert read_in_time.pending
    clock.advance(0.002)  # expiry passes between the read and the decision
    result = await verifier.engine.check(read_in_time, code)
    assert result.outcome is CheckOutcome.EXPIRED
    assert (await load(verifier, view)).status == EXPIRED


async def test_racing_final_states_have_one_winner_whose_state_the_record_keeps(verifier: Verifier) -> None:
    view, code = await issue(verifier)
    statuses = [APPROVED, CANCELED, EXPIRED, MAX_ATTEMPTS_REACHED] * 10
    decisions = await asyncio.gather(*(verifier.engine.decide(view.id, status) for status in statuses))
    winners = [(status, after) for status, (won, after) in zip(statuses, decisions, strict=True) if won]
    assert len(winners) == 1
    (status, answered), stored = winners[0], await load(verifier, view)
    assert answered is not None and answered.status == status and answered.record["status"] == status
    assert stored.status == status and stored.record["pending_key"] == view.id and "code" not in stored.record
    # The losers read what the winner wrote.
    assert all(after is not None and after.status == status for won, after in decisions if not won)
    assert (await verifier.engine.check(stored, code)).outcome is not CheckOutcome.APPROVED or status == APPROVED


async def test_raw_collections_hold_no_plaintext_code_and_final_states_erase_the_sealed_code(
    verifier: Verifier, store: Store
) -> None:
    approved, code_a = await issue(verifier, phone="+79991234501", code_length=10)
    exhausted, code_b = await issue(verifier, phone="+79991234502", code_length=10)
    canceled, code_c = await issue(verifier, phone="+79991234503", code_length=10)
    pending, code_d = await issue(verifier, phone="+79991234504", code_length=10)
    everything = [
        doc for name in await store.database.list_collection_names() async for doc in store.database[name].find({})
    ]
    dump = repr(everything)
    for code in (code_a, code_b, code_c, code_d):
        assert code not in dump
    assert "79991234501" not in dump
    for doc in [d async for d in store.verifications.find({})]:
        assert isinstance(doc["code"], bytes) and re.fullmatch(r"k2:[0-9a-f]{64}", doc["code_hash"])

    await verifier.engine.check(approved, code_a)
    for _ in range(5):
        await verifier.engine.check(await load(verifier, exhausted), wrong(code_b))
    await verifier.cancel("client-a", canceled.id)
    after = {doc["_id"]: doc async for doc in store.verifications.find({})}
    for final_id in (approved.id, exhausted.id, canceled.id):
        assert "code" not in after[final_id]
        assert "phone" not in after[final_id]
        assert after[final_id]["pending_key"] == final_id
    assert verifier.engine.open_code(after[pending.id]) == code_d


async def test_sweeper_expires_lapsed_records_and_erases_their_codes(verifier: Verifier, clock: ManualClock) -> None:
    view, _ = await issue(verifier, ttl={"seconds": 30})
    assert await verifier.engine.sweep_lapsed() == 0
    clock.advance(31)
    assert await verifier.engine.sweep_lapsed() == 1
    stored = await verifier.store.verifications.find_one({"_id": view.id})
    assert stored["status"] == EXPIRED and "code" not in stored and "phone" not in stored


async def test_resend_reservation_honours_cooldown_and_send_budget(verifier: Verifier, clock: ManualClock) -> None:
    view, code = await issue(verifier, ttl={"seconds": 3600})
    too_soon = await verifier.engine.reserve_send(view, 30)
    assert too_soon.refusal is SendRefusal.TOO_SOON and 29 <= too_soon.retry_after <= 30
    for expected in range(2, 6):
        clock.advance(30)
        before = await load(verifier, view)
        reserved = await verifier.engine.reserve_send(before, 30)
        assert reserved.refusal is None and reserved.number == expected
        assert verifier.engine.open_code(reserved.view.record) == code  # the same code every time
    clock.advance(30)
    spent = await verifier.engine.reserve_send(await load(verifier, view), 30)
    assert spent.refusal is SendRefusal.MAX_SENDS
    # A send refused downstream is given back (the record is again as before it), so delivery's
    # refusals do not burn the budget.
    await verifier.engine.undo_send(before, 5)
    assert (await load(verifier, view)).send_count == 4
    again = await verifier.engine.reserve_send(await load(verifier, view), 30)
    assert again.refusal is None and again.number == 5


async def test_racing_resends_send_once(verifier: Verifier, clock: ManualClock) -> None:
    view, _ = await issue(verifier, ttl={"seconds": 3600})
    clock.advance(31)
    results = await asyncio.gather(*(verifier.engine.reserve_send(view, 30) for _ in range(20)))
    assert sum(r.refusal is None for r in results) == 1
    assert (await load(verifier, view)).send_count == 2


async def test_one_pending_verification_per_client_and_number(verifier: Verifier, clock: ManualClock) -> None:
    view, _ = await issue(verifier)
    assert await verifier.issue(verifier.validate_start(start_request())) is None
    # Another client, or another number, gets its own.
    await issue(verifier, client_id="client-b")
    await issue(verifier, phone="+79991234599")
    # Once the first is final, the number is free again for that client.
    await verifier.cancel("client-a", view.id)
    await issue(verifier)


async def test_a_record_whose_attempts_and_sends_were_slots_adopts_them_once(
    verifier: Verifier, clock: ManualClock
) -> None:
    view, code = await issue(verifier, ttl={"seconds": 3600})
    # As records were written while attempts and sends were documents of code_slots.
    await verifier.store.verifications.update_one(
        {"_id": view.id}, {"$unset": {"attempts": "", "sends": "", "last_send": ""}}
    )
    owner = f"verifications:{view.id}"
    sent_at = clock.now()
    await verifier.store.slots.insert_many(
        [
            {"_id": f"{owner}:attempt:1", "owner": owner, "kind": "attempt", "n": 1, "at": sent_at},
            {"_id": f"{owner}:attempt:2", "owner": owner, "kind": "attempt", "n": 2, "at": sent_at},
            {"_id": f"{owner}:send:1", "owner": owner, "kind": "send", "n": 1, "at": sent_at, "message_id": "m1"},
            {"_id": f"{owner}:send:2", "owner": owner, "kind": "send", "n": 2, "at": sent_at, "message_id": "m2"},
        ]
    )
    assert await verifier.engine.adopt_slots() == 1
    assert await verifier.engine.adopt_slots() == 0  # once
    adopted = await load(verifier, view)
    assert (adopted.attempts, adopted.send_count, adopted.last_message_id) == (2, 2, "m2")
    # Three attempts are left, not five.
    results = [await verifier.engine.check(await load(verifier, view), wrong(code)) for _ in range(3)]
    assert [r.outcome for r in results] == [CheckOutcome.WRONG_CODE, CheckOutcome.WRONG_CODE, CheckOutcome.EXHAUSTED]
    assert (await load(verifier, view)).status == MAX_ATTEMPTS_REACHED

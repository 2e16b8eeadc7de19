"""Housekeeping: lapsed codes are expired (sealed codes erased), old records purged after retention."""

from __future__ import annotations

from datetime import timedelta

from services.core.clock import ManualClock
from services.core.counters import Full
from services.verification.confirm import Confirmer
from services.verification.store import Store
from services.verification.sweeper import Sweeper
from services.verification.verify import Verifier
from tests.unit.verification.conftest import start_request


async def test_sweep_expires_then_purges_after_retention(
    verifier: Verifier, confirmer: Confirmer, store: Store, clock: ManualClock
) -> None:
    sweeper = Sweeper(store, verifier, confirmer, retention_days=30, interval=60)
    issued = await verifier.issue(verifier.validate_start(start_request(ttl={"seconds": 60})))
    assert issued is not None
    record, _ = issued
    await verifier.engine.record_send(verifier.engine.view(record), {"message_id": "m1", "channel": 2})  # sent
    assert not isinstance(await store.failed_check_counter(clock, 5).reserve("bi"), Full)
    assert (await sweeper.sweep_once())["verifications_expired"] == 0
    clock.advance(61)
    counts = await sweeper.sweep_once()
    assert counts["verifications_expired"] == 1
    stored = await store.verifications.find_one({"_id": record["_id"]})
    assert stored["status"] == "EXPIRED" and "code" not in stored
    # Still readable (final states stay until retention ends), then gone with everything beside it.
    clock.advance(timedelta(days=29))
    await sweeper.sweep_once()
    assert await store.verifications.find_one({"_id": record["_id"]}) is not None
    assert [d async for d in store.failed_checks.find({})] == []  # failed checks only live for the window
    clock.advance(timedelta(days=1, seconds=1))  # 30 days after its final state
    await sweeper.sweep_once()
    assert await store.verifications.find_one({"_id": record["_id"]}) is None

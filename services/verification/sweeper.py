"""Periodic housekeeping: expire lapsed codes (erasing sealed ones), finish confirmation
follow-ups, purge records past retention. TTL indexes would do the purge where the server
has them; the dev database has none, and expiry is always decided at read time anyway."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from services.core.logging import get_logger
from services.verification.confirm import Confirmer
from services.verification.store import Store
from services.verification.verify import Verifier

log = get_logger(__name__)


class Sweeper:
    def __init__(self, store: Store, verifier: Verifier, confirmer: Confirmer, retention_days: int, interval: float):
        self.store = store
        self.verifier = verifier
        self.confirmer = confirmer
        self.retention = timedelta(days=retention_days)
        self.interval = interval

    async def sweep_once(self) -> dict[str, int]:
        counts = {
            "verifications_expired": await self.verifier.engine.sweep_lapsed(),
            "confirmations_expired": await self.confirmer.engine.sweep_lapsed(),
            "followups_retried": await self.confirmer.retry_followups(),
            "purged": await self.store.purge(self.verifier.clock.now(), self.retention),
        }
        if any(counts.values()):
            log.info("verification_sweep", **counts)
        return counts

    async def run(self) -> None:
        while True:
            await self.sweep_once()
            await asyncio.sleep(self.interval)

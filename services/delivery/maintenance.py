"""The background work of a delivery replica: the dispatcher pass and the purge.

app.py runs both loops in every replica with OTPGATE_DELIVERY_DISPATCHER on (the default). A
pass dispatches the due messages it claims, writes EXPIRED on open messages past their ttl, asks
for SMS delivery reports and posts due webhooks; everything it touches is taken under a claim, so
replicas share the work without coordination. The purge deletes what has outlived its retention
(see each step); any replica may run it, and running it twice deletes nothing more.
"""

from __future__ import annotations

from datetime import timedelta

from services.core.clock import Clock
from services.delivery.claims import Claims
from services.delivery.dispatch import Dispatcher, at_most
from services.delivery.fraud import FraudGuard
from services.delivery.limits import Limiter
from services.delivery.reports import SmsReports
from services.delivery.settings import EngineSettings
from services.delivery.sms import SandboxSmsProvider
from services.delivery.store import Store
from services.delivery.webhooks import WebhookOutbox


class Maintenance:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        reports: SmsReports,
        webhooks: WebhookOutbox,
        limiter: Limiter,
        fraud: FraudGuard,
        claims: Claims,
        sandbox: SandboxSmsProvider | None,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.reports = reports
        self.webhooks = webhooks
        self.limiter = limiter
        self.fraud = fraud
        self.claims = claims
        self.sandbox = sandbox
        self.clock = clock
        self.settings = settings

    async def dispatch_due_once(self) -> int:
        """One pass of the dispatcher: due messages, expiries, SMS reports, webhooks. Returns messages tried."""
        claimed = await self.dispatcher.claim_due()
        # Attempts wait on the database, the directory and the bots: several at once, as inline sends are.
        await at_most(self.settings.dispatch_concurrency, [self.dispatcher.run_claimed(r, c) for r, c in claimed])
        await self.expire_due_once()
        await self.reports.poll_once()
        await self.webhooks.deliver_due_once()
        return len(claimed)

    async def expire_due_once(self) -> int:
        """Write EXPIRED on open messages past their ttl (reads already show them expired)."""
        count = 0
        for record in await self.store.expired_open(self.clock.now(), self.settings.batch):
            claim = await self.dispatcher.claim(record)
            if claim is None:
                continue
            fresh = await self.store.get(record.id)
            if fresh is None:
                await self.claims.release(claim)
                continue
            await self.dispatcher.run_claimed(fresh, claim)
            count += 1
        return count

    async def purge_once(self) -> None:
        now = self.clock.now()
        # Sealed texts and numbers: text_retention after the end (longer while SMS reports are asked for).
        await self.store.purge_texts(now)
        # Messages no longer open created more than message_retention ago, and idempotency keys as old.
        await self.store.purge_messages(now - timedelta(seconds=self.settings.message_retention))
        oldest_day = (now - timedelta(days=self.settings.usage_retention_days)).date().isoformat()
        await self.store.purge_usage(oldest_day)  # usage records of days before the retention
        await self.limiter.purge()  # rate-limit counters whose windows no longer count
        await self.fraud.purge()  # the guard's counters, cases and events past their time
        await self.claims.purge(now - timedelta(days=1))  # released claims after a day, any after two
        await self.webhooks.purge(now - timedelta(days=30))  # finished webhook events
        if self.sandbox is not None:
            await self.sandbox.purge(now - timedelta(days=7))  # the sandbox SMS inbox

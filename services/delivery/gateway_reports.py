"""Delivery reports of the Telegram Gateway, as the edge receives them at GATEWAY_REPORT_PATH.

A report is a RequestStatus posted to our callback_url. It is applied only if it is Telegram's:
the message is found by the request id (`provider_id` of a Gateway message), the signature is
checked with that message's token (the client's own or the service's), in constant time, and a
report stamped more than report_max_age from our clock is refused (tg_gateway.py
`check_report`). Statuses only move forward, so a replay changes nothing:

    sent -> delivered -> read     SENT -> DELIVERED -> READ (delivered_at, read_at)
    expired (not delivered)       SENT -> EXPIRED (TTL_EXPIRED); its fee refunded
    revoked                       nothing more (CancelMessage made it CANCELED, or it climbed)

A message that climbed past its revoked code (dispatch.py `_fall_back`) is still found by that
request id (`revoked_request_id`); its reports then only bring a refund, if Telegram makes one.

A refund (`is_refunded`) sets the message's cost and its usage record's to 0, once.

A report is applied under the message's claim. The Gateway reports a delivery at once, while the
attempt that sent the code may still hold it: a busy message is waited for (up to 1 s) before the
answer is ABORTED MESSAGE_BUSY (HTTP 409), which Telegram posts again later.

Without a callback_url (none configured) the same statuses are asked for: a SENT or DELIVERED
Gateway message is polled with checkVerificationStatus on the SMS report schedule (`poll`).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from otpgate.common.v1 import common_pb2

from services.core.clock import Clock
from services.core.errors import aborted, invalid_argument, not_found, permission_denied
from services.core.logging import get_logger
from services.delivery import metrics
from services.delivery.dispatch import Dispatcher
from services.delivery.gateway_leg import GatewayLeg
from services.delivery.notify import StatusNotifier
from services.delivery.record import DELIVERED, EPOCH, EXPIRED, READ, SENT, MessageChanges, MessageRecord
from services.delivery.store import Store
from services.delivery.tg_gateway import GatewayFailure, GatewayStatus, check_report

log = get_logger(__name__)

# A report that finds its message's claim held tries this often in all, this far apart (about 1 s).
_BUSY_TRIES = 10
_BUSY_WAIT = 0.1
_RANK: dict[int, int] = {SENT: 1, DELIVERED: 2, READ: 3}


class GatewayReports:
    def __init__(
        self,
        store: Store,
        gateway: GatewayLeg,
        dispatcher: Dispatcher,
        notifier: StatusNotifier,
        clock: Clock,
        poll_interval: float = 30.0,
    ) -> None:
        self.poll_interval = poll_interval
        self.store = store
        self.gateway = gateway
        self.dispatcher = dispatcher
        self.notifier = notifier
        self.clock = clock

    async def apply(self, body: bytes, timestamp: str, signature: str) -> None:
        try:
            status = GatewayStatus.parse(json.loads(body))
        except (ValueError, UnicodeDecodeError, GatewayFailure):
            metrics.gateway_reports_total.labels("malformed").inc()
            raise invalid_argument([("body", "is not a RequestStatus object")]) from None
        record = await self.store.gateway_message(status.request_id)
        if record is None:
            metrics.gateway_reports_total.labels("unknown").inc()
            raise not_found("Telegram Gateway request", "GATEWAY_REQUEST_NOT_FOUND")
        why = check_report(
            await self.gateway.token_for(record),
            timestamp,
            signature,
            body,
            self.clock.now().timestamp(),
            self.gateway.settings.report_max_age,
        )
        if why:
            metrics.gateway_reports_total.labels("refused").inc()
            log.warning("gateway_report_refused", message_id=record.id, reason=why)
            raise permission_denied("GATEWAY_REPORT_REFUSED", f"the report is refused: {why}")
        for attempt in range(_BUSY_TRIES):
            if attempt:
                # Held by the attempt that sent the code (the Gateway reports at once, while that
                # attempt still writes its outcome) or by another report: released within moments,
                # so waited for here rather than answered busy and posted again seconds later.
                await asyncio.sleep(_BUSY_WAIT)
                record = await self.store.get(record.id) or record
            if await self._apply(record, status):
                metrics.gateway_reports_total.labels("applied").inc()
                return
        raise aborted("the message is being changed right now; send the report again", reason="MESSAGE_BUSY")

    async def poll(self, record: MessageRecord) -> None:
        """Asks the Gateway for the status a report would have brought (no callback_url)."""
        client = self.gateway.client
        if client is None or not record.provider_id:
            return
        try:
            status = await client.check_verification_status(await self.gateway.token_for(record), record.provider_id)
        except GatewayFailure:
            status = None
        await self._apply(record, status, poll=True)

    async def _apply(self, record: MessageRecord, status: GatewayStatus | None, poll: bool = False) -> bool:
        claim = await self.dispatcher.claim(record)
        if claim is None:
            return False
        fresh = await self.store.get(record.id) or record
        changes: MessageChanges = {"lease_until": EPOCH, "claim_seq": claim.seq}
        if status is None:
            status = GatewayStatus(request_id=record.provider_id or "", cost=0.0)
        if status.request_id and status.request_id == fresh.revoked_request_id:
            # The code revoked when the message climbed: only a refund of it still matters.
            if status.is_refunded and not fresh.refunded:
                changes.update({"refunded": True, "revoked_cost_micros": 0})
                await self.store.refund_usage(record.id)
            await self.store.write(record.id, changes)
            await self.dispatcher.claims.release(claim)
            return True
        at = datetime.fromtimestamp(status.delivery_time, UTC) if status.delivery_time else self.clock.now()
        target = {"delivered": DELIVERED, "read": READ}.get(status.delivery)
        if target is not None and _RANK.get(fresh.status, 9) < _RANK[target]:
            changes.update({"status": target, "updated_at": self.clock.now(), "fallback_at": None})
            if fresh.delivered_at is None:
                changes["delivered_at"] = at
            if target == READ:
                changes["read_at"] = at
        elif status.delivery == "expired" and fresh.status == SENT:
            changes.update(
                {
                    "status": EXPIRED,
                    "failure_reason": common_pb2.FAILURE_REASON_TTL_EXPIRED,
                    "updated_at": at,
                    "fallback_at": None,
                }
            )
        if status.is_refunded and not fresh.refunded:
            changes.update({"refunded": True, "cost_micros": 0})
            await self.store.refund_usage(record.id)
        if poll:
            now = self.clock.now()
            done = changes.get("status", fresh.status) not in (SENT, DELIVERED)
            late = fresh.sms_poll_until is not None and now >= fresh.sms_poll_until
            changes["sms_poll_at"] = None if done or late else now + timedelta(seconds=self.poll_interval)
        await self.store.write(record.id, changes)
        await self.dispatcher.claims.release(claim)
        if "status" in changes:
            await self.notifier.changed(fresh.updated(changes))
        return True

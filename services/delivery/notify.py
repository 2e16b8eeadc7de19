"""What follows a message's change of status: the metric, its usage record, the client's webhook, a log line.

Called after the change is written and its claim released. The usage record (one per message,
keyed by the message id, with the channel that delivered it and what that cost) is written when
the message is first SENT, DELIVERED or READ; a repeat is refused by its `_id`. A webhook event
(`<message id>:<STATUS>`) is queued in the outbox (webhooks.py) for SENT, DELIVERED, READ, FAILED,
EXPIRED and CANCELED when the message has a callback_url.

A message whose Gateway code was revoked on a timeout and that climbed (dispatch.py `_fall_back`)
keeps the Gateway's usage record and gets one more, `<message id>:<channel>`, for the leg that
carried it; that leg's events end in `:<CHANNEL>`, so its SENT reaches the client as well.
"""

from __future__ import annotations

from services.core.clock import Clock
from services.core.logging import get_logger
from services.delivery import metrics
from services.delivery.record import (
    CANCELED,
    CHANNEL_NAMES,
    DELIVERED,
    EXPIRED,
    FAILED,
    GATEWAY,
    READ,
    SENT,
    SMS,
    STATUS_NAMES,
    MessageRecord,
)
from services.delivery.settings import EngineSettings
from services.delivery.store import Store
from services.delivery.webhooks import WebhookOutbox, event_payload

log = get_logger(__name__)


class StatusNotifier:
    def __init__(self, store: Store, webhooks: WebhookOutbox, clock: Clock, settings: EngineSettings) -> None:
        self.store = store
        self.webhooks = webhooks
        self.clock = clock
        self.settings = settings

    async def changed(self, record: MessageRecord) -> None:
        status = record.status
        channel = record.channel or record.requested_channel
        metrics.messages_total.labels(STATUS_NAMES[status], CHANNEL_NAMES.get(channel, ""), record.bot_id).inc()
        now = self.clock.now()
        next_leg = bool(record.revoked_request_id) and channel != GATEWAY
        if status in (SENT, DELIVERED, READ) and record.sent_at and record.attempts:
            if status == SENT or record.sms_provider == "sandbox":
                metrics.accept_to_sent_seconds.observe(max(0.0, (record.sent_at - record.created_at).total_seconds()))
            day = record.sent_at.strftime("%Y-%m-%d")
            cost = record.cost_micros or 0
            # A message that climbed past a revoked Gateway code has a second record, of its next leg.
            usage_id = f"{record.id}:{channel}" if next_leg else record.id
            if await self.store.count_usage(
                usage_id,
                record.client_id,
                day,
                channel,
                channel == SMS and record.billed,
                record.sms_parts or 1,
                cost,
            ):
                metrics.delivered_cost_total.labels(CHANNEL_NAMES.get(channel, "")).inc(cost / 1_000_000)
        if status in (SENT, DELIVERED, READ, FAILED, EXPIRED, CANCELED) and record.callback_url:
            message = record.to_proto(now)
            await self.webhooks.enqueue(
                record.client_id,
                record.callback_url,
                f"{record.id}:{STATUS_NAMES[status]}" + (f":{CHANNEL_NAMES[channel]}" if next_leg else ""),
                event_payload(message, record.client_id, now),
            )
        log.info(
            "message_status",
            message_id=record.id,
            status=STATUS_NAMES[status],
            channel=CHANNEL_NAMES.get(channel, ""),
            bot=record.bot_id,
        )

"""The Telegram Gateway leg: a code through Telegram's Gateway, paid once, sent at most once.

One try, under the message's claim:

1. A message with no Gateway request yet asks checkSendAbility (it charges, and says whether the
   number has a Telegram account). A refusal, or no answer, ends the leg: nothing reached the
   person, so the ladder may go on (ladder.py).
2. Before the send, the request id and `gateway_state: "sending"` are written to the message: from
   here on a send may have gone out, and every later try of this message comes back to this leg.
3. sendVerificationMessage with that request_id (free: the check paid), the code, a ttl within
   Telegram's 30-3600 s taken from the message's own, our callback_url and the message id as payload.
4. A try that finds the message "sending" (an earlier try timed out, or its process died) first asks
   checkVerificationStatus: a delivery status means the code went out (SENT, DELIVERED or READ as
   reported); none means it did not, and the send is made again under the same request_id (free,
   and refused by the Gateway if it was in fact made). A send refused for good after the check
   ends the leg; one without an answer leaves the message to be tried again here, never elsewhere.

The token is the client's own (its policy, sealed) or the service's (configuration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from services.core.clock import Clock
from services.core.crypto import Keyring
from services.core.logging import get_logger
from services.delivery import metrics
from services.delivery.message_crypto import MessageCrypto
from services.delivery.policy import PolicyStore
from services.delivery.record import DELIVERED, GATEWAY, READ, SENT, MessageChanges, MessageRecord
from services.delivery.store import Store
from services.delivery.tg_gateway import GatewayFailure, GatewaySettings, GatewayStatus, TelegramGatewayClient

log = get_logger(__name__)

ADMITTED, SENDING, SENT_STATE = "admitted", "sending", "sent"
TTL_MIN, TTL_MAX = 30, 3600


@dataclass(frozen=True)
class GatewayTry:
    """What one try decided: `sent` (the write), else `refused` (the leg is over, nothing was
    sent) or neither (the outcome is not known yet: try again after `retry_after`)."""

    sent: MessageChanges | None = None
    refused: str = ""
    retry_after: float | None = None
    written: MessageChanges = field(default_factory=MessageChanges)  # what the try wrote on the way


class GatewayLeg:
    def __init__(
        self,
        client: TelegramGatewayClient | None,
        store: Store,
        policies: PolicyStore,
        crypto: MessageCrypto,
        keyring: Keyring,
        clock: Clock,
        settings: GatewaySettings,
        poll_interval: float = 30.0,
        poll_for: float = 86400.0,
    ) -> None:
        self.poll_interval = poll_interval
        self.poll_for = poll_for
        self.client = client
        self.store = store
        self.policies = policies
        self.crypto = crypto
        self.keyring = keyring
        self.clock = clock
        self.settings = settings

    async def token_of(self, client_id: str) -> tuple[str, bool]:
        """(token, whether it is the client's own)."""
        own = (await self.policies.get(client_id)).gateway_token(self.keyring)
        return (own, True) if own else (self.settings.token, False)

    async def token_for(self, record: MessageRecord) -> str:
        """The token a message went out with: its reports are signed, its status asked, with it."""
        if record.gateway_own_token:
            own = (await self.policies.get(record.client_id)).gateway_token(self.keyring)
            if own:
                return own
        return self.settings.token

    async def available(self, client_id: str) -> bool:
        return self.client is not None and bool((await self.token_of(client_id))[0])

    async def send(self, record: MessageRecord, e164: str) -> GatewayTry:
        if self.client is None:
            return GatewayTry(refused="GATEWAY_NOT_CONFIGURED")
        code = self.crypto.open_code(record)
        if not code and not record.gateway_code_length:
            return GatewayTry(refused="NO_CODE")
        token, own = await self.token_of(record.client_id)
        request_id = record.provider_id or ""
        written = MessageChanges()
        if record.gateway_state == SENDING and request_id:
            try:
                status = await self.client.check_verification_status(token, request_id)
            except GatewayFailure as failure:
                log.info("gateway_status_unknown", message_id=record.id, error=failure.error)
                return GatewayTry(retry_after=failure.retry_after)
            if status.delivery:
                return GatewayTry(sent=self._sent(record, status, own))
        else:
            try:
                checked = await self.client.check_send_ability(token, e164)
            except GatewayFailure as failure:
                metrics.gateway_calls_total.labels("checkSendAbility", failure.error).inc()
                log.info("gateway_unreachable", message_id=record.id, error=failure.error, definite=failure.definite)
                return GatewayTry(refused=failure.error)
            metrics.gateway_calls_total.labels("checkSendAbility", "ok").inc()
            request_id = checked.request_id
            written = MessageChanges(
                provider_id=request_id,
                gateway_state=SENDING,
                gateway_own_token=own,
                cost_micros=round(checked.cost * 1_000_000),
                channel=GATEWAY,
            )
            await self.store.write(record.id, written)
            record = record.updated(written)
        try:
            status = await self.client.send_verification_message(
                token,
                e164,
                code=code,
                code_length=record.gateway_code_length or 0,
                request_id=request_id,
                ttl=self._ttl(record),
                callback_url=self.settings.callback_url,
                payload=record.id,
            )
        except GatewayFailure as failure:
            metrics.gateway_calls_total.labels("sendVerificationMessage", failure.error).inc()
            if failure.error == "REQUEST_ID_ALREADY_USED" or not failure.definite:
                # It may have gone out (or did): the next try asks before anything else.
                log.info("gateway_send_uncertain", message_id=record.id, error=failure.error)
                return GatewayTry(retry_after=failure.retry_after, written=written)
            log.warning("gateway_send_refused", message_id=record.id, error=failure.error)
            return GatewayTry(refused=failure.error, written=written)
        metrics.gateway_calls_total.labels("sendVerificationMessage", "ok").inc()
        return GatewayTry(sent=self._sent(record, status, own), written=written)

    def _sent(self, record: MessageRecord, status: GatewayStatus, own: bool) -> MessageChanges:
        now = self.clock.now()
        changes: MessageChanges = {
            "status": SENT,
            "channel": GATEWAY,
            "gateway_state": SENT_STATE,
            "gateway_own_token": own,
            "provider_id": status.request_id,
            "attempts": record.attempts + 1,
            "sent_at": now,
            "failure_reason": 0,
            "bot_id": "",
        }
        changes["cost_micros"] = record.cost_micros if record.cost_micros is not None else round(status.cost * 1e6)
        if not self.settings.callback_url and status.delivery != "read":
            # No reports will come: ask for the status on the SMS report schedule (gateway_reports.py).
            changes["sms_poll_at"] = now + timedelta(seconds=self.poll_interval)
            changes["sms_poll_until"] = now + timedelta(seconds=self.poll_for)
        if status.delivery in ("delivered", "read"):
            changes["status"] = READ if status.delivery == "read" else DELIVERED
            changes["delivered_at"] = now
            if status.delivery == "read":
                changes["read_at"] = now
        return changes

    def _ttl(self, record: MessageRecord) -> int:
        left = (record.expire_at - self.clock.now()) / timedelta(seconds=1)
        return int(min(TTL_MAX, max(TTL_MIN, left)))

    async def check_code(self, record: MessageRecord, code: str) -> str:
        """The Gateway's verification status of `code` for the code it generated for `record`
        (code_valid, code_invalid, code_max_attempts_exceeded, expired). Raises GatewayFailure."""
        if self.client is None or not record.provider_id:
            raise GatewayFailure("GATEWAY_NOT_CONFIGURED", definite=True)
        status = await self.client.check_verification_status(await self.token_for(record), record.provider_id, code)
        return status.verification

    async def revoke_and_check(self, record: MessageRecord) -> GatewayStatus | None:
        """Revokes a sent code, then asks where it is (None: no answer). Telegram takes a revoke
        as a request, not a promise: a code delivered or read before it arrived stays, so only the
        status after it says whether the person can still get the code."""
        if self.client is None or not record.provider_id:
            return None
        await self.revoke(record)
        try:
            status = await self.client.check_verification_status(await self.token_for(record), record.provider_id)
        except GatewayFailure as failure:
            metrics.gateway_calls_total.labels("checkVerificationStatus", failure.error).inc()
            log.info("gateway_status_unknown", message_id=record.id, error=failure.error)
            return None
        metrics.gateway_calls_total.labels("checkVerificationStatus", "ok").inc()
        return status

    async def revoke(self, record: MessageRecord) -> bool:
        """Asks the Gateway to take back a sent code (it stays if the person already has it)."""
        if self.client is None or not record.provider_id:
            return False
        try:
            return await self.client.revoke_verification_message(await self.token_for(record), record.provider_id)
        except GatewayFailure as failure:
            log.info("gateway_revoke_failed", message_id=record.id, error=failure.error)
            return False

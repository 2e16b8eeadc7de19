"""The SMPP 3.4 SMS provider: texts go to an SMSC over one kept-up transceiver bind
(services/delivery/smpp_link.py), delivery receipts come back on the same bind.

What a message becomes:
- every part answered ESME_ROK: sent, with the first part's SMSC id as provider_id and the
  number of parts (what the carrier bills) for usage;
- a part refused with ESME_RTHROTTLED or ESME_RMSGQFUL: retried later (SmsError, not permanent,
  with retry_after), and the link holds new submits back for as long;
- a part refused for its destination (ESME_RINVDSTADR, bad TON/NPI), its source or its form:
  a permanent failure (SMS_FAILED); codes named in `retry_statuses` are retried instead;
- no bind (cannot connect, bind refused) or no answer in time: SmsError SMPP_<reason>, retried
  with backoff while the message lives; a bind refusal is logged with the SMSC's status.
Parts already taken by the SMSC are recorded as each is answered (smpp_messages), so a message
retried after a later part failed, or after a crash, never sends a part twice.

Receipts (deliver_sm with a receipt esm_class): the receipted_message_id / message_state TLVs
when present, else the receipt text ("id:... stat:... err:..."). Each is stored on its part
(smpp_receipts, keyed by the SMSC id) before the SMSC gets its deliver_sm_resp, in either order
with the submit that created the part. A message is DELIVERED when every part is delivered and
FAILED when any part failed, through the report sink (Engine.apply_sms_report, the same path as
every pushed report); what cannot be applied at once is answered by `status` to the poller.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiosmpplib import NPI, TON, DeliverSm, PhoneNumber, SubmitSm
from prometheus_client import Counter
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from services.core.clock import Clock, as_utc
from services.core.logging import get_logger
from services.core.mongo import Document
from services.delivery.smpp_link import (
    ESME_ROK,
    LinkSettings,
    LinkUnavailable,
    NoAnswer,
    SmppLink,
    status_name,
)
from services.delivery.sms import DELIVERED, FAILED, PENDING, SmsError, SmsSent
from services.delivery.sms_text import UCS2, encode_sms, reference_for

log = get_logger(__name__)

receipts_total = Counter("otpgate_smpp_receipts_total", "SMPP delivery receipts received, by state.", ("state",))

ReportSink = Callable[[str, bool, str], Awaitable[bool]]

RECEIPT_ESM_MASK = 0b0011_1100
RECEIPT_ESM = 0b0000_0100  # SMSC delivery receipt
UDHI = 0b0100_0000
TLV_RECEIPTED_MESSAGE_ID = 0x001E
TLV_MESSAGE_STATE = 0x0427

THROTTLED = {0x58: "ESME_RTHROTTLED", 0x14: "ESME_RMSGQFUL"}
# Worth another try later: the SMSC's own trouble, not the message's.
TEMPORARY = {0x04, 0x08, 0x45, 0x64, 0xFF}  # RINVBNDSTS, RSYSERR, RSUBMITFAIL, RX_T_APPN, RUNKNOWNERR
DESTINATION = {0x0B, 0x33, 0x50, 0x51}  # RINVDSTADR, RINVNUMDESTS, RINVDSTTON, RINVDSTNPI

MESSAGE_STATES = {
    1: ("ENROUTE", PENDING),
    2: ("DELIVRD", DELIVERED),
    3: ("EXPIRED", FAILED),
    4: ("DELETED", FAILED),
    5: ("UNDELIV", FAILED),
    6: ("ACCEPTD", PENDING),
    7: ("UNKNOWN", FAILED),
    8: ("REJECTD", FAILED),
}
RECEIPT_STATS = {name: state for name, state in MESSAGE_STATES.values()}
REPORT_RACE = timedelta(seconds=60)
_RECEIPT_FIELD = re.compile(r"\b(id|stat|err):(\S*)", re.IGNORECASE)


@dataclass(frozen=True)
class SmppSettings:
    link: LinkSettings
    # How long one send (every part) may take: well inside the dispatch lease.
    submit_timeout: float = 10.0
    # submit_sm validity period, s (0: the SMSC's default).
    validity: float = 0.0
    source_ton: int | None = None  # None: 5 (alphanumeric) for a name, 1 (international) for digits
    source_npi: int | None = None
    # How long a throttled SMSC is left alone, s.
    throttle_backoff: float = 5.0
    retry_statuses: frozenset[int] = frozenset()
    # How receipt text ids relate to submit_sm_resp ids: same, dec_to_hex or hex_to_dec.
    receipt_id_format: str = "same"
    retention: float = 3 * 86400.0
    purge_interval: float = 3600.0


@dataclass(frozen=True)
class Receipt:
    key: str  # the SMSC id, in the form parts are stored under
    state: str  # PENDING | DELIVERED | FAILED
    code: str  # e.g. DELIVRD, UNDELIV:err=001


# receipt_id_format -> (base of submit_sm_resp ids, base of receipt text ids)
_ID_BASES = {"dec_to_hex": (16, 10), "hex_to_dec": (10, 16)}


class MessageIds:
    """SMSC ids as stored keys. Some SMSCs write receipt ids in another base than the ids they
    answer submits with; those are compared as decimal numbers."""

    def __init__(self, receipt_id_format: str) -> None:
        self._bases = _ID_BASES.get(receipt_id_format)

    def of_submit(self, smsc_id: str) -> str:
        return _as_decimal(smsc_id, self._bases[0]) if self._bases else smsc_id

    def of_receipt_text(self, smsc_id: str) -> str:
        return _as_decimal(smsc_id, self._bases[1]) if self._bases else smsc_id


def _as_decimal(value: str, base: int) -> str:
    try:
        return str(int(value, base))
    except ValueError:
        return value


def parse_receipt(message: DeliverSm, ids: MessageIds) -> Receipt | None:
    """A delivery receipt's id and state, or None for anything else (a mobile-originated SMS)."""
    if message.esm_class & RECEIPT_ESM_MASK != RECEIPT_ESM:
        return None
    tlvs = {param.tag: param.value for param in message.optional_params or []}
    text = str(message.short_message or message.message_payload or "")
    fields = {name.lower(): value for name, value in _RECEIPT_FIELD.findall(text)}
    receipted = str(tlvs.get(TLV_RECEIPTED_MESSAGE_ID) or "")
    key = ids.of_submit(receipted) if receipted else ids.of_receipt_text(fields.get("id", ""))
    if not key:
        return None
    err = ""
    if isinstance(tlvs.get(TLV_MESSAGE_STATE), int) and tlvs[TLV_MESSAGE_STATE] in MESSAGE_STATES:
        stat, state = MESSAGE_STATES[tlvs[TLV_MESSAGE_STATE]]
    else:
        stat, err = fields.get("stat", "").upper(), fields.get("err", "")
        state = RECEIPT_STATS.get(stat, FAILED if stat else PENDING)
    code = f"{stat or 'NO_STAT'}:err={err}" if err and err.strip("0") else (stat or "NO_STAT")
    return Receipt(key, state, code[:40])


def submit_refusal(status: int, retry_statuses: frozenset[int], throttle_backoff: float) -> SmsError:
    name = status_name(status)
    if status in THROTTLED:
        return SmsError(name, f"smpp: {name} (retry later)", permanent=False, retry_after=throttle_backoff)
    if status in TEMPORARY or status in retry_statuses:
        return SmsError(name, f"smpp: {name}", permanent=False)
    if status in DESTINATION:
        return SmsError(name, f"smpp: invalid destination ({name})", permanent=True)
    return SmsError(name, f"smpp: refused ({name})", permanent=True)


class SmppStore:
    """smpp_messages: _id = our message id, the SMSC id of each part taken (parts.<n>).
    smpp_receipts: _id = <system_id>|<SMSC id>, the part it is (m, i, n) and its receipt (st, code);
    written by upsert from either side, so a receipt that overtakes its submit's record is kept."""

    def __init__(self, messages: AsyncCollection[Document], receipts: AsyncCollection[Document], clock: Clock) -> None:
        self.messages = messages
        self.receipts = receipts
        self._clock = clock

    async def taken_parts(self, message_id: str, total: int) -> dict[int, str]:
        """The parts of a message the SMSC already took (an earlier attempt), creating its record."""
        doc = await _upsert(
            self.messages, message_id, {"$setOnInsert": {"n": total, "parts": {}, "at": self._clock.now()}}, before=True
        )
        parts: dict[str, str] = (doc or {}).get("parts") or {}
        return {int(n): smsc_id for n, smsc_id in parts.items()}

    async def part_taken(self, namespace: str, message_id: str, index: int, total: int, key: str) -> Document:
        """Record a part the SMSC took (both writes at once); returns its receipt record."""
        _, doc = await asyncio.gather(
            self.messages.update_one({"_id": message_id}, {"$set": {f"parts.{index}": key}}),
            _upsert(
                self.receipts,
                f"{namespace}|{key}",
                {"$set": {"m": message_id, "i": index, "n": total}, "$setOnInsert": {"at": self._clock.now()}},
            ),
        )
        assert doc is not None
        return doc

    async def receipt(self, namespace: str, receipt: Receipt) -> Document:
        now = self._clock.now()
        update: dict[str, Any] = {"$set": {"code": receipt.code, "rat": now}, "$setOnInsert": {"at": now}}
        if receipt.state != PENDING:
            update["$set"]["st"] = receipt.state
        doc = await _upsert(self.receipts, f"{namespace}|{receipt.key}", update)
        assert doc is not None
        return doc

    async def message_state(self, namespace: str, part: Document) -> tuple[str, str, str]:
        """(state, code, provider_id) of the message a part belongs to; PENDING until every part is
        delivered or one failed."""
        if int(part.get("n", 1)) == 1:
            key = str(part["_id"]).split("|", 1)[1]
            return str(part.get("st") or PENDING), str(part.get("code", "")), key
        record = await self.messages.find_one({"_id": part["m"]}) or {}
        keys = [str(k) for _, k in sorted((int(n), k) for n, k in (record.get("parts") or {}).items())]
        docs = {d["_id"]: d async for d in self.receipts.find({"_id": {"$in": [f"{namespace}|{k}" for k in keys]}})}
        states = [docs.get(f"{namespace}|{k}", {}) for k in keys]
        provider_id = keys[0] if keys else ""
        failed = next((d for d in states if d.get("st") == FAILED), None)
        if failed is not None:
            return FAILED, str(failed.get("code", "")), provider_id
        if len(keys) == int(part["n"]) and all(d.get("st") == DELIVERED for d in states):
            return DELIVERED, str(part.get("code", "")), provider_id
        return PENDING, "", provider_id

    async def part(self, namespace: str, key: str) -> Document | None:
        return await self.receipts.find_one({"_id": f"{namespace}|{key}"})

    async def purge(self, before: Any) -> None:
        await self.messages.delete_many({"at": {"$lt": before}})
        await self.receipts.delete_many({"at": {"$lt": before}})


async def _upsert(
    collection: AsyncCollection[Document], doc_id: str, update: dict[str, Any], *, before: bool = False
) -> Document | None:
    """find_one_and_update by _id with upsert; a concurrent upsert of the same new _id can be
    refused with a duplicate key (MongoDB too): the document exists by then, so update it."""
    returned = ReturnDocument.BEFORE if before else ReturnDocument.AFTER
    try:
        return await collection.find_one_and_update({"_id": doc_id}, update, upsert=True, return_document=returned)
    except DuplicateKeyError:
        return await collection.find_one_and_update({"_id": doc_id}, update, return_document=returned)


class SmppProvider:
    name = "smpp"

    def __init__(
        self,
        settings: SmppSettings,
        store: SmppStore,
        clock: Clock,
        *,
        link: SmppLink | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock
        self.link = link or SmppLink(settings.link, self._on_deliver)
        self.link.on_deliver = self._on_deliver
        self._ids = MessageIds(settings.receipt_id_format)
        self._namespace = settings.link.system_id
        self._sink: ReportSink | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None

    def report_to(self, sink: ReportSink) -> None:
        """Where final receipts go (Engine.apply_sms_report)."""
        self._sink = sink

    def start(self) -> None:
        self.link.start()
        if self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain(), name="smpp-maintenance")

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        await self.link.close()
        for task in [*self._tasks, *([self._maintenance] if self._maintenance else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # Sending ------------------------------------------------------------------------------------

    async def send(self, message_id: str, phone: str, text: str, sender: str) -> SmsSent:
        encoded = encode_sms(text, reference_for(message_id))
        total = len(encoded.parts)
        taken = await self.store.taken_parts(message_id, total)
        deadline = self.link.now() + self.settings.submit_timeout
        final_seen = False
        for index, part in enumerate(encoded.parts):
            if index in taken:
                continue
            submit = self._submit_sm(phone, sender, part, encoded.data_coding, encoded.concatenated)
            try:
                answer = await self.link.submit(submit, deadline)
            except LinkUnavailable as down:
                raise SmsError(
                    f"SMPP_{down.reason}", f"smpp: {down}", permanent=False, retry_after=down.retry_after
                ) from None
            except NoAnswer as exc:
                raise SmsError("SMPP_NO_ANSWER", f"smpp: {exc}", permanent=False) from None
            if answer.status != ESME_ROK:
                if answer.status in THROTTLED:
                    self.link.hold_off(self.settings.throttle_backoff)
                raise submit_refusal(answer.status, self.settings.retry_statuses, self.settings.throttle_backoff)
            if not answer.message_id:
                raise SmsError("SMPP_NO_MESSAGE_ID", "smpp: submit_sm_resp without a message id", permanent=False)
            key = self._ids.of_submit(answer.message_id)
            doc = await self.store.part_taken(self._namespace, message_id, index, total, key)
            taken[index] = key
            final_seen = final_seen or doc.get("st") is not None
        if final_seen:
            self._later(self._report_when_sent(taken[0]))
        return SmsSent(provider_id=taken[0], parts=total)

    def _submit_sm(self, phone: str, sender: str, part: bytes, data_coding: int, concatenated: bool) -> SubmitSm:
        s = self.settings
        numeric = sender.lstrip("+").isdigit()
        source_ton = s.source_ton if s.source_ton is not None else (TON.INTERNATIONAL if numeric else TON.ALPHANUMERIC)
        source_npi = s.source_npi if s.source_npi is not None else (NPI.ISDN if numeric else NPI.UNKNOWN)
        submit = SubmitSm(
            short_message="-",  # the encoded part is set below; the library never encodes it
            source=PhoneNumber(sender.lstrip("+") if numeric else sender, TON(source_ton), NPI(source_npi)),
            destination=PhoneNumber(phone.lstrip("+"), TON.INTERNATIONAL, NPI.ISDN),
            esm_class=UDHI if concatenated else 0,
            registered_delivery=0b0000_0001,  # a receipt on success and on failure
            encoding="ucs2" if data_coding == UCS2 else "gsm0338",
            validity_period=timedelta(seconds=s.validity) if s.validity > 0 else None,
        )
        submit.set_encoded_message(part)
        return submit

    async def status(self, provider_id: str, phone: str) -> tuple[str, str]:
        part = await self.store.part(self._namespace, provider_id)
        if part is None or "m" not in part:
            return PENDING, "no_receipt"
        state, code, _ = await self.store.message_state(self._namespace, part)
        return state, code or "no_receipt"

    # Receipts -----------------------------------------------------------------------------------

    async def _on_deliver(self, message: DeliverSm) -> int:
        receipt = parse_receipt(message, self._ids)
        if receipt is None:
            log.info("smpp_deliver_sm_ignored", esm_class=message.esm_class)
            return ESME_ROK
        receipts_total.labels(receipt.state).inc()
        part = await self.store.receipt(self._namespace, receipt)
        if receipt.state != PENDING and "m" in part:
            await self._report(part)
        return ESME_ROK

    async def _report(self, part: Document) -> None:
        state, code, provider_id = await self.store.message_state(self._namespace, part)
        if state == PENDING or self._sink is None:
            return
        applied = await self._sink(provider_id, state == DELIVERED, code)
        taken_at = part.get("at")
        if not applied and taken_at is not None and self._clock.now() - as_utc(taken_at) < REPORT_RACE:
            # Not SENT yet as far as the outbox knows (the receipt overtook the send's record) or
            # busy: try again shortly. Later (a repeated receipt) there is nothing to wait for; the
            # status poll is the backstop either way.
            self._later(self._report_when_sent(provider_id))

    async def _report_when_sent(self, provider_id: str) -> None:
        for delay in (0.2, 0.5, 1.0, 2.0, 5.0):
            await asyncio.sleep(delay)
            part = await self.store.part(self._namespace, provider_id)
            if part is None or self._sink is None:
                return
            state, code, _ = await self.store.message_state(self._namespace, part)
            if state == PENDING or await self._sink(provider_id, state == DELIVERED, code):
                return

    def _later(self, job: Awaitable[None]) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):
                await job

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _maintain(self) -> None:
        while True:
            try:
                await self.store.purge(self._clock.now() - timedelta(seconds=self.settings.retention))
            except Exception:
                log.exception("smpp_purge_failed")
            await asyncio.sleep(self.settings.purge_interval)

"""One SMPP 3.4 transceiver bind to an SMSC, kept up for as long as the service runs.

The link connects, binds as a transceiver (system_id, password, system_type), answers the SMSC's
enquire_link and unbind, sends its own enquire_link when the line has been quiet for
`enquire_link_interval`, and reconnects with capped exponential backoff (with jitter) when the
connection drops, the SMSC stops answering, or the bind is refused. PDUs are encoded and
decoded by aiosmpplib; only the 16-octet header is read here, to frame and route them.

What a submit can count on:
- at most `window` submit_sm are outstanding (sent, not yet answered) on the bind at once, and
  they leave at most `tps` per second (GCRA, services/core/gcra.py): the SMSC's contracted rate;
- a submit answered by the SMSC is the SMSC's to deliver (or its refusal, with the status);
- a submit whose connection dropped before its answer came is sent again after the next bind
  while its deadline allows: the SMSC answers every submit_sm it takes, so an unanswered one is
  not taken. (Only a submit the SMSC took whose answer was lost in the drop is sent twice: no
  SMPP 3.4 client can tell those apart.) No answer within `response_timeout` on a live
  connection raises NoAnswer and is never resent here.
- Inbound deliver_sm (delivery receipts) go to `on_deliver` and are answered with the status it
  returns only after it returned: a receipt is stored before the SMSC lets go of it.

One module, past the usual size, because the bind's state machine (connect, bind, window,
enquire_link, unbind, reconnect) is one piece: split, its invariants would span files.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import random
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiosmpplib import (
    BindTransceiver,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    GenericNack,
    PduHeader,
    SmppCommand,
    SmppCommandStatus,
    SubmitSm,
    SubmitSmResp,
    Unbind,
    UnbindResp,
)
from prometheus_client import Gauge

from services.core.gcra import Bucket, Monotonic, Rate, Sleep
from services.core.logging import get_logger

log = get_logger(__name__)

link_up = Gauge("otpgate_smpp_link_up", "1 while this replica's SMPP link is bound to the SMSC.", ("smsc",))

HEADER = struct.Struct("!IIII")  # command_length, command_id, command_status, sequence_number
MAX_PDU = 70_000  # a message_payload of 64 KiB and the rest
RESPONSE_BIT = 0x80000000
ESME_ROK = 0x00
ESME_RINVCMDID = 0x03
ESME_RSYSERR = 0x08

OnDeliver = Callable[[DeliverSm], Awaitable[int]]


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    BOUND = "bound"
    DOWN = "down"
    CLOSED = "closed"


@dataclass(frozen=True)
class LinkSettings:
    host: str
    port: int
    system_id: str
    password: str = field(repr=False)
    system_type: str = ""
    window: int = 10
    tps: float = 50.0
    enquire_link_interval: float = 30.0
    response_timeout: float = 10.0
    connect_timeout: float = 10.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    # deliver_sm handled at once; more wait for a free handler (the SMSC waits for our answer).
    deliver_concurrency: int = 32


@dataclass(frozen=True)
class SubmitAnswer:
    status: int  # the submit_sm_resp's command_status (a generic_nack's, when the SMSC sent one)
    message_id: str  # the SMSC's id, on ESME_ROK
    nack: bool = False


class LinkUnavailable(Exception):
    """No bind to submit on within the deadline; `reason` says why (stable, for outcomes)."""

    def __init__(self, reason: str, detail: str, retry_after: float | None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = retry_after


class NoAnswer(Exception):
    """The submit was sent on a live bind and not answered in time: the SMSC may hold it."""


class _SessionLost(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason.lower().replace("_", " "))
        self.reason = reason
        self.detail = detail or reason.lower().replace("_", " ")


class _DeliverSm(DeliverSm):  # type: ignore[misc]
    """aiosmpplib's deliver_sm, letting an empty short_message through: a receipt may carry all
    it says in TLVs (receipted_message_id, message_state), which SMPP 3.4 allows."""

    short_message: str
    message_payload: str

    def __post_init__(self) -> None:
        empty = not self.short_message and not self.message_payload
        if empty:
            self.short_message = " "
        super().__post_init__()
        if empty:
            self.short_message = ""


def status_name(status: int) -> str:
    try:
        return str(SmppCommandStatus(status).name)
    except ValueError:
        return f"ESME_0x{status:08X}"


class _Session:
    """One bound TCP connection: the reader, the answers awaited by sequence number."""

    def __init__(self, link: SmppLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._link = link
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[tuple[int, int, bytes]]] = {}
        self.lost: _SessionLost | None = None
        self.last_received = asyncio.get_running_loop().time()
        self._write_lock = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()

    async def send(self, pdu: bytes) -> None:
        if self.lost is not None:
            raise self.lost
        try:
            async with self._write_lock:
                self.writer.write(pdu)
                await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.abort("WRITE_FAILED")
            raise self.lost or _SessionLost("WRITE_FAILED") from exc

    async def request(self, message: SubmitSm | EnquireLink | Unbind, timeout: float) -> tuple[int, int, bytes]:
        """Send a request and await its answer: (command_id, command_status, pdu)."""
        if self.lost is not None:
            raise self.lost
        seq = self._link.next_sequence()
        message.sequence_num = seq
        answer: asyncio.Future[tuple[int, int, bytes]] = asyncio.get_running_loop().create_future()
        self.pending[seq] = answer
        try:
            await self.send(message.pdu())
            return await asyncio.wait_for(asyncio.shield(answer), timeout)
        finally:
            self.pending.pop(seq, None)

    def abort(self, reason: str) -> None:
        """The connection is gone (or given up on): every awaited answer learns it."""
        if self.lost is None:
            self.lost = _SessionLost(reason)
        for answer in self.pending.values():
            if not answer.done():
                answer.set_exception(self.lost)
        self.pending.clear()
        self._link.session_lost(self)
        self.writer.transport.abort()

    async def read_loop(self) -> None:
        while True:
            command_id, status, seq, pdu = await self._read_pdu(self.reader)
            self.last_received = asyncio.get_running_loop().time()
            if command_id & RESPONSE_BIT:
                answer = self.pending.get(seq)
                if answer is not None and not answer.done():
                    answer.set_result((command_id, status, pdu))
                else:  # answered after its wait ended, or a generic_nack to a PDU the SMSC could not read
                    log.info("smpp_unmatched_answer", command=hex(command_id), status=status_name(status))
                continue
            if command_id == SmppCommand.ENQUIRE_LINK:
                await self.send(EnquireLinkResp(seq).pdu())
            elif command_id == SmppCommand.UNBIND:
                await self.send(UnbindResp(seq).pdu())
                raise _SessionLost("UNBOUND_BY_SMSC")
            elif command_id == SmppCommand.DELIVER_SM:
                await self._link.deliver_slots.acquire()
                task = asyncio.create_task(self._deliver(pdu, seq))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            elif command_id == SmppCommand.ALERT_NOTIFICATION:
                continue  # takes no answer
            else:
                await self.send(GenericNack(seq, command_status=SmppCommandStatus.ESME_RINVCMDID).pdu())

    async def _deliver(self, pdu: bytes, seq: int) -> None:
        try:
            try:
                header = PduHeader(len(pdu), SmppCommand.DELIVER_SM, SmppCommandStatus.ESME_ROK, seq)
                message = _DeliverSm.from_pdu(pdu, header, "latin_1")
            except (ValueError, IndexError, KeyError, UnicodeError):
                log.warning("smpp_deliver_sm_undecodable", length=len(pdu))
                status = ESME_ROK  # answering an error would only make the SMSC send it again
            else:
                try:
                    status = await self._link.on_deliver(message)
                except Exception:
                    log.exception("smpp_deliver_sm_failed")
                    status = 0x64  # ESME_RX_T_APPN: temporary, the SMSC sends it again later
            with contextlib.suppress(_SessionLost):
                await self.send(DeliverSmResp(seq, command_status=SmppCommandStatus(status)).pdu())
        finally:
            self._link.deliver_slots.release()

    @staticmethod
    async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
        try:
            head = await reader.readexactly(HEADER.size)
            length, command_id, status, seq = HEADER.unpack(head)
            if not HEADER.size <= length <= MAX_PDU:
                raise _SessionLost("BAD_PDU_LENGTH")
            body = await reader.readexactly(length - HEADER.size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise _SessionLost("CONNECTION_CLOSED") from exc
        return command_id, status, seq, head + body

    async def close_handlers(self) -> None:
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class SmppLink:
    def __init__(
        self,
        settings: LinkSettings,
        on_deliver: OnDeliver,
        *,
        now: Monotonic = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.on_deliver = on_deliver
        self.now = now
        self._sleep = sleep
        self._jitter = jitter
        self.state = LinkState.CONNECTING
        self.last_error = ""  # why the last bind attempt or session ended, e.g. BIND_REFUSED
        self.last_error_detail = ""
        self.binds = 0  # successful binds so far
        self._session: _Session | None = None
        self._changed = asyncio.Event()  # set (and replaced) on every change of state or session
        self._next_attempt = 0.0
        self._sequence = itertools.count(1)
        self._window = asyncio.Semaphore(settings.window)
        self._pace = Bucket(Rate(settings.tps))
        self._up = link_up.labels(f"{settings.host}:{settings.port}")
        self._hold_until = 0.0
        self.deliver_slots = asyncio.Semaphore(settings.deliver_concurrency)
        self._task: asyncio.Task[None] | None = None
        self.outstanding = 0  # submits sent and not answered (for tests and metrics)
        self._idle = asyncio.Event()  # set while nothing is outstanding
        self._idle.set()
        self.waiting_for_window = 0

    # Lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="smpp-link")

    async def close(self) -> None:
        """Unbind politely (waiting briefly for the SMSC's unbind_resp) and stop reconnecting."""
        self._set_state(LinkState.CLOSED)
        session = self._session
        if session is not None and session.lost is None:
            # Answers to what is on the wire come first: unbinding over them would leave them unknown.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.response_timeout)
            with contextlib.suppress(_SessionLost, TimeoutError, OSError):
                await session.request(Unbind(), min(self.settings.response_timeout, 2.0))
            session.abort("CLOSED")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._up.set(0)

    async def wait_bound(self, timeout: float) -> bool:
        """Whether the link is bound within `timeout` seconds (on the event loop's clock)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while self.state is not LinkState.BOUND and self.state is not LinkState.CLOSED and loop.time() < until:
            await self._next_change(until - loop.time())
        return self.state is LinkState.BOUND

    def _set_state(self, state: LinkState) -> None:
        if self.state is not LinkState.CLOSED:
            self.state = state
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _next_change(self, timeout: float) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), max(0.0, timeout))

    def next_sequence(self) -> int:
        seq = next(self._sequence)
        if seq > 0x7FFFFFFF:
            self._sequence = itertools.count(2)
            seq = 1
        return seq

    async def _run(self) -> None:
        failures = 0
        while self.state is not LinkState.CLOSED:
            self._set_state(LinkState.CONNECTING)
            try:
                session = await self._connect_and_bind()
            except _SessionLost as refused:
                failures += 1
                ended = refused
            else:
                failures = 1  # after a session, the first reconnect waits the least
                ended = await self._serve(session)
            if self._closed():
                return
            delay = min(self.settings.reconnect_max, self.settings.reconnect_min * 2 ** (failures - 1))
            delay *= 0.8 + 0.4 * self._jitter()
            self._next_attempt = self.now() + delay
            self._went_down(ended.reason, ended.detail)
            await self._sleep(delay)

    def _closed(self) -> bool:
        return self.state is LinkState.CLOSED  # a method: close() changes it while _run awaits

    def hold_off(self, seconds: float) -> None:
        """Send nothing new for `seconds` (the SMSC said it is throttling us)."""
        self._hold_until = max(self._hold_until, self.now() + seconds)

    def session_lost(self, session: _Session) -> None:
        if self._session is session:
            self._notify()

    def _went_down(self, reason: str, detail: str) -> None:
        self.last_error, self.last_error_detail = reason, detail
        self._set_state(LinkState.DOWN)
        self._up.set(0)
        log.warning("smpp_link_down", reason=reason, detail=detail, host=self.settings.host)

    async def _connect_and_bind(self) -> _Session:
        s = self.settings
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(s.host, s.port), s.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise _SessionLost("CONNECT_FAILED", f"cannot connect to {s.host}:{s.port}") from exc
        session = _Session(self, reader, writer)
        reading = asyncio.create_task(self._read_bind_answer(session))
        bind = BindTransceiver(system_id=s.system_id, password=s.password, system_type=s.system_type)
        bind.sequence_num = self.next_sequence()
        try:
            await session.send(bind.pdu())
            command_id, status = await asyncio.wait_for(reading, s.response_timeout)
        except TimeoutError as exc:
            reading.cancel()
            session.abort("BIND_FAILED")
            raise _SessionLost("BIND_FAILED", f"no bind_transceiver_resp within {s.response_timeout:g}s") from exc
        except _SessionLost as exc:
            session.abort("BIND_FAILED")
            raise _SessionLost("BIND_FAILED", "the SMSC closed the connection during the bind") from exc
        if command_id != SmppCommand.BIND_TRANSCEIVER_RESP or status != ESME_ROK:
            session.abort("BIND_REFUSED")
            raise _SessionLost("BIND_REFUSED", f"bind_transceiver refused: {status_name(status)}")
        return session

    @staticmethod
    async def _read_bind_answer(session: _Session) -> tuple[int, int]:
        command_id, status, _, _ = await session._read_pdu(session.reader)
        return command_id, status

    async def _serve(self, session: _Session) -> _SessionLost:
        """Run a bound session until it ends; returns why it ended."""
        self._session = session
        self.binds += 1
        self.last_error = self.last_error_detail = ""
        self._set_state(LinkState.BOUND)
        self._up.set(1)
        log.info("smpp_bound", host=self.settings.host, system_id=self.settings.system_id)
        tasks = [asyncio.create_task(session.read_loop()), asyncio.create_task(self._keepalive(session))]
        ended = _SessionLost("CONNECTION_CLOSED")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            error = next(iter(done)).exception()
            if isinstance(error, _SessionLost):
                ended = error
            elif error is not None:
                log.error("smpp_session_failed", error=type(error).__name__)
                ended = _SessionLost("SESSION_FAILED")
        finally:
            for task in tasks:
                task.cancel()
            session.abort(ended.reason)
            await asyncio.gather(*tasks, return_exceptions=True)
            self._session = None
            await session.close_handlers()
        return ended

    async def _keepalive(self, session: _Session) -> None:
        """enquire_link once the line has been quiet for the interval (on the event loop's clock:
        this is about the network, not about pacing)."""
        interval = self.settings.enquire_link_interval
        loop = asyncio.get_running_loop()
        while True:
            quiet = loop.time() - session.last_received
            if quiet < interval:
                await asyncio.sleep(interval - quiet)
                continue
            try:
                await session.request(EnquireLink(), self.settings.response_timeout)
            except TimeoutError:
                raise _SessionLost("ENQUIRE_LINK_UNANSWERED") from None
            session.last_received = loop.time()

    # Submits ------------------------------------------------------------------------------------

    async def submit(self, message: SubmitSm, deadline: float) -> SubmitAnswer:
        """Send one submit_sm and return the SMSC's answer, by `deadline` (on `now`'s clock).
        Raises LinkUnavailable (no bind in time, or the pace would pass the deadline) or NoAnswer."""
        while True:
            session = await self._bound_session(deadline)
            self.waiting_for_window += 1
            try:
                await asyncio.wait_for(self._window.acquire(), max(0.0, deadline - self.now()))
            except TimeoutError:
                raise LinkUnavailable("WINDOW_FULL", "every window slot stayed taken", 1.0) from None
            finally:
                self.waiting_for_window -= 1
            try:
                now = self.now()
                wait = max(self._pace.wait_for(now), self._hold_until - now)
                if now + wait > deadline:
                    raise LinkUnavailable("TPS_LIMIT", "the submit rate limit leaves no slot in time", wait)
                self._pace.reserve(now + wait)
                if wait > 0:
                    await self._sleep(wait)
                if session.lost is not None:
                    continue  # dropped while waiting: nothing was sent, bind again
                self.outstanding += 1
                self._idle.clear()
                try:
                    timeout = min(self.settings.response_timeout, max(0.0, deadline - self.now()))
                    command_id, status, pdu = await session.request(message, timeout)
                finally:
                    self.outstanding -= 1
                    if not self.outstanding:
                        self._idle.set()
            except _SessionLost:
                continue  # unanswered: not taken by the SMSC; sent again on the next bind
            except TimeoutError:
                raise NoAnswer("no submit_sm_resp in time") from None
            finally:
                self._window.release()
            return _answer(command_id, status, pdu)

    async def _bound_session(self, deadline: float) -> _Session:
        while True:
            if self.state is LinkState.CLOSED:
                raise LinkUnavailable("CLOSED", "the SMPP link is closed", None)
            session = self._session
            if self.state is LinkState.BOUND and session is not None and session.lost is None:
                return session
            left = deadline - self.now()
            retry_after = max(0.0, self._next_attempt - self.now()) if self.state is LinkState.DOWN else None
            # A refused bind does not heal in seconds: say so at once rather than at the deadline.
            refused = self.state is LinkState.DOWN and self.last_error == "BIND_REFUSED"
            if left <= 0 or refused or (retry_after is not None and retry_after > left):
                reason = self.last_error or "CONNECTING"
                raise LinkUnavailable(reason, self.last_error_detail or "binding to the SMSC", retry_after)
            await self._next_change(left)


def _answer(command_id: int, status: int, pdu: bytes) -> SubmitAnswer:
    if command_id == SmppCommand.GENERIC_NACK:
        return SubmitAnswer(status or ESME_RSYSERR, "", nack=True)
    if status != ESME_ROK:
        return SubmitAnswer(status, "")
    header = PduHeader(len(pdu), SmppCommand.SUBMIT_SM_RESP, SmppCommandStatus.ESME_ROK, 0)
    resp = SubmitSmResp.from_pdu(pdu, header)
    assert isinstance(resp, SubmitSmResp)
    return SubmitAnswer(ESME_ROK, resp.message_id)

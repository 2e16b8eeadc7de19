"""A local Telegram Gateway (dev and sandbox only): Telegram's verification-code API, as Telegram
serves it at gatewayapi.telegram.org, with the person's side in the simulated Telegram.

The rules kept, from Telegram's Gateway API reference:

- Four methods: checkSendAbility, sendVerificationMessage, checkVerificationStatus,
  revokeVerificationMessage; answers `{"ok": true, "result": RequestStatus}` or
  `{"ok": false, "error": "UPPER_SNAKE"}` (gateway_http.py carries them over HTTP).
- A number can be reached only if it belongs to a live Telegram account (PHONE_NUMBER_NOT_AVAILABLE
  otherwise). checkSendAbility charges once and returns a request_id; sendVerificationMessage with
  that request_id is free and may be called once for it; without one, it charges itself. A charge
  needs the balance (BALANCE_NOT_ENOUGH).
- The code (ours, 4-8 digits, or Telegram's of code_length 4-8) arrives in the person's
  "Verification Codes" chat. DeliveryStatus: sent (on its way), delivered (on the person's device),
  read (opened), revoked, expired. ttl (30-3600 s): a message not delivered within it is removed
  and its fee refunded (`is_refunded`); one delivered but unread is removed, not refunded; a read one
  stays. revokeVerificationMessage removes a message not yet delivered (a delivered or read one stays).
- checkVerificationStatus with a code answers code_valid / code_invalid, then
  code_max_attempts_exceeded after MAX_CODE_ATTEMPTS wrong ones, expired after the ttl.
- Every change of the delivery status of a request with a callback_url is reported: a POST of its
  RequestStatus with X-Request-Timestamp and X-Request-Signature = hex(HMAC-SHA256(key =
  SHA256(api token), timestamp + "\\n" + body)), retried up to 10 times with growing delays unless
  the answer is 200.

A person's device is online unless the sandbox says otherwise (SetDeviceOnline): an offline
device gets nothing delivered until it is back, which is how a ttl refund is seen in the sandbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from services.core.clock import Clock
from services.core.crypto import constant_time_equals
from services.core.logging import get_logger
from services.telegramsim.gateway_store import GatewayRequest, GatewayStore
from services.telegramsim.model import SimUser
from services.telegramsim.telegram import SimulatedTelegram

log = get_logger(__name__)

MICROS = 1_000_000
MAX_CODE_ATTEMPTS = 5
REPORT_RETRIES = 10
TTL_RANGE = (30, 3600)
CODE_RE = re.compile(r"^\d{4,8}$")
E164_RE = re.compile(r"^\+?[1-9]\d{6,14}$")
VERIFICATION_CODES = "Verification Codes"
# Telegram's service account that sends the codes (the chat's peer, as Telegram shows it).
VERIFICATION_CODES_USER_ID = 489000

# What the poster of a report returns: the HTTP status the callback_url answered (0: not reached).
PostReport = Callable[[str, bytes, Mapping[str, str]], Awaitable[int]]


class GatewayError(Exception):
    """An `{"ok": false, "error": ...}` answer, with the HTTP status it comes with."""

    def __init__(self, error: str, http_status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.http_status = http_status


@dataclass(frozen=True)
class GatewaySettings:
    price: float = 0.01  # credits per charged request
    initial_balance: float = 10.0  # of an account opened for a configured token
    loop_interval: float = 0.5  # seconds between the ttl and report passes; 0: no loop (a test drives them)


def report_signature(token: str, timestamp: str, body: bytes) -> str:
    """Telegram's X-Request-Signature: hex(HMAC-SHA256(key=SHA256(token), timestamp + "\\n" + body))."""
    key = hashlib.sha256(token.encode()).digest()
    return hmac.new(key, timestamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def code_text(code: str) -> str:
    return f"{code} is your verification code.\n\nDo not give this code to anyone, even if they say they are from Telegram!"


class SimulatedGateway:
    def __init__(
        self,
        store: GatewayStore,
        telegram: SimulatedTelegram,
        clock: Clock,
        settings: GatewaySettings,
        post_report: PostReport,
    ) -> None:
        self.store = store
        self.telegram = telegram
        self.clock = clock
        self.settings = settings
        self.post_report = post_report
        self._price = round(settings.price * MICROS)
        # Tokens by account, for signing reports (known from the calls and the configuration).
        self._tokens: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def load(self, tokens: tuple[str, ...] = ()) -> None:
        """Accounts for the configured tokens; the people's message counters include their codes."""
        await self.store.create_indexes()
        for token in tokens:
            await self.open_account(token, self.settings.initial_balance)
        for user_id, highest in (await self.store.highest_message_ids()).items():
            user = self.telegram.users.get(user_id)
            if user is not None:
                user.last_message_id = max(user.last_message_id, highest)

    async def open_account(self, token: str, balance: float) -> float:
        self._tokens[self.store.account_id(token)] = token
        return await self.store.open_account(token, round(balance * MICROS)) / MICROS

    async def _account(self, token: str) -> str:
        if not token:
            raise GatewayError("ACCESS_TOKEN_REQUIRED", 401)
        account = self.store.account_id(token)
        if await self.store.balance(account) is None:
            raise GatewayError("ACCESS_TOKEN_INVALID", 401)
        self._tokens[account] = token
        return account

    # The API --------------------------------------------------------------------------------

    async def check_send_ability(self, token: str, params: Mapping[str, Any]) -> dict[str, Any]:
        account = await self._account(token)
        phone, user = self._reachable(params)
        balance = await self._charge(account)
        request = GatewayRequest(
            request_id=_new_request_id(),
            account=account,
            phone=phone,
            user_id=user.user_id,
            cost_micros=self._price,
            created_at=self.clock.now(),
        )
        await self.store.insert(request)
        return self.status(request, balance=balance)

    async def send_verification_message(self, token: str, params: Mapping[str, Any]) -> dict[str, Any]:
        account = await self._account(token)
        code = _text(params, "code")
        code_length = _integer(params, "code_length")
        ttl = _integer(params, "ttl")
        callback_url = _text(params, "callback_url")
        payload = _text(params, "payload")
        if code and not CODE_RE.match(code):
            raise GatewayError("CODE_INVALID")
        if not code and (code_length is None or not 4 <= code_length <= 8):
            raise GatewayError("CODE_LENGTH_INVALID")
        if ttl is not None and not TTL_RANGE[0] <= ttl <= TTL_RANGE[1]:
            raise GatewayError("TTL_INVALID")
        if len(callback_url.encode()) > 256 or (callback_url and not re.match(r"^https?://", callback_url)):
            raise GatewayError("CALLBACK_URL_INVALID")
        if len(payload.encode()) > 128:
            raise GatewayError("PAYLOAD_INVALID")
        if _text(params, "sender_username"):
            raise GatewayError("SENDER_USERNAME_INVALID")  # no verified channel in the sandbox
        phone, user = self._reachable(params)
        now = self.clock.now()
        request_id = _text(params, "request_id")
        balance: int | None = None
        async with self._lock:
            if request_id:
                checked = await self.store.get(request_id)
                if checked is None or checked.account != account or checked.phone != phone:
                    raise GatewayError("REQUEST_ID_INVALID")
                if checked.sent:
                    raise GatewayError("REQUEST_ID_ALREADY_USED")
                base = checked
            else:
                balance = await self._charge(account)
                base = GatewayRequest(_new_request_id(), account, phone, user.user_id, self._price, now)
            code = code or "".join(secrets.choice("0123456789") for _ in range(code_length or 0))
            user.last_message_id += 1
            request = replace(
                base,
                user_id=user.user_id,
                sent=True,
                code=code,
                text=code_text(code),
                message_id=user.last_message_id,
                delivery_status="sent",
                delivery_updated_at=now,
                callback_url=callback_url,
                payload=payload,
                expire_at=now + timedelta(seconds=ttl) if ttl else None,
                sent_at=now,
            )
            if request_id:
                if not await self.store.replace(request, {"sent": False}):
                    raise GatewayError("REQUEST_ID_ALREADY_USED")
            else:
                await self.store.insert(request)
        await self._reported(request)
        if not await self.store.offline(user.user_id):
            request = await self._deliver(request)
        return self.status(request, balance=balance)

    async def check_verification_status(self, token: str, params: Mapping[str, Any]) -> dict[str, Any]:
        request = await self._own(token, params)
        code = _text(params, "code")
        if not code or not request.sent:
            return self.status(request)
        async with self._lock:
            request = await self._own(token, params)
            now = self.clock.now()
            if request.verification_status in ("code_valid", "code_max_attempts_exceeded", "expired"):
                return self.status(request)
            if request.expire_at is not None and now >= request.expire_at:
                status = "expired"
            elif constant_time_equals(code, request.code):
                status = "code_valid"
            elif request.attempts + 1 >= MAX_CODE_ATTEMPTS:
                status = "code_max_attempts_exceeded"
            else:
                status = "code_invalid"
            checked = replace(
                request,
                attempts=request.attempts + (status != "code_valid" and status != "expired"),
                verification_status=status,
                verification_updated_at=now,
                code_entered=code,
            )
            await self.store.replace(checked, {"attempts": request.attempts})
        return self.status(checked)

    async def revoke_verification_message(self, token: str, params: Mapping[str, Any]) -> bool:
        request = await self._own(token, params)
        if request.sent and request.delivery_status == "sent":
            revoked = replace(request, delivery_status="revoked", delivery_updated_at=self.clock.now(), removed=True)
            if await self.store.replace(revoked, {"delivery_status": "sent"}):
                await self._reported(revoked)
        return True

    async def _own(self, token: str, params: Mapping[str, Any]) -> GatewayRequest:
        account = await self._account(token)
        request_id = _text(params, "request_id")
        if not request_id:
            raise GatewayError("REQUEST_ID_REQUIRED")
        request = await self.store.get(request_id)
        if request is None or request.account != account:
            raise GatewayError("REQUEST_ID_INVALID")
        return request

    def _reachable(self, params: Mapping[str, Any]) -> tuple[str, SimUser]:
        raw = _text(params, "phone_number").replace(" ", "")
        if not raw:
            raise GatewayError("PHONE_NUMBER_REQUIRED")
        if not E164_RE.match(raw):
            raise GatewayError("PHONE_NUMBER_INVALID")
        phone = raw if raw.startswith("+") else "+" + raw
        user = next((u for u in self.telegram.users.values() if u.phone == phone and not u.deactivated), None)
        if user is None:
            raise GatewayError("PHONE_NUMBER_NOT_AVAILABLE")
        return phone, user

    async def _charge(self, account: str) -> int:
        balance = await self.store.charge(account, self._price)
        if balance is None:
            raise GatewayError("BALANCE_NOT_ENOUGH")
        return balance

    def status(self, request: GatewayRequest, balance: int | None = None) -> dict[str, Any]:
        """The RequestStatus object."""
        out: dict[str, Any] = {
            "request_id": request.request_id,
            "phone_number": request.phone.removeprefix("+"),
            "request_cost": request.cost_micros / MICROS,
        }
        if request.is_refunded:
            out["is_refunded"] = True
        if balance is not None:
            out["remaining_balance"] = balance / MICROS
        if request.sent and request.delivery_updated_at is not None:
            out["delivery_status"] = {
                "status": request.delivery_status,
                "updated_at": int(request.delivery_updated_at.timestamp()),
            }
        if request.verification_status and request.verification_updated_at is not None:
            verification: dict[str, Any] = {
                "status": request.verification_status,
                "updated_at": int(request.verification_updated_at.timestamp()),
            }
            if request.code_entered:
                verification["code_entered"] = request.code_entered
            out["verification_status"] = verification
        if request.payload:
            out["payload"] = request.payload
        return out

    # The person's side ------------------------------------------------------------------------

    async def set_device_online(self, user_id: int, online: bool) -> None:
        self.telegram.user(user_id)
        await self.store.set_offline(user_id, not online)
        if online:
            for request in await self.store.undelivered_of_user(user_id):
                await self._deliver(request)

    async def codes_chat(
        self, user_id: int, after_message_id: int = 0, open_chat: bool = False
    ) -> list[GatewayRequest]:
        """The person's "Verification Codes" chat; opening it reads what was delivered."""
        self.telegram.user(user_id)
        shown: list[GatewayRequest] = []
        for request in await self.store.of_user(user_id, after_message_id):
            if request.removed or request.delivery_status not in ("delivered", "read"):
                continue
            if open_chat and request.delivery_status == "delivered":
                read = replace(request, delivery_status="read", delivery_updated_at=self.clock.now())
                if await self.store.replace(read, {"delivery_status": "delivered"}):
                    await self._reported(read)
                    request = read
            shown.append(request)
        return shown

    async def _deliver(self, request: GatewayRequest) -> GatewayRequest:
        delivered = replace(request, delivery_status="delivered", delivery_updated_at=self.clock.now())
        if not await self.store.replace(delivered, {"delivery_status": "sent"}):
            return (await self.store.get(request.request_id)) or request
        await self._reported(delivered)
        return delivered

    async def _reported(self, request: GatewayRequest) -> None:
        if request.callback_url:
            delivery = self.status(request).get("delivery_status", {})
            await self.store.enqueue_report(request.request_id, delivery, self.clock.now())

    # Time ---------------------------------------------------------------------------------------

    async def expire_due(self) -> int:
        """Messages whose ttl passed: refunded if never delivered, removed unless read."""
        now = self.clock.now()
        done = 0
        for request in await self.store.due_for_expiry(now):
            delivered = request.delivery_status == "delivered"
            expired = replace(
                request,
                removed=True,
                delivery_status="delivered" if delivered else "expired",
                delivery_updated_at=request.delivery_updated_at if delivered else now,
                is_refunded=not delivered,
            )
            if not await self.store.replace(expired, {"delivery_status": request.delivery_status, "removed": False}):
                continue
            if not delivered:
                await self.store.credit(request.account, request.cost_micros)
                await self._reported(expired)
            done += 1
        return done

    async def post_due_reports(self) -> int:
        """Posts the reports due; a failed one is tried again later, up to REPORT_RETRIES times."""
        now = self.clock.now()
        posted = 0
        for report in await self.store.due_reports(now):
            request = await self.store.get(str(report["request_id"]))
            token = self._tokens.get(request.account, "") if request else ""
            if request is None or not token:
                await self.store.report_done(str(report["_id"]))
                continue
            status = self.status(request)
            if report.get("delivery"):
                status["delivery_status"] = report["delivery"]  # the change reported, not a later one
            body = json.dumps(status, separators=(",", ":")).encode()
            timestamp = str(int(now.timestamp()))
            headers = {
                "Content-Type": "application/json",
                "X-Request-Timestamp": timestamp,
                "X-Request-Signature": report_signature(token, timestamp, body),
            }
            answered = await self.post_report(request.callback_url, body, headers)
            attempt = int(report["attempt"]) + 1
            if answered == 200:
                await self.store.report_done(str(report["_id"]))
                posted += 1
            elif attempt > REPORT_RETRIES:
                log.warning("gateway_report_lost", request_id=request.request_id, status=answered)
                await self.store.report_done(str(report["_id"]))
            else:
                await self.store.report_failed(str(report["_id"]), attempt, now + timedelta(seconds=2**attempt))
        return posted

    async def run(self) -> None:
        """The ttl and report loop of the process."""
        interval = self.settings.loop_interval
        if interval <= 0:
            return
        while True:
            await self.expire_due()
            await self.post_due_reports()
            await asyncio.sleep(interval)

    async def reset(self) -> None:
        await self.store.reset()


def _new_request_id() -> str:
    return str(secrets.randbelow(9 * 10**17) + 10**17)


def _text(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise GatewayError(f"{name.upper()}_INVALID")
    return str(value).strip()


def _integer(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise GatewayError(f"{name.upper()}_INVALID")
    try:
        return int(str(value))
    except ValueError:
        raise GatewayError(f"{name.upper()}_INVALID") from None

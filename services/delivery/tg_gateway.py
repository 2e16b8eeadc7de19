"""A client of Telegram's Gateway API (gatewayapi.telegram.org, or the local one in sandbox mode),
and the check of the delivery reports it posts.

Calls are POSTs with a JSON body and `Authorization: Bearer <token>`; every answer is read as
`{"ok": ..., "result" | "error": ...}` whatever its HTTP status. A failure says how sure we are
that nothing happened:

- `definite`: the Gateway answered with an error: nothing was sent or charged (no Telegram account
  behind the number, balance, token, a bad parameter).
- uncertain (`definite=False`): no answer (timeout, a dropped connection, a 5xx without a JSON
  error). The request may have been carried out: the caller must find out before it tries anything
  else (services/delivery/gateway_leg.py).

Report check (Telegram's "Checking report integrity"): X-Request-Signature must equal
hex(HMAC-SHA256(key = SHA256(api token), X-Request-Timestamp + "\\n" + raw body)), compared in
constant time; a report whose timestamp is more than `max_age` seconds from our clock is refused
as stale (a replay), see `check_report`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from services.core.logging import get_logger

log = get_logger(__name__)

# Errors after which the number will not become reachable by trying again.
UNREACHABLE = frozenset({"PHONE_NUMBER_NOT_AVAILABLE", "PHONE_NUMBER_INVALID"})


class GatewayFailure(Exception):
    def __init__(self, error: str, *, definite: bool, retry_after: float | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.definite = definite
        self.retry_after = retry_after


@dataclass(frozen=True)
class GatewayStatus:
    """The parts of a RequestStatus delivery acts on."""

    request_id: str
    cost: float
    delivery: str = ""  # sent | delivered | read | expired | revoked; "" before a message went out
    delivery_time: int = 0
    verification: str = ""
    is_refunded: bool = False
    payload: str = ""

    @classmethod
    def parse(cls, result: Any) -> GatewayStatus:
        if not isinstance(result, dict) or not isinstance(result.get("request_id"), str):
            raise GatewayFailure("BAD_RESPONSE", definite=False)
        delivery = result.get("delivery_status") or {}
        verification = result.get("verification_status") or {}
        return cls(
            request_id=result["request_id"],
            cost=float(result.get("request_cost") or 0.0),
            delivery=str(delivery.get("status", "")) if isinstance(delivery, dict) else "",
            delivery_time=int(delivery.get("updated_at") or 0) if isinstance(delivery, dict) else 0,
            verification=str(verification.get("status", "")) if isinstance(verification, dict) else "",
            is_refunded=bool(result.get("is_refunded")),
            payload=str(result.get("payload") or ""),
        )


@dataclass(frozen=True)
class GatewaySettings:
    url: str = "https://gatewayapi.telegram.org"
    token: str = ""  # the service-wide token; a client's own comes from its policy
    callback_url: str = ""  # where the edge receives reports ("" : no reports, status is polled)
    timeout: float = 5.0
    report_max_age: float = 300.0


class TelegramGatewayClient:
    def __init__(self, session: aiohttp.ClientSession, settings: GatewaySettings) -> None:
        self._session = session
        self._base = settings.url.rstrip("/") + "/"
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)

    async def check_send_ability(self, token: str, phone: str) -> GatewayStatus:
        return GatewayStatus.parse(await self._call(token, "checkSendAbility", {"phone_number": phone}))

    async def send_verification_message(
        self,
        token: str,
        phone: str,
        *,
        code: str = "",
        code_length: int = 0,
        request_id: str = "",
        ttl: int = 0,
        callback_url: str = "",
        payload: str = "",
    ) -> GatewayStatus:
        params: dict[str, Any] = {"phone_number": phone}
        if code:
            params["code"] = code
        else:
            params["code_length"] = code_length
        if request_id:
            params["request_id"] = request_id
        if ttl:
            params["ttl"] = ttl
        if callback_url:
            params["callback_url"] = callback_url
        if payload:
            params["payload"] = payload
        return GatewayStatus.parse(await self._call(token, "sendVerificationMessage", params))

    async def check_verification_status(self, token: str, request_id: str, code: str = "") -> GatewayStatus:
        params = {"request_id": request_id, **({"code": code} if code else {})}
        return GatewayStatus.parse(await self._call(token, "checkVerificationStatus", params))

    async def revoke_verification_message(self, token: str, request_id: str) -> bool:
        return bool(await self._call(token, "revokeVerificationMessage", {"request_id": request_id}))

    async def _call(self, token: str, method: str, params: dict[str, Any]) -> Any:
        if not token:
            raise GatewayFailure("ACCESS_TOKEN_REQUIRED", definite=True)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with self._session.post(
                self._base + method, json=params, headers=headers, timeout=self._timeout
            ) as answer:
                raw = await answer.read()
                status = answer.status
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made: nothing reached the Gateway.
            raise GatewayFailure("CONNECT_FAILED", definite=True, retry_after=None) from exc
        except TimeoutError as exc:
            raise GatewayFailure("TIMEOUT", definite=False) from exc
        except aiohttp.ClientError as exc:
            raise GatewayFailure(f"HTTP_{type(exc).__name__}", definite=False) from exc
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or "ok" not in body:
            raise GatewayFailure(f"HTTP_{status}", definite=status < 500)
        if body["ok"] is not True:
            error = str(body.get("error") or f"HTTP_{status}")
            retry_after = float(error.rsplit("_", 1)[1]) if error.startswith("FLOOD_WAIT_") else None
            raise GatewayFailure(error, definite=True, retry_after=retry_after)
        return body.get("result")


def report_signature(token: str, timestamp: str, body: bytes) -> str:
    key = hashlib.sha256(token.encode()).digest()
    return hmac.new(key, timestamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def check_report(token: str, timestamp: str, signature: str, body: bytes, now: float, max_age: float) -> str:
    """ "" when the report is Telegram's and fresh; else why it is refused.

    Stale is more than `max_age` (300 s) from our clock either way: Telegram stamps each post when
    it makes it (its retries carry new stamps), so a genuine report is seconds old; five minutes
    leave room for clock skew and queueing, and a captured report replayed later is refused. A
    replay inside the window changes nothing: statuses only move forward.
    """
    if not timestamp.isdigit():
        return "timestamp missing or not a Unix time"
    expected = report_signature(token, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        return "signature does not match"
    if abs(now - int(timestamp)) > max_age:
        return "stale"
    return ""

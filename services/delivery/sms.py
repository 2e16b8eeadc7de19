"""SMS providers behind one interface: sandbox (an inbox), smsc (smsc.ru send.php), webhook,
and smpp (an SMSC over SMPP 3.4: services/delivery/smpp.py).

Provider failures become SmsError: `permanent` ones fail the message (SMS_FAILED), the
others are retried by the dispatcher with backoff. Credentials never reach a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp
from pymongo.asynchronous.collection import AsyncCollection

from services.core.clock import Clock, as_utc
from services.core.crypto import Keyring, SealContext
from services.core.ids import new_id
from services.core.logging import get_logger
from services.core.mongo import Document, ensure_index
from services.core.phone import mask_phone
from services.delivery import metrics
from services.delivery.sms_text import count_parts

log = get_logger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


class SmsError(Exception):
    def __init__(self, code: str, message: str, *, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.permanent = permanent
        self.retry_after = retry_after


@dataclass(frozen=True)
class SmsSent:
    provider_id: str
    # The provider already reported delivery (the sandbox does at once).
    delivered: bool = False
    # SMS the text went as (a long text is concatenated parts, each billed as one SMS).
    parts: int = 1


class SmsProvider(Protocol):
    name: str

    async def send(self, message_id: str, phone: str, text: str, sender: str) -> SmsSent: ...

    async def status(self, provider_id: str, phone: str) -> tuple[str, str]:
        """(PENDING | DELIVERED | FAILED, provider status code)."""
        ...


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """hex(HMAC-SHA256(secret, timestamp + "\\n" + body)) — status webhooks and the webhook SMS provider."""
    return hmac.new(secret.encode(), timestamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()


# Sandbox ---------------------------------------------------------------------------------


class SandboxSmsProvider:
    """Keeps every SMS in an inbox (sealed), readable per number through SmsSandboxService."""

    name = "sandbox"

    def __init__(self, collection: AsyncCollection[Document], keyring: Keyring, clock: Clock) -> None:
        self._coll = collection
        self._keyring = keyring
        self._clock = clock

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("b", 1), ("at", -1)])
        await ensure_index(self._coll, [("at", 1)])

    def _index(self, phone: str) -> str:
        return self._keyring.blind_index("sandbox-sms", phone)

    async def send(self, message_id: str, phone: str, text: str, sender: str) -> SmsSent:
        sms_id = new_id(int(self._clock.now().timestamp() * 1000))
        await self._coll.insert_one(
            {
                "_id": sms_id,
                "message_id": message_id,
                "b": self._index(phone),
                "phone_masked": mask_phone(phone),
                "phone": self._keyring.seal(phone, SealContext("sandbox_sms", sms_id, "phone")),
                "text": self._keyring.seal(text, SealContext("sandbox_sms", sms_id, "text")),
                "sender": sender,
                "at": self._clock.now(),
            }
        )
        return SmsSent(provider_id=sms_id, delivered=True, parts=count_parts(text))

    async def status(self, provider_id: str, phone: str) -> tuple[str, str]:
        found = await self._coll.find_one({"_id": provider_id}, {"_id": 1})
        return (DELIVERED, "delivered") if found else (FAILED, "not_found")

    async def inbox(self, phone: str, limit: int) -> list[Document]:
        out: list[Document] = []
        async for doc in self._coll.find({"b": self._index(phone)}).sort([("at", -1), ("_id", -1)]).limit(limit):
            doc["text"] = self._keyring.open_str(doc["text"], SealContext("sandbox_sms", str(doc["_id"]), "text"))
            doc["at"] = as_utc(doc["at"])
            out.append(doc)
        return out

    async def purge(self, before: datetime) -> None:
        await self._coll.delete_many({"at": {"$lt": before}})


# HTTP providers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSettings:
    timeout: float = 5.0
    # Extra tries for failures where the request surely did not reach the provider.
    retries: int = 2
    retry_backoff: float = 0.2


async def _request(
    session: aiohttp.ClientSession,
    provider: str,
    method: str,
    url: str,
    settings: HttpSettings,
    **kwargs: Any,
) -> tuple[int, bytes]:
    attempt = 0
    while True:
        try:
            async with session.request(
                method, url, timeout=aiohttp.ClientTimeout(total=settings.timeout), **kwargs
            ) as response:
                body = await response.read()
                if response.status in (502, 503, 504) and attempt < settings.retries:
                    attempt += 1
                    await asyncio.sleep(settings.retry_backoff * attempt)
                    continue
                return response.status, body
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made: nothing was sent, a retry cannot duplicate.
            if attempt < settings.retries:
                attempt += 1
                await asyncio.sleep(settings.retry_backoff * attempt)
                continue
            raise SmsError("CONNECT_FAILED", f"{provider}: cannot connect", permanent=False) from exc
        except TimeoutError as exc:
            raise SmsError("TIMEOUT", f"{provider}: no answer within {settings.timeout:g}s", permanent=False) from exc
        except aiohttp.ClientError as exc:
            raise SmsError("HTTP_ERROR", f"{provider}: {type(exc).__name__}", permanent=False) from exc


# smsc.ru send.php error codes: https://smsc.ru/api/http/send/
SMSC_SEND_ERRORS: dict[int, tuple[str, bool]] = {
    1: ("PARAMETER_ERROR", True),
    2: ("BAD_CREDENTIALS", True),
    3: ("INSUFFICIENT_FUNDS", True),
    4: ("IP_BLOCKED", False),
    5: ("BAD_DATE_FORMAT", True),
    6: ("MESSAGE_PROHIBITED", True),
    7: ("BAD_PHONE_FORMAT", True),
    8: ("CANNOT_DELIVER", True),
    9: ("TOO_MANY_REQUESTS", False),
}
# status.php statuses.
SMSC_STATUS: dict[int, str] = {
    -3: FAILED,  # not found
    -1: PENDING,  # waiting to be sent
    0: PENDING,  # handed to the operator
    1: DELIVERED,
    2: DELIVERED,  # read
    3: FAILED,  # expired
    4: PENDING,  # link opened
    20: FAILED,  # cannot be delivered
    22: FAILED,  # invalid number
    23: FAILED,  # prohibited
    24: FAILED,  # insufficient funds
    25: FAILED,  # unavailable number
}


class SmscProvider:
    """smsc.ru-compatible HTTP API (send.php / status.php, fmt=3 JSON)."""

    name = "smsc"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        login: str,
        password: str,
        settings: HttpSettings,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/") + "/"
        self._login = login
        self._password = password
        self._settings = settings

    async def send(self, message_id: str, phone: str, text: str, sender: str) -> SmsSent:
        form = {
            "login": self._login,
            "psw": self._password,
            "phones": phone.lstrip("+"),
            "mes": text,
            "fmt": "3",
            "charset": "utf-8",
            "id": message_id[-9:],
        }
        if sender:
            form["sender"] = sender
        status, body = await _request(self._session, "smsc", "POST", self._base + "send.php", self._settings, data=form)
        if status >= 500:
            raise SmsError(f"HTTP_{status}", f"smsc: HTTP {status}", permanent=False)
        if status >= 400:
            raise SmsError(f"HTTP_{status}", f"smsc: HTTP {status}", permanent=True)
        reply = _json(body)
        if reply is None:
            raise SmsError("BAD_RESPONSE", "smsc: the answer is not JSON", permanent=False)
        if "error_code" in reply or "error" in reply:
            code = int(reply.get("error_code") or 0)
            name, permanent = SMSC_SEND_ERRORS.get(code, (f"ERROR_{code}", True))
            retry_after = 60.0 if code in (4, 9) else None
            raise SmsError(name, f"smsc: {name.lower()}", permanent=permanent, retry_after=retry_after)
        provider_id = str(reply.get("id", ""))
        if not provider_id:
            raise SmsError("BAD_RESPONSE", "smsc: no message id in the answer", permanent=False)
        parts = reply.get("cnt")
        return SmsSent(provider_id=provider_id, parts=int(parts) if isinstance(parts, int) and parts > 0 else 1)

    async def status(self, provider_id: str, phone: str) -> tuple[str, str]:
        params = {
            "login": self._login,
            "psw": self._password,
            "phone": phone.lstrip("+"),
            "id": provider_id,
            "fmt": "3",
        }
        status, body = await _request(
            self._session, "smsc", "GET", self._base + "status.php", self._settings, params=params
        )
        reply = _json(body) if status < 400 else None
        if reply is None or "status" not in reply:
            return PENDING, f"http_{status}"
        code = int(reply["status"])
        return SMSC_STATUS.get(code, PENDING), str(code)


class WebhookSmsProvider:
    """POSTs {"id", "to", "text", "sender"} as JSON, signed like status webhooks."""

    name = "webhook"

    def __init__(
        self, session: aiohttp.ClientSession, url: str, secret: str, settings: HttpSettings, clock: Clock
    ) -> None:
        self._session = session
        self._url = url
        self._secret = secret
        self._settings = settings
        self._clock = clock

    async def send(self, message_id: str, phone: str, text: str, sender: str) -> SmsSent:
        body = json.dumps({"id": message_id, "to": phone, "text": text, "sender": sender}).encode()
        timestamp = str(int(self._clock.now().timestamp()))
        headers = {
            "Content-Type": "application/json",
            "X-Otpgate-Timestamp": timestamp,
            "X-Otpgate-Signature": signature(self._secret, timestamp, body),
            "Idempotency-Key": message_id,
        }
        status, reply_body = await _request(
            self._session, "webhook", "POST", self._url, self._settings, data=body, headers=headers
        )
        if status == 429 or status >= 500:
            raise SmsError(f"HTTP_{status}", f"webhook provider: HTTP {status}", permanent=False)
        if status >= 400:
            raise SmsError(f"HTTP_{status}", f"webhook provider: HTTP {status}", permanent=True)
        reply = _json(reply_body) or {}
        delivered = str(reply.get("status", "")).lower() == "delivered"
        return SmsSent(provider_id=str(reply.get("id") or message_id), delivered=delivered, parts=count_parts(text))

    async def status(self, provider_id: str, phone: str) -> tuple[str, str]:
        return PENDING, "no_reports"


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body.decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def count_outcome(provider: str, outcome: str) -> None:
    metrics.sms_sent_total.labels(provider, outcome).inc()

"""structlog JSON logging, one event per line, with request ids and redaction.

Redaction runs on every event, ours and the libraries' (stdlib logging is routed
through the same processors): fields that name secrets are dropped, phone numbers in
any value are masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

from services.core.phone import mask_phone

request_id_var: ContextVar[str] = ContextVar("request_id", default="")

REDACTED = "[redacted]"
_SECRET_NAMES = frozenset({"code", "token", "secret", "key", "text", "password", "authorization", "api_key", "otp"})
_SECRET_SUFFIXES = ("_code", "_token", "_secret", "_key", "_password", "_text")
# E.164 with "+", or a bare run of 11-15 digits (Telegram sends contacts without "+").
_PHONE_RE = re.compile(r"\+\d{7,15}\b|(?<![\d.])\d{11,15}(?![\d.])")
_PHONE_FIELDS = frozenset({"phone", "e164", "phone_number", "to", "msisdn"})


def is_secret_field(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


def mask_phones_in(text: str) -> str:
    return _PHONE_RE.sub(lambda m: mask_phone(m.group(0)), text)


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return mask_phones_in(value)
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_field(str(k)) else _redact(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if is_secret_field(name):
            event[name] = REDACTED
        elif name in _PHONE_FIELDS and isinstance(event[name], str):
            event[name] = mask_phone(event[name]) if event[name] else ""
        else:
            event[name] = _redact(event[name])
    return event


def _add_request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    rid = request_id_var.get()
    if rid and "request_id" not in event:
        event["request_id"] = rid
    return event


def configure_logging(service: str, level: str = "info", stream: TextIO | None = None) -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.EventRenamer("msg"),
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    # Libraries are chatty at INFO; keep their warnings.
    for noisy in ("pymongo", "telethon", "aiohttp.access", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str = "otpgate") -> Any:
    return structlog.get_logger(name)

"""structlog JSON logging, one event per line, with request ids and redaction.

Redaction runs on every event, ours and the libraries' (stdlib logging is routed
through the same processors): fields that name secrets are dropped, fields that hold a
phone number are masked, and so is every number in a text that is a possible phone number
standing on its own. Ids, request ids and hashes are never touched, so a message can be
found in the logs by its id: fields named `id`, `*_id`, `*_ids` or `*_hash` are left as
they are, and digits inside a word (`01M8RH5D5GBE6512345670840C5Z`) are not a number.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO, cast

import phonenumbers
import structlog

from services.core.phone import mask_phone

request_id_var: ContextVar[str] = ContextVar("request_id", default="")

REDACTED = "[redacted]"
_SECRET_NAMES = frozenset({"code", "token", "secret", "key", "text", "password", "authorization", "api_key", "otp"})
_SECRET_SUFFIXES = ("_code", "_token", "_secret", "_key", "_password", "_text")
# E.164 with "+", or a bare run of 11-15 digits (Telegram sends contacts without "+"), standing on
# its own: not inside a word or an id, not part of a decimal number.
_PHONE_RE = re.compile(r"(?<![\w+])(?<!\d\.)(?:\+\d{7,15}|\d{11,15})(?!\w)(?!\.\d)")
_PHONE_FIELDS = frozenset({"phone", "e164", "phone_number", "to", "msisdn"})
_ID_SUFFIXES = ("_id", "_ids", "_hash")


def is_secret_field(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


def is_id_field(name: str) -> bool:
    lowered = name.lower()
    return lowered == "id" or lowered.endswith(_ID_SUFFIXES)


def _is_possible_phone(digits: str) -> bool:
    try:
        return bool(phonenumbers.is_possible_number(phonenumbers.parse("+" + digits.lstrip("+"), None)))
    except phonenumbers.NumberParseException:
        return False


def mask_phones_in(text: str) -> str:
    return _PHONE_RE.sub(lambda m: mask_phone(m.group(0)) if _is_possible_phone(m.group(0)) else m.group(0), text)


_SECRET, _PHONE, _ID, _OTHER = range(4)


@functools.lru_cache(maxsize=1024)
def _field_kind(name: str) -> int:
    """How a field is redacted, by its name (a few dozen names recur in every event)."""
    if is_secret_field(name):
        return _SECRET
    if name in _PHONE_FIELDS:
        return _PHONE
    return _ID if is_id_field(name) else _OTHER


def _redact_field(name: str, value: Any, depth: int) -> Any:
    kind = _field_kind(name)
    if kind == _SECRET:
        return REDACTED
    if kind == _PHONE and isinstance(value, str):
        return mask_phone(value) if value else ""
    if kind == _ID:
        return value
    return _redact(value, depth)


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return mask_phones_in(value)
    if isinstance(value, Mapping):
        return {k: _redact_field(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        event[name] = _redact_field(name, event[name], 0)
    return event


def _add_request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    rid = request_id_var.get()
    if rid and "request_id" not in event:
        event["request_id"] = rid
    return event


class _Sink:
    """Where our events are written: the stream of the latest configure_logging, so a logger that
    cached its pipeline keeps writing where logging now goes."""

    stream: TextIO = sys.stderr

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


_SINK = _Sink()
_LEVELS = {  # a structlog method's level
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}
_threshold = logging.INFO


def _at_level(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event


def configure_logging(service: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Our events go straight from structlog to the stream (no stdlib record on the way: a log
    line is on the path of every message); the libraries' stdlib records through the same
    processors, by a handler on the same stream."""
    global _threshold
    _threshold = logging.getLevelName(level.upper())
    _SINK.stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    render: list[Any] = [structlog.processors.EventRenamer("msg"), structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[_at_level, *shared, *render],
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _SINK)),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler = logging.StreamHandler(_SINK.stream)
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

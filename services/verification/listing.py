"""ListVerifications (AIP-132, AIP-158, AIP-160): a client's verifications, newest first.

Pages come from the client's verification feed (services/core/feed.py): every read is an `_id`
lookup (feed entries, then the records), so a page costs the same however
many verifications the service holds. A filter is applied to each page's candidates; reading
stops after MAX_CANDIDATES of them, so a selective filter answers a short (even empty) page
with a next_page_token rather than walking the whole history in one request (AIP-158 allows
fewer results than page_size). A `create_time >`/`>=` bound ends the listing at the first
older verification (the feed is in creation order).

The filter grammar is the AIP-160 subset a dashboard needs: comparisons joined by AND.
    status = APPROVED            (!= too; the enum name with or without its prefix)
    channel = TELEGRAM           (the channel the code went out on; != too)
    phone = "+79991234567"       (matched through the phone's blind index)
    create_time >= "2026-01-01T00:00:00Z"   (<, <=, >, >=; RFC 3339)
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from otpgate.common.v1 import common_pb2
from otpgate.verification.v1 import verification_pb2

from services.core.clock import as_utc
from services.core.errors import Violations, invalid_argument
from services.core.feed import decode_token, encode_token, read_page
from services.core.phone import InvalidPhoneError, parse_phone
from services.verification.codes import View
from services.verification.store import PHONE_INDEX
from services.verification.verify import Verifier

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_CANDIDATES = 500
MAX_FILTER_LENGTH = 500

_TERM = re.compile(r'^\s*([a-z_]+)\s*(<=|>=|!=|=|<|>)\s*("(?:[^"\\]|\\.)*"|[^\s"]+)\s*$')
_STATUSES = {name.removeprefix("VERIFICATION_STATUS_") for name, _ in common_pb2.VerificationStatus.items()} - {
    "UNSPECIFIED"
}
_CHANNELS = {"TELEGRAM": common_pb2.CHANNEL_TELEGRAM, "SMS": common_pb2.CHANNEL_SMS}


Condition = Callable[[View], bool]


@dataclass
class Filter:
    """A parsed filter: every condition must hold."""

    text: str = ""
    conditions: list[Condition] = field(default_factory=list)
    # The earliest create_time that can match: older verifications end the listing.
    oldest: datetime | None = None

    def matches(self, view: View) -> bool:
        return all(condition(view) for condition in self.conditions)

    def ended(self, view: View) -> bool:
        """Older than any verification the filter wants: the listing ends here."""
        return self.oldest is not None and _created(view) < self.oldest


def _unquote(raw: str) -> str:
    if raw.startswith('"'):
        return str(json.loads(raw))
    return raw


def _compare(op: str, read: Callable[[View], Any], value: Any) -> Condition:
    """A condition comparing what `read` takes from a verification with `value`."""
    compare: Callable[[Any, Any], bool] = {
        "=": operator.eq,
        "!=": operator.ne,
        "<": operator.lt,
        "<=": operator.le,
        ">": operator.gt,
        ">=": operator.ge,
    }[op]
    return lambda view: compare(read(view), value)


def _status(view: View) -> str:
    return view.status


def _channel(view: View) -> int:
    return int((view.last_send or {}).get("channel", 0))


def _phone_index(view: View) -> str:
    return str(view.record["phone_bi"])


def _created(view: View) -> datetime:
    return as_utc(view.record["created_at"])


def parse_filter(text: str, blind_index: Callable[[str], str]) -> Filter:
    """The filter, or INVALID_ARGUMENT naming what is wrong with it."""
    parsed = Filter(text=text.strip())
    if not parsed.text:
        return parsed
    if len(text) > MAX_FILTER_LENGTH:
        raise invalid_argument([("filter", f"at most {MAX_FILTER_LENGTH} characters")])
    problems = Violations()
    for term in re.split(r"\s+AND\s+", parsed.text):
        found = _TERM.match(term)
        if found is None:
            problems.add("filter", f"cannot read {term.strip()!r}: expected `field op value` joined by AND")
            continue
        name, op, raw = found.groups()
        try:
            value = _unquote(raw)
        except ValueError:
            problems.add("filter", f"{name}: the quoted value is not closed properly")
            continue
        equality = op in ("=", "!=")
        if name == "status":
            status = value.upper().removeprefix("VERIFICATION_STATUS_")
            if not equality or status not in _STATUSES:
                problems.add("filter", f"status: use = or != with one of {', '.join(sorted(_STATUSES))}")
                continue
            parsed.conditions.append(_compare(op, _status, status))
        elif name == "channel":
            channel = value.upper().removeprefix("CHANNEL_")
            if not equality or channel not in _CHANNELS:
                problems.add("filter", "channel: use = or != with TELEGRAM or SMS")
                continue
            parsed.conditions.append(_compare(op, _channel, _CHANNELS[channel]))
        elif name == "phone":
            try:
                phone = parse_phone(value)
            except InvalidPhoneError as exc:
                problems.add("filter", f"phone: {exc}")
                continue
            if op != "=":
                problems.add("filter", "phone: only = is supported")
                continue
            parsed.conditions.append(_compare("=", _phone_index, blind_index(phone.e164)))
        elif name == "create_time":
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                moment = None
            if moment is None or moment.tzinfo is None or equality:
                problems.add(
                    "filter", 'create_time: use <, <=, > or >= with an RFC 3339 time such as "2026-01-01T00:00:00Z"'
                )
                continue
            if op in (">", ">="):
                parsed.oldest = max(parsed.oldest or moment, moment)
            parsed.conditions.append(_compare(op, _created, moment))
        else:
            problems.add("filter", f"unknown field {name!r}: filter on status, channel, phone or create_time")
    problems.raise_if_any()
    return parsed


async def list_verifications(
    verifier: Verifier, request: verification_pb2.ListVerificationsRequest
) -> verification_pb2.ListVerificationsResponse:
    problems = Violations()
    problems.check(bool(request.client_id), "client_id", "required")
    problems.check(0 <= request.page_size <= MAX_PAGE_SIZE, "page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    problems.raise_if_any()
    size = request.page_size or DEFAULT_PAGE_SIZE
    wanted = parse_filter(request.filter, lambda e164: verifier.keyring.blind_index(PHONE_INDEX, e164))
    before = decode_token(request.page_token, wanted.text) if request.page_token else 0
    store = verifier.store

    async def load(ids: Sequence[str]) -> list[View]:
        cursor = store.verifications.find({"_id": {"$in": list(ids)}, "client_id": request.client_id})
        records = {str(doc["_id"]): doc async for doc in cursor}
        return [verifier.engine.view(records[record_id]) for record_id in ids if record_id in records]

    page = await read_page(
        store.feed,
        request.client_id,
        before,
        size,
        load,
        matches=wanted.matches if wanted.conditions else None,
        ended=wanted.ended,
        max_candidates=MAX_CANDIDATES,
    )
    reply = verification_pb2.ListVerificationsResponse(verifications=[verifier.to_proto(v) for v in page.items])
    if page.next_before:
        reply.next_page_token = encode_token(page.next_before, wanted.text)
    return reply

"""What operators decide and what the guard reports: prefix rules (a safe list and a block list)
and guard events.

Rules live in `fraud_rules`, `_id = <client id or *>|<E.164 prefix>`: a prefix (from the country
code up to a whole number) is always let through the guard (ALLOW) or always refused (BLOCK),
for one client or for all. A number's rule is found with one `_id $in` lookup of every prefix
it has; the longest matching prefix wins, and at one length a client's own rule beats the
global one. Premium-rate and shared-cost numbers are refused whatever a rule says. Every change
is logged with who made it (the admin key id) and why.

Events live in `fraud_events`, `_id = <kind>|<value>` (a prefix or range in E.164 form, or a
client and country): written when a number range or a segment needs a CAPTCHA or is refused,
with its state, the deciding signal, its recent counts, when that state began and when it was
last seen. A replica writes an event when its state changes and at most every
`EVENT_REFRESH` seconds otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import phonenumbers
from otpgate.common.v1 import common_pb2
from pymongo.asynchronous.collection import AsyncCollection

from services.core import page_tokens
from services.core.clock import Clock, as_utc
from services.core.errors import Violations
from services.core.logging import get_logger
from services.core.mongo import Document, ensure_index, put_by_id

log = get_logger(__name__)

ALLOW, BLOCK = "allow", "block"
ANY_CLIENT = "*"
EVENT_REFRESH = 30.0
EVENT_RETENTION = timedelta(days=7)


@dataclass(frozen=True)
class FraudRule:
    prefix: str  # "+4915112"
    action: str  # ALLOW | BLOCK
    client_id: str = ""  # "": every client
    reason: str = ""
    created_by: str = ""
    created_at: datetime | None = None

    @property
    def doc_id(self) -> str:
        return rule_id(self.client_id, self.prefix)

    def to_doc(self) -> Document:
        return {
            "prefix": self.prefix,
            "action": self.action,
            "client_id": self.client_id,
            "reason": self.reason,
            "created_by": self.created_by,
            "created_at": self.created_at,
        }

    @classmethod
    def from_doc(cls, doc: Document) -> FraudRule:
        return cls(
            prefix=str(doc["prefix"]),
            action=str(doc["action"]),
            client_id=str(doc.get("client_id", "")),
            reason=str(doc.get("reason", "")),
            created_by=str(doc.get("created_by", "")),
            created_at=as_utc(doc["created_at"]) if doc.get("created_at") else None,
        )


def rule_id(client_id: str, prefix: str) -> str:
    return f"{client_id or ANY_CLIENT}|{prefix}"


class FraudRules:
    def __init__(self, collection: AsyncCollection[Document], clock: Clock, static_allow: tuple[str, ...]) -> None:
        self._coll = collection
        self._clock = clock
        # OTPGATE_FRAUD_SAFE_PREFIXES: allowed for every client, from the configuration.
        self._static = tuple(
            FraudRule(prefix=p, action=ALLOW, reason="OTPGATE_FRAUD_SAFE_PREFIXES") for p in static_allow
        )

    async def match(self, e164: str, client_id: str) -> FraudRule | None:
        """The rule that applies to a number for a client (longest prefix; the client's own first)."""
        prefixes = [e164[:length] for length in range(2, len(e164) + 1)]
        ids = [rule_id(owner, p) for p in prefixes for owner in (client_id, "")]
        found = {doc["_id"]: FraudRule.from_doc(doc) async for doc in self._coll.find({"_id": {"$in": ids}})}
        for prefix in reversed(prefixes):
            for owner in (client_id, ""):
                rule = found.get(rule_id(owner, prefix))
                if rule is not None:
                    return rule
            static = next((r for r in self._static if r.prefix == prefix), None)
            if static is not None:
                return static
        return None

    async def put(self, rule: FraudRule) -> FraudRule:
        stored = FraudRule(rule.prefix, rule.action, rule.client_id, rule.reason, rule.created_by, self._clock.now())
        await put_by_id(self._coll, stored.doc_id, stored.to_doc())
        log.info(
            "fraud_rule_set",
            prefix=rule.prefix,
            action=rule.action,
            client_id=rule.client_id or ANY_CLIENT,
            by_key_id=rule.created_by,
            reason=rule.reason,
        )
        return stored

    async def delete(self, prefix: str, client_id: str, by: str) -> FraudRule | None:
        doc = await self._coll.find_one_and_delete({"_id": rule_id(client_id, prefix)})
        if doc is None:
            return None
        log.info("fraud_rule_removed", prefix=prefix, client_id=client_id or ANY_CLIENT, by_key_id=by)
        return FraudRule.from_doc(doc)

    async def list(self) -> list[FraudRule]:
        """Every rule (an operator listing, not a request path), the configured ones first."""
        stored = [FraudRule.from_doc(doc) async for doc in self._coll.find({}).sort("_id", 1).limit(10_000)]
        return [*self._static, *stored]


@dataclass(frozen=True)
class FraudEvent:
    kind: str  # prefix | range | client_country
    value: str  # "+4915112", "+49151", "<client id>|DE"
    client_id: str
    region: str
    state: str  # captcha | block
    signal: str
    score: float
    requests: int
    sms: int
    entered: int
    since: datetime
    last_seen: datetime

    def to_doc(self) -> Document:
        return {
            "kind": self.kind,
            "value": self.value,
            "client_id": self.client_id,
            "region": self.region,
            "state": self.state,
            "signal": self.signal,
            "score": self.score,
            "requests": self.requests,
            "sms": self.sms,
            "entered": self.entered,
            "since": self.since,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_doc(cls, doc: Document) -> FraudEvent:
        return cls(
            kind=str(doc["kind"]),
            value=str(doc["value"]),
            client_id=str(doc.get("client_id", "")),
            region=str(doc.get("region", "")),
            state=str(doc["state"]),
            signal=str(doc.get("signal", "")),
            score=float(doc.get("score", 0.0)),
            requests=int(doc.get("requests", 0)),
            sms=int(doc.get("sms", 0)),
            entered=int(doc.get("entered", 0)),
            since=as_utc(doc["since"]),
            last_seen=as_utc(doc["last_seen"]),
        )


class FraudEvents:
    def __init__(self, collection: AsyncCollection[Document], clock: Clock) -> None:
        self._coll = collection
        self._clock = clock
        # What this replica last wrote per event: (state, since, when written).
        self._written: dict[str, tuple[str, datetime, datetime]] = {}

    async def create_indexes(self) -> None:
        await ensure_index(self._coll, [("last_seen", 1)])

    async def seen(self, event: FraudEvent) -> None:
        """Record that a range or segment is in `event.state` now (a write only when it changed or
        the last one is older than EVENT_REFRESH)."""
        doc_id = f"{event.kind}|{event.value}"
        now = self._clock.now()
        known = self._written.get(doc_id)
        if known is None:
            stored = await self._coll.find_one({"_id": doc_id}, {"state": 1, "since": 1, "last_seen": 1})
            if stored is not None:
                known = (str(stored["state"]), as_utc(stored["since"]), as_utc(stored["last_seen"]))
        # The same episode goes on while it is seen within a bucket of the guard's window.
        ongoing = known is not None and known[0] == event.state and now - known[2] <= timedelta(minutes=20)
        if ongoing and known is not None and (now - known[2]).total_seconds() < EVENT_REFRESH:
            return
        since = known[1] if ongoing and known is not None else now
        if len(self._written) > 50_000:
            self._written.clear()
        self._written[doc_id] = (event.state, since, now)
        await put_by_id(self._coll, doc_id, {**event.to_doc(), "since": since, "last_seen": now})
        if not ongoing:
            log.warning(
                "fraud_event",
                kind=event.kind,
                range=event.value if event.kind != "client_country" else "",
                client_id=event.client_id,
                region=event.region,
                state=event.state,
                signal=event.signal,
                score=round(event.score, 1),
            )

    async def list(self, since: datetime) -> list[FraudEvent]:
        """Events seen since `since`, the latest first (an operator listing: it reads the collection)."""
        cursor = self._coll.find({"last_seen": {"$gte": since}}).sort("last_seen", -1).limit(1000)
        return [FraudEvent.from_doc(doc) async for doc in cursor]

    async def page(self, client_id: str, size: int, token: str) -> tuple[Sequence[FraudEvent], str]:
        """One page of the events seen within EVENT_RETENTION, the latest first, only those last
        seen for `client_id` if given, and the next page's token (bound to that filter). A token
        that is not one of ours, or was made for another filter, raises ValueError."""
        offset = decode_offset(token, client_id) if token else 0
        events = await self.list(self._clock.now() - EVENT_RETENTION)
        if client_id:
            events = [event for event in events if event.client_id == client_id]
        end = offset + size
        return events[offset:end], encode_offset(end, client_id) if len(events) > end else ""

    async def purge(self) -> int:
        result = await self._coll.delete_many({"last_seen": {"$lt": self._clock.now() - EVENT_RETENTION}})
        return int(result.deleted_count)


# Protobuf forms ---------------------------------------------------------------------------------

_PREFIX = re.compile(r"^\+[1-9]\d{0,14}$")
_ACTIONS = {common_pb2.FRAUD_RULE_ACTION_ALLOW: ALLOW, common_pb2.FRAUD_RULE_ACTION_BLOCK: BLOCK}
_EVENT_KINDS = {
    "prefix": common_pb2.FRAUD_EVENT_KIND_PREFIX,
    "range": common_pb2.FRAUD_EVENT_KIND_RANGE,
    "client_country": common_pb2.FRAUD_EVENT_KIND_CLIENT_COUNTRY,
}
_STATES = {"captcha": common_pb2.FRAUD_STATE_CAPTCHA, "block": common_pb2.FRAUD_STATE_BLOCK}
MAX_REASON = 200


def encode_offset(offset: int, filter_text: str) -> str:
    return page_tokens.encode(f"o:{offset}:{filter_text}")


def decode_offset(token: str, filter_text: str) -> int:
    """The offset a token from encode_offset carries; ValueError for anything else, or for a token
    made with another filter (its offset would skip or repeat events of this one)."""
    try:
        text = page_tokens.decode(token)
    except ValueError:
        raise ValueError("is not a token from a previous page") from None
    kind, _, rest = text.partition(":")
    number, _, made_for = rest.partition(":")
    if kind != "o" or not number.isdigit():
        raise ValueError("is not a token from a previous page")
    if made_for != filter_text:
        raise ValueError("was made for another client_id; start again without it")
    return int(number)


def check_prefix(problems: Violations, field_path: str, prefix: str) -> None:
    """An E.164 prefix that starts with a country code: "+49", "+4915112", up to a whole number."""
    if not _PREFIX.match(prefix):
        problems.add(field_path, "must be + and 1 to 15 digits, e.g. +4915112")
    elif not any(int(prefix[1 : 1 + n]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE for n in (1, 2, 3)):
        problems.add(field_path, "must start with a country calling code")


def rule_from_proto(proto: common_pb2.FraudRule) -> FraudRule:
    """A rule to store; raises INVALID_ARGUMENT with every violation."""
    problems = Violations()
    check_prefix(problems, "rule.prefix", proto.prefix)
    problems.check(proto.action in _ACTIONS, "rule.action", "must be ALLOW or BLOCK")
    reason = proto.reason.strip()
    problems.check(
        0 < len(reason) <= MAX_REASON and reason.isprintable(), "rule.reason", f"1 to {MAX_REASON} printable characters"
    )
    problems.check(len(proto.client_id) <= 64, "rule.client_id", "at most 64 characters")
    problems.raise_if_any()
    return FraudRule(proto.prefix, _ACTIONS[proto.action], proto.client_id, reason, proto.created_by[:64])


def rule_to_proto(rule: FraudRule) -> common_pb2.FraudRule:
    action = next(value for value, name in _ACTIONS.items() if name == rule.action)
    out = common_pb2.FraudRule(
        prefix=rule.prefix,
        action=action,
        client_id=rule.client_id,
        reason=rule.reason,
        created_by=rule.created_by or ("config" if rule.reason == "OTPGATE_FRAUD_SAFE_PREFIXES" else ""),
    )
    if rule.created_at is not None:
        out.create_time.FromDatetime(rule.created_at)
    return out


def event_to_proto(event: FraudEvent) -> common_pb2.FraudEvent:
    out = common_pb2.FraudEvent(
        kind=_EVENT_KINDS.get(event.kind, common_pb2.FRAUD_EVENT_KIND_UNSPECIFIED),
        value=event.value.split("|", 1)[-1],
        client_id=event.client_id,
        region=event.region,
        state=_STATES.get(event.state, common_pb2.FRAUD_STATE_UNSPECIFIED),
        signal=event.signal,
        score=round(event.score, 2),
        requests=event.requests,
        sms=event.sms,
        entered=event.entered,
    )
    out.since.FromDatetime(event.since)
    out.last_seen.FromDatetime(event.last_seen)
    return out

"""Proto3 JSON for the HTTP gateway: requests checked field by field (so a bad value becomes a
BadRequest field violation naming the field), responses printed with protobuf's json_format."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from services.core.errors import Violations

M = TypeVar("M", bound=Message)

_INT32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
_UINT32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
_UINT64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
_RANGES = {
    **dict.fromkeys(_INT32, (-(2**31), 2**31 - 1)),
    **dict.fromkeys(_UINT32, (0, 2**32 - 1)),
    **dict.fromkeys(_INT64, (-(2**63), 2**63 - 1)),
    **dict.fromkeys(_UINT64, (0, 2**64 - 1)),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
_INT_RE = re.compile(r"^-?\d+$")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
STRING_WKT = {
    "google.protobuf.Timestamp": "an RFC 3339 timestamp such as 2026-01-01T00:00:00Z",
    "google.protobuf.Duration": 'a duration in seconds such as "300s"',
    "google.protobuf.FieldMask": 'a comma-separated list of fields such as "smsFallback,dailySmsCap"',
}
_OPAQUE_WKT = {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Any",
    "google.protobuf.Empty",
}


def message_of(field: FieldDescriptor) -> Descriptor:
    found = field.message_type
    assert found is not None, field.full_name
    return found


def enum_of(field: FieldDescriptor) -> EnumDescriptor:
    found = field.enum_type
    assert found is not None, field.full_name
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def field_by_json_key(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    found = descriptor.fields_by_name.get(key)
    if found is not None:
        return found
    return next((f for f in descriptor.fields if f.json_name == key), None)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and message_of(field).GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def check_message(descriptor: Descriptor, value: Any, path: str, problems: Violations) -> None:
    name = descriptor.full_name
    if value is None or name in _OPAQUE_WKT:
        return
    if name in STRING_WKT:
        _check_wkt_string(name, value, path, problems)
        return
    if not isinstance(value, dict):
        problems.add(path or "body", "must be a JSON object")
        return
    for key, item in value.items():
        field = field_by_json_key(descriptor, str(key))
        where = _join(path, field.name if field else str(key))
        if field is None:
            problems.add(where, "unknown field")
        elif item is None:
            continue
        elif _is_map(field):
            if not isinstance(item, dict):
                problems.add(where, "must be a JSON object")
                continue
            key_field = message_of(field).fields_by_name["key"]
            value_field = message_of(field).fields_by_name["value"]
            for map_key, map_value in item.items():
                if key_field.type != FieldDescriptor.TYPE_STRING:
                    _check_scalar(key_field, str(map_key), f"{where}[{map_key}]", problems)
                _check_value(value_field, map_value, f"{where}[{map_key}]", problems)
        elif _is_repeated(field):
            if not isinstance(item, list):
                problems.add(where, "must be a JSON array")
                continue
            for index, element in enumerate(item):
                _check_value(field, element, f"{where}[{index}]", problems)
        else:
            _check_value(field, item, where, problems)


def _check_value(field: FieldDescriptor, value: Any, path: str, problems: Violations) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        check_message(message_of(field), value, path, problems)
    else:
        _check_scalar(field, value, path, problems)


def _check_wkt_string(name: str, value: Any, path: str, problems: Violations) -> None:
    if not isinstance(value, str):
        problems.add(path, f"must be {STRING_WKT[name]}")
        return
    parser: Message | None = None
    if name == "google.protobuf.Timestamp":
        parser = timestamp_pb2.Timestamp()
    elif name == "google.protobuf.Duration":
        parser = duration_pb2.Duration()
    if parser is None:
        return
    try:
        parser.FromJsonString(value)  # type: ignore[attr-defined]
    except (ValueError, TypeError, OverflowError):
        problems.add(path, f"must be {STRING_WKT[name]}")


def _check_scalar(field: FieldDescriptor, value: Any, path: str, problems: Violations) -> None:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            problems.add(path, "must be a string")
    elif kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            problems.add(path, "must be true or false")
    elif kind in _RANGES:
        number: int | None = None
        if isinstance(value, bool):
            number = None
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and _INT_RE.match(value.strip()):
            number = int(value.strip())
        low, high = _RANGES[kind]
        if number is None:
            problems.add(path, "must be an integer")
        elif not low <= number <= high:
            problems.add(path, f"must be between {low} and {high}")
    elif kind in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            problems.add(path, "must be a number")
        elif isinstance(value, str):
            try:
                float(value)
            except ValueError:
                problems.add(path, "must be a number")
    elif kind == FieldDescriptor.TYPE_ENUM:
        names = [v.name for v in enum_of(field).values]
        if isinstance(value, str):
            if value not in enum_of(field).values_by_name:
                problems.add(path, f"must be one of {', '.join(names)}")
        elif isinstance(value, bool) or not isinstance(value, int) or value not in enum_of(field).values_by_number:
            problems.add(path, f"must be one of {', '.join(names)}")
    elif kind == FieldDescriptor.TYPE_BYTES and (not isinstance(value, str) or not _BASE64_RE.match(value)):
        problems.add(path, "must be base64")


def parse_message(cls: type[M], data: Any, problems: Violations | None = None) -> M:
    """A request message from decoded JSON; raises INVALID_ARGUMENT listing every bad field
    (with those already found in `problems`, e.g. by query_to_json)."""
    problems = problems if problems is not None else Violations()
    descriptor: Descriptor = cls.DESCRIPTOR  # type: ignore[assignment]
    check_message(descriptor, data, "", problems)
    problems.raise_if_any()
    message = cls()
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        found = re.search(r"Failed to parse (\w+) field", str(exc))
        problems.add(found.group(1) if found else "body", "invalid value")
        problems.raise_if_any()
    return message


def query_to_json(descriptor: Descriptor, items: Iterable[tuple[str, str]], problems: Violations) -> dict[str, Any]:
    """Query parameters (`pageSize=10`, `page_size=10`, `a.b=1`, repeated keys) as a JSON object."""
    result: dict[str, Any] = {}
    for key, raw in items:
        target, current, path = result, descriptor, ""
        parts = key.split(".")
        field: FieldDescriptor | None = None
        for index, part in enumerate(parts):
            field = field_by_json_key(current, part)
            path = _join(path, field.name if field else part)
            if field is None:
                problems.add(path, "unknown field")
                break
            last = index == len(parts) - 1
            if not last:
                if field.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(field):
                    problems.add(path, "has no fields")
                    field = None
                    break
                target = target.setdefault(field.name, {})
                current = message_of(field)
        if field is None:
            continue
        if _is_map(field) or (
            field.type == FieldDescriptor.TYPE_MESSAGE and message_of(field).full_name not in STRING_WKT
        ):
            problems.add(path, "cannot be set in the query string")
            continue
        value: Any = raw
        if field.type == FieldDescriptor.TYPE_BOOL:
            lowered = raw.strip().lower()
            value = True if lowered in ("true", "1") else False if lowered in ("false", "0") else raw
        elif field.type == FieldDescriptor.TYPE_ENUM and _INT_RE.match(raw):
            value = int(raw)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and message_of(field).full_name == "google.protobuf.FieldMask":
            value = field_mask_json(raw)
        if _is_repeated(field):
            target.setdefault(field.name, []).append(value)
        else:
            target[field.name] = value
    return result


def field_mask_json(raw: str) -> str:
    """A field mask as proto3 JSON spells it (lowerCamelCase paths), also when given in the
    proto's own snake_case names (`daily_sms_cap` -> `dailySmsCap`), as gRPC callers know them."""
    return ",".join(re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), path.strip()) for path in raw.split(","))


def put_path_values(descriptor: Descriptor, data: dict[str, Any], values: Mapping[str, str]) -> None:
    """Path variables override the body (`{id}`, `{policy.client_id}`)."""
    for field_path, value in values.items():
        target, current = data, descriptor
        *parents, leaf = field_path.split(".")
        for parent in parents:
            field = current.fields_by_name[parent]
            nested = target.get(parent)
            if not isinstance(nested, dict):
                nested = target[parent] = {}
            target, current = nested, message_of(field)
        for key in [k for k in target if (f := field_by_json_key(current, str(k))) is not None and f.name == leaf]:
            del target[key]
        target[leaf] = value


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)

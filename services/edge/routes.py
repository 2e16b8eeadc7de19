"""HTTP routes read from the `google.api.http` annotations of the gRPC services (one source of truth).

Path templates follow the HTTP transcoding grammar: literals, `{field}` and `{field=a/*}`
variables, `*` and `**` wildcards, and a trailing custom verb such as `:cancel`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from google.api import annotations_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

_VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class HttpRule:
    service: ServiceDescriptor
    method: MethodDescriptor
    verb: str  # GET, POST, ...
    template: str
    body: str  # "", "*" or a field name
    pattern: re.Pattern[str]
    # Named groups of `pattern` -> field paths ("id", "user_id").
    variables: tuple[tuple[str, str], ...]

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(field for _, field in self.variables)

    def match(self, raw_path: str) -> dict[str, str] | None:
        found = self.pattern.match(raw_path)
        if found is None:
            return None
        return {field: unquote(found.group(group)) for group, field in self.variables}


def _split_outside_braces(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _segments_regex(segments: list[str], variables: list[tuple[str, str]]) -> str:
    pieces = []
    for segment in segments:
        if segment == "*":
            pieces.append("[^/]+")
        elif segment == "**":
            pieces.append(".+")
        elif segment.startswith("{") and segment.endswith("}"):
            inner = segment[1:-1]
            field, _, sub = inner.partition("=")
            group = f"v{len(variables)}"
            variables.append((group, field.strip()))
            body = _segments_regex(sub.split("/"), variables) if sub else "[^/]+"
            pieces.append(f"(?P<{group}>{body})")
        else:
            pieces.append(re.escape(segment))
    return "/".join(pieces)


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[tuple[str, str], ...]]:
    if not template.startswith("/"):
        raise ValueError(f"path template must start with '/': {template!r}")
    segments = _split_outside_braces(template[1:], "/")
    verb = ""
    last = _split_outside_braces(segments[-1], ":")
    if len(last) > 1:
        segments[-1], verb = ":".join(last[:-1]), last[-1]
    variables: list[tuple[str, str]] = []
    regex = "/" + _segments_regex(segments, variables) + (re.escape(":" + verb) if verb else "")
    return re.compile(f"^{regex}$"), tuple(variables)


def rules_for(service: ServiceDescriptor) -> list[HttpRule]:
    rules = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        http = options.Extensions[annotations_pb2.http]
        for binding in [http, *http.additional_bindings]:
            verb = next((v for v in _VERBS if getattr(binding, v)), "")
            if not verb:
                continue
            template = getattr(binding, verb)
            pattern, variables = compile_template(template)
            rules.append(HttpRule(service, method, verb.upper(), template, binding.body, pattern, variables))
    return rules

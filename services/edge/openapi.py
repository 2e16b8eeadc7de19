"""The OpenAPI 3.0 document of the HTTP/JSON API, generated from the protos.

Paths come from the same `google.api.http` annotations the gateway routes by; schemas follow
the proto3 JSON mapping the gateway speaks (lowerCamelCase names, enums as names, 64-bit
integers as strings, Timestamp/Duration as strings); errors are google.rpc.Status. Run
`python tools/openapi.py` to regenerate gen/openapi/openapi.json and `--check` for drift.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorSet
from otpgate.delivery.v1 import delivery_pb2
from otpgate.edge.v1 import edge_pb2
from otpgate.telegramsim.v1 import telegramsim_pb2

from services.edge.jsonproto import STRING_WKT, enum_of, message_of
from services.edge.routes import HttpRule, rules_for

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT_PATH = ROOT / "gen" / "openapi" / "openapi.json"
SANDBOX_FLAG = "x-otpgate-sandbox"

# The API proper (API key; AdminService needs an admin-scope key), then the sandbox's.
PUBLIC_SERVICES: tuple[ServiceDescriptor, ...] = (
    edge_pb2.DESCRIPTOR.services_by_name["PublicService"],
    edge_pb2.DESCRIPTOR.services_by_name["AdminService"],
)
SANDBOX_SERVICES: tuple[ServiceDescriptor, ...] = (
    telegramsim_pb2.DESCRIPTOR.services_by_name["SandboxService"],
    delivery_pb2.DESCRIPTOR.services_by_name["SmsSandboxService"],
    edge_pb2.DESCRIPTOR.services_by_name["CaptchaSandboxService"],
)
STATUS_REF = "#/components/schemas/google.rpc.Status"
# HTTP statuses the gateway answers besides 200, with what they mean.
ERROR_RESPONSES = {
    "400": "The request is invalid (google.rpc.BadRequest lists the fields).",
    "401": "The API key is missing, invalid or revoked.",
    "403": "The API key lacks the scope, or the policy or fraud guard refused the request.",
    "404": "Not found (someone else's id looks exactly like an unknown one).",
    "409": "Conflict, e.g. the same request_id with different content.",
    "412": "A precondition failed, e.g. a CAPTCHA is required (google.rpc.PreconditionFailure).",
    "413": "The request body is too large.",
    "429": "Too many requests (google.rpc.RetryInfo and the Retry-After header say when to retry).",
    "503": "A service is unavailable; retry with backoff.",
}
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_SINT32: "int32",
    FieldDescriptor.TYPE_SFIXED32: "int32",
    FieldDescriptor.TYPE_UINT32: "int64",
    FieldDescriptor.TYPE_FIXED32: "int64",
}
_LONG_TYPES = {
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_SINT64: "int64",
    FieldDescriptor.TYPE_SFIXED64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FIXED64: "uint64",
}
_WKT_SCHEMAS: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "example": "300s"},
    "google.protobuf.FieldMask": {"type": "string"},
}


def comments_from(descriptor_set: FileDescriptorSet) -> dict[str, str]:
    """Leading comments by full element name (messages, fields, enums, services, methods)."""
    found: dict[str, str] = {}
    for file in descriptor_set.file:
        by_path = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
        package = file.package

        def walk_message(
            message: Any, prefix: str, path: tuple[int, ...], by_path: dict[tuple[int, ...], str] = by_path
        ) -> None:
            name = f"{prefix}.{message.name}"
            found[name] = by_path.get(path, "")
            for i, field in enumerate(message.field):
                found[f"{name}.{field.name}"] = by_path.get((*path, 2, i), "")
            for i, nested in enumerate(message.nested_type):
                walk_message(nested, name, (*path, 3, i))
            for i, enum in enumerate(message.enum_type):
                walk_enum(enum, name, (*path, 4, i))

        def walk_enum(
            enum: Any, prefix: str, path: tuple[int, ...], by_path: dict[tuple[int, ...], str] = by_path
        ) -> None:
            name = f"{prefix}.{enum.name}"
            found[name] = by_path.get(path, "")
            for i, value in enumerate(enum.value):
                found[f"{name}.{value.name}"] = by_path.get((*path, 2, i), "")

        for i, message in enumerate(file.message_type):
            walk_message(message, package, (4, i))
        for i, enum in enumerate(file.enum_type):
            walk_enum(enum, package, (5, i))
        for i, service in enumerate(file.service):
            name = f"{package}.{service.name}"
            found[name] = by_path.get((6, i), "")
            for j, method in enumerate(service.method):
                found[f"{name}.{method.name}"] = by_path.get((6, i, 2, j), "")
    return {k: " ".join(v.split()) for k, v in found.items() if v}


class _Builder:
    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {}

    def describe(self, schema: dict[str, Any], name: str) -> dict[str, Any]:
        text = self.comments.get(name)
        if text:
            if "$ref" in schema:  # OpenAPI 3.0 ignores siblings of $ref
                return {"allOf": [schema], "description": text}
            schema["description"] = text
        return schema

    def enum(self, enum: EnumDescriptor) -> dict[str, Any]:
        if enum.full_name not in self.schemas:
            schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in enum.values]}
            lines = [
                f"{v.name}: {self.comments[f'{enum.full_name}.{v.name}']}"
                for v in enum.values
                if f"{enum.full_name}.{v.name}" in self.comments
            ]
            summary = self.comments.get(enum.full_name, "")
            description = " ".join([summary, *(f"- {line}" for line in lines)]).strip()
            if description:
                schema["description"] = description
            self.schemas[enum.full_name] = schema
        return {"$ref": f"#/components/schemas/{enum.full_name}"}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        name = descriptor.full_name
        if name in _WKT_SCHEMAS:
            return dict(_WKT_SCHEMAS[name])
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder against recursion
            self.schemas[name] = self.object_schema(descriptor, (), strict=False)
        return {"$ref": f"#/components/schemas/{name}"}

    def object_schema(self, descriptor: Descriptor, skip: tuple[str, ...], *, strict: bool) -> dict[str, Any]:
        properties = {
            field.json_name: self.describe(self.field(field), f"{descriptor.full_name}.{field.name}")
            for field in descriptor.fields
            if field.name not in skip
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if strict:
            schema["additionalProperties"] = False
        text = self.comments.get(descriptor.full_name)
        if text:
            schema["description"] = text
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE and message_of(field).GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.single(message_of(field).fields_by_name["value"])}
        single = self.single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def single(self, field: FieldDescriptor) -> dict[str, Any]:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self.message(message_of(field))
        if kind == FieldDescriptor.TYPE_ENUM:
            return self.enum(enum_of(field))
        if kind == FieldDescriptor.TYPE_STRING:
            return {"type": "string"}
        if kind == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if kind in _INT_TYPES:
            return {"type": "integer", "format": _INT_TYPES[kind]}
        if kind in _LONG_TYPES:
            return {"type": "string", "format": _LONG_TYPES[kind], "pattern": "^-?[0-9]+$"}
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return {"type": "number", "format": "double"}
        if kind == FieldDescriptor.TYPE_FLOAT:
            return {"type": "number", "format": "float"}
        return {"type": "string", "format": "byte"}

    def query_parameters(self, descriptor: Descriptor, skip: tuple[str, ...], prefix: str = "") -> list[dict[str, Any]]:
        params: list[dict[str, Any]] = []
        for field in descriptor.fields:
            if field.name in skip:
                continue
            name = f"{prefix}{field.json_name}"
            is_message = field.type == FieldDescriptor.TYPE_MESSAGE
            if is_message and message_of(field).full_name not in STRING_WKT:
                if not field.is_repeated and not message_of(field).GetOptions().map_entry:
                    params += self.query_parameters(message_of(field), (), f"{name}.")
                continue
            param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": self.field(field)}
            text = self.comments.get(f"{descriptor.full_name}.{field.name}")
            if text:
                param["description"] = text
            if field.is_repeated:
                param["explode"] = True
            params.append(param)
        return params

    def operation(self, rule: HttpRule, sandbox: bool) -> dict[str, Any]:
        method = rule.method
        request = method.input_type
        path_fields = rule.path_fields
        parameters: list[dict[str, Any]] = []
        for field_path in path_fields:
            target: Descriptor = request
            *parents, leaf = field_path.split(".")
            for parent in parents:
                target = message_of(target.fields_by_name[parent])
            field = target.fields_by_name[leaf]
            param: dict[str, Any] = {"name": leaf, "in": "path", "required": True, "schema": self.single(field)}
            text = self.comments.get(f"{target.full_name}.{leaf}")
            if text:
                param["description"] = text
            parameters.append(param)
        top_level_path = tuple(p for p in path_fields if "." not in p)
        if rule.body == "":
            parameters += self.query_parameters(request, top_level_path)
        operation: dict[str, Any] = {
            "operationId": f"{rule.service.name}_{method.name}",
            "tags": [rule.service.name],
        }
        summary = self.comments.get(f"{rule.service.full_name}.{method.name}")
        if summary:
            operation["summary"] = summary
        if parameters:
            operation["parameters"] = parameters
        if rule.body == "*":
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": self.object_schema(request, top_level_path, strict=True)}},
            }
        elif rule.body:
            body_field = request.fields_by_name[rule.body]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": self.field(body_field)}},
            }
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": self.message(method.output_type)}},
            }
        }
        for status in ERROR_RESPONSES:
            if sandbox and status in ("401", "403"):
                continue
            ref = "RateLimited" if status == "429" else "Error"
            responses[status] = {"$ref": f"#/components/responses/{ref}"}
        responses["default"] = {"$ref": "#/components/responses/Error"}
        operation["responses"] = responses
        if sandbox:
            operation["security"] = []
            operation[SANDBOX_FLAG] = True
        return operation


def document_path(template: str) -> str:
    """The OpenAPI path of a route: a nested variable is named by its last part
    (`{policy.client_id}` -> `{client_id}`), so that routes to one resource share one path item
    (OpenAPI forbids two templates that differ only in their variable names)."""
    return re.sub(r"\{(?:\w+\.)+(\w+)\}", r"{\1}", template)


def _status_schemas() -> dict[str, Any]:
    return {
        "google.rpc.Status": {
            "type": "object",
            "description": "An error: the gRPC status code, a message and typed details (google.rpc.ErrorInfo "
            "with an UPPER_SNAKE reason and domain otpgate, BadRequest, QuotaFailure, RetryInfo, "
            "PreconditionFailure).",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "integer", "format": "int32", "description": "The google.rpc.Code."},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"$ref": "#/components/schemas/google.protobuf.Any"}},
            },
        },
        "google.protobuf.Any": {
            "type": "object",
            "description": "A typed detail; @type names it, e.g. type.googleapis.com/google.rpc.ErrorInfo.",
            "required": ["@type"],
            "properties": {"@type": {"type": "string"}},
            "additionalProperties": True,
        },
    }


def _add_links(paths: dict[str, dict[str, Any]], rules: list[HttpRule]) -> None:
    """OpenAPI links from a creating call to the calls on what it created, e.g. the `message.id` of
    POST /v1/messages feeds GET /v1/messages/{id} (clients and stateful test tools follow them)."""
    for create in rules:
        if create.verb != "POST" or create.variables:
            continue
        output = create.method.output_type
        carriers = [f for f in output.fields if f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated]
        if len(carriers) != 1 or "id" not in message_of(carriers[0]).fields_by_name:
            continue
        links: dict[str, Any] = {}
        for target in rules:
            if target.template.startswith(create.template + "/{id}") and target.path_fields == ("id",):
                links[target.method.name] = {
                    "operationId": f"{target.service.name}_{target.method.name}",
                    "parameters": {"id": f"$response.body#/{carriers[0].json_name}/id"},
                }
        if links:
            paths[create.template][create.verb.lower()]["responses"]["200"]["links"] = links


def build_document(comments: Mapping[str, str] | None = None) -> dict[str, Any]:
    builder = _Builder(comments or {})
    paths: dict[str, dict[str, Any]] = {}
    for services, sandbox in ((PUBLIC_SERVICES, False), (SANDBOX_SERVICES, True)):
        for service in services:
            for rule in rules_for(service):
                item = paths.setdefault(document_path(rule.template), {})
                item[rule.verb.lower()] = builder.operation(rule, sandbox)
                if sandbox:
                    item[SANDBOX_FLAG] = True
    _add_links(paths, [r for s in PUBLIC_SERVICES for r in rules_for(s)])
    tags = [
        {"name": s.name, "description": builder.comments.get(s.full_name, "")}
        for s in (*PUBLIC_SERVICES, *SANDBOX_SERVICES)
    ]
    schemas = {**dict(sorted(builder.schemas.items())), **_status_schemas()}
    error_content = {"application/json": {"schema": {"$ref": STATUS_REF}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "otpgate API",
            "version": "v1",
            "description": "One-time codes and service notices through Telegram bots. Authenticate with "
            "`Authorization: Bearer <API key>`. Errors are google.rpc.Status objects. The /sandbox/v1 paths "
            "exist only in sandbox mode.",
        },
        "tags": tags,
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "otpg_<key id>_<secret>",
                    "description": "An API key issued with `otpgate apikeys create`.",
                }
            },
            "responses": {
                "Error": {"description": "An error (google.rpc.Status).", "content": error_content},
                "RateLimited": {
                    "description": ERROR_RESPONSES["429"],
                    "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
                    "content": error_content,
                },
            },
            "schemas": schemas,
        },
    }


def render(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def load_document(path: Path = DOCUMENT_PATH) -> dict[str, Any]:
    """The committed document; generated on the fly (without comments) if it is missing."""
    if path.exists():
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    return build_document()


def without_sandbox(document: Mapping[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(document))
    copy["paths"] = {p: item for p, item in copy["paths"].items() if not item.get(SANDBOX_FLAG)}
    sandbox_tags = {s.name for s in SANDBOX_SERVICES}
    copy["tags"] = [t for t in copy.get("tags", []) if t["name"] not in sandbox_tags]
    return copy

"""The OpenAPI document is generated from the protos, committed, and free of drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.edge.openapi import (
    DOCUMENT_PATH,
    PUBLIC_SERVICES,
    SANDBOX_FLAG,
    document_path,
    load_document,
    without_sandbox,
)
from services.edge.routes import rules_for

ROOT = Path(__file__).resolve().parents[3]


def test_committed_document_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "openapi.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert DOCUMENT_PATH.exists()


def test_document_describes_routes_auth_and_errors() -> None:
    document = load_document()
    assert document["openapi"].startswith("3.0")
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "otpg_<key id>_<secret>",
        "description": "An API key issued with `otpgate apikeys create`.",
    }
    assert document["security"] == [{"bearerAuth": []}]
    for rule in (r for s in PUBLIC_SERVICES for r in rules_for(s)):
        operation = document["paths"][document_path(rule.template)][rule.verb.lower()]
        assert operation["operationId"] == f"{rule.service.name}_{rule.method.name}"
        assert operation["responses"]["429"] == {"$ref": "#/components/responses/RateLimited"}
        assert operation["responses"]["default"] == {"$ref": "#/components/responses/Error"}
    # Reading and changing a policy share one path item, the nested variable named by its leaf.
    policy = document["paths"]["/v1/clients/{client_id}/policy"]
    assert set(policy) == {"get", "patch"}
    assert [p["name"] for p in policy["patch"]["parameters"] if p["in"] == "path"] == ["client_id"]
    status = document["components"]["schemas"]["google.rpc.Status"]
    assert set(status["properties"]) == {"code", "message", "details"}
    assert "Retry-After" in document["components"]["responses"]["RateLimited"]["headers"]
    message = document["components"]["schemas"]["otpgate.common.v1.Message"]["properties"]
    assert message["createTime"] == {"type": "string", "format": "date-time"}
    assert document["components"]["schemas"]["otpgate.common.v1.MessageStatus"]["enum"][0] == (
        "MESSAGE_STATUS_UNSPECIFIED"
    )
    user = document["components"]["schemas"]["otpgate.telegramsim.v1.SandboxUser"]["properties"]["userId"]
    assert user["type"] == "string" and user["format"] == "int64"  # proto3 JSON: 64-bit integers are strings
    links = document["paths"]["/v1/messages"]["post"]["responses"]["200"]["links"]
    assert links["GetMessage"] == {
        "operationId": "PublicService_GetMessage",
        "parameters": {"id": "$response.body#/message/id"},
    }
    assert set(document["paths"]["/v1/verifications"]["post"]["responses"]["200"]["links"]) == {
        "GetVerification",
        "CheckVerification",
        "CancelVerification",
    }
    body = document["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False and "captchaToken" in body["properties"]


def test_sandbox_paths_are_marked_and_can_be_dropped() -> None:
    document = load_document()
    sandbox = [p for p, item in document["paths"].items() if item.get(SANDBOX_FLAG)]
    assert sandbox and all(p.startswith("/sandbox/v1/") for p in sandbox)
    public = without_sandbox(document)
    assert all(p.startswith("/v1/") for p in public["paths"])

"""Schemathesis against /openapi.json on a live edge (in front of the real services): no 5xx, and
every response (status, content type, headers, body) matches the generated document."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.edge.conftest import SiteVerify, available, edge_stack
from tests.support.stack import ALL_SERVICES

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.skipif(not available(*ALL_SERVICES), reason="needs all five services")
@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is a dev dependency")
async def test_schemathesis_finds_no_server_errors_and_no_schema_mismatch(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, tmp_path: Path, siteverify: SiteVerify
) -> None:
    overrides = {"OTPGATE_EDGE_KEY_RATE": "10000", "OTPGATE_EDGE_KEY_BURST": "10000", "OTPGATE_EDGE_IP_RATE": "10000"}
    # Generated CAPTCHA tokens go to the local siteverify (which refuses them: 412, documented).
    async with edge_stack(
        mongo_client, keyring, services=ALL_SERVICES, overrides=overrides, siteverify_url=siteverify.url
    ) as edge:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "run",
            edge.url("/openapi.json"),
            "--checks",
            CHECKS,
            "--header",
            f"Authorization: Bearer {edge.key}",
            "--include-path-regex",
            "^/v1/",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "5",
            "--seed",
            "20261121",
            # One worker: hypothesis' lambda descriptions call ast.parse, which is not thread-safe on 3.11.
            "--workers",
            "1",
            "--request-timeout",
            "5",
            "--no-shrink",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=150)
        text = output.decode(errors="replace")
        elapsed = time.monotonic() - started
    assert process.returncode == 0, text[-6000:]
    assert "passed" in text.lower(), text[-2000:]
    print(f"schemathesis: {elapsed:.1f} s\n{text[-1500:]}")

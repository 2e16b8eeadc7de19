"""The HTTP/JSON gateway on its own: auth, scopes, routing, body checks, limits, documents."""

from __future__ import annotations

from typing import Any

import aiohttp
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.edge.conftest import edge_stack


def _reason(body: dict[str, Any]) -> str:
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))


def _violations(body: dict[str, Any]) -> list[tuple[str, str]]:
    bad = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    return [(v["field"], v["description"]) for v in bad["fieldViolations"]]


async def test_authentication_and_scopes(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: Any
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock) as edge:
        status, body, _ = await edge.get("/v1/messages/01ABC")
        assert (status, body["code"], _reason(body)) == (401, 16, "API_KEY_MISSING")
        status, body, _ = await edge.get("/v1/messages/01ABC", headers={"Authorization": "Basic Zm9vOmJhcg=="})
        assert (status, _reason(body)) == (401, "API_KEY_MISSING")
        status, body, _ = await edge.get("/v1/messages/01ABC", headers=edge.auth("otpg_nothing"))
        assert (status, _reason(body)) == (401, "API_KEY_INVALID")
        wrong = edge.key[:-1] + ("a" if edge.key[-1] != "a" else "b")
        status, body, _ = await edge.get("/v1/messages/01ABC", headers=edge.auth(wrong))
        assert (status, _reason(body)) == (401, "API_KEY_INVALID")

        verify_only = await edge.new_key(edge.client_id, ["verify"])
        status, body, _ = await edge.get("/v1/messages/01ABC", headers=edge.auth(verify_only))
        assert (status, body["code"], _reason(body)) == (403, 7, "SCOPE_MISSING")
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(verify_only), json={})
        assert (status, _reason(body)) == (403, "SCOPE_MISSING")

        # Revoked through AdminService: refused at once on this replica.
        admin_key = await edge.new_key(edge.client_id, ["admin"])
        stub = edge_pb2_grpc.AdminServiceStub(edge.stack.channel("edge"))
        await stub.RevokeApiKey(
            edge_pb2.RevokeApiKeyRequest(id=verify_only.split("_")[1]),
            metadata=(("authorization", f"Bearer {admin_key}"),),
        )
        status, body, _ = await edge.get("/v1/verifications/01ABC", headers=edge.auth(verify_only))
        # The same answer as for a key that never existed: a caller learns nothing about key ids.
        never = "otpg_" + "Z" * 16 + "_" + verify_only.split("_")[2]
        assert (await edge.get("/v1/verifications/01ABC", headers=edge.auth(never)))[:2] == (status, body)
        assert (status, _reason(body), body["message"]) == (401, "API_KEY_INVALID", "the API key is invalid")
        logs = captured_logs.text()
        assert edge.key not in logs and verify_only not in logs and admin_key not in logs


async def test_bodies_routes_and_sizes(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock) as edge:
        headers = edge.auth()
        status, body, _ = await edge.post("/v1/messages", headers=headers, data=b'{"phone": "+49151', timeout=5)
        assert (status, body["code"], _violations(body)) == (400, 3, [("body", "is not valid JSON")])
        status, body, _ = await edge.post(
            "/v1/messages",
            headers=headers,
            json={"phone": 4915112345678, "text": ["hi"], "channel": "FAX", "ttl": 60, "confirmDays": "x", "to": "y"},
        )
        assert status == 400
        assert _violations(body) == [
            ("phone", "must be a string"),
            ("text", "must be a string"),
            (
                "channel",
                "must be one of CHANNEL_UNSPECIFIED, CHANNEL_AUTO, CHANNEL_TELEGRAM, CHANNEL_SMS, CHANNEL_TELEGRAM_GATEWAY",
            ),
            ("ttl", 'must be a duration in seconds such as "300s"'),
            ("confirm_days", "must be an integer"),
            ("to", "unknown field"),
        ]
        status, body, _ = await edge.post("/v1/messages", headers=headers, data=b"[" * 60_000)
        assert (status, _violations(body)) == (400, [("body", "is not valid JSON")])  # nesting bomb
        status, body, _ = await edge.post("/v1/messages", headers=headers, json=[1, 2])
        assert (status, _violations(body)) == (400, [("body", "must be a JSON object")])
        status, body, _ = await edge.get("/v1/messages?pageSize=ten&color=red", headers=headers)
        assert (status, sorted(_violations(body))) == (
            400,
            [("color", "unknown field"), ("page_size", "must be an integer")],
        )

        big = b'{"phone": "+4915112345678", "text": "' + b"x" * 70_000 + b'"}'
        status, body, _ = await edge.post("/v1/messages", headers=headers, data=big)
        assert (status, _reason(body)) == (413, "REQUEST_TOO_LARGE")

        async def chunks() -> Any:
            for _ in range(20):
                yield b"x" * 8192

        status, body, _ = await edge.post("/v1/messages", headers=headers, data=chunks())
        assert (status, _reason(body)) == (413, "REQUEST_TOO_LARGE")

        status, body, _ = await edge.get("/v1/nothing", headers=headers)
        assert (status, _reason(body)) == (404, "ROUTE_NOT_FOUND")
        async with edge.http.delete(edge.url("/v1/messages/1"), headers=headers) as reply:
            assert reply.status == 405 and reply.headers["Allow"] == "GET"
            assert _reason(await reply.json()) == "METHOD_NOT_ALLOWED"


async def test_rate_limits_answer_429_with_retry_after(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {
        "OTPGATE_EDGE_KEY_RATE": "1",
        "OTPGATE_EDGE_KEY_BURST": "3",
        "OTPGATE_EDGE_IP_RATE": "2",
        "OTPGATE_EDGE_IP_BURST": "6",
        "OTPGATE_EDGE_TRUSTED_PROXIES": "127.0.0.1",
    }
    async with edge_stack(mongo_client, keyring, clock=clock, overrides=overrides) as edge:

        async def bad_send(key: str | None = None, ip: str = "198.51.100.1") -> tuple[int, Any, Any]:
            headers = {**edge.auth(key), "X-Forwarded-For": ip}
            return await edge.post("/v1/messages", headers=headers, data=b"{")  # refused before any downstream call

        assert [(await bad_send())[0] for _ in range(3)] == [400, 400, 400]
        status, body, headers = await bad_send()
        assert (status, body["code"], _reason(body)) == (429, 8, "EDGE_RATE_LIMITED")
        assert headers["Retry-After"] == "1"
        retry = next(d for d in body["details"] if d["@type"].endswith("google.rpc.RetryInfo"))
        assert retry["retryDelay"] == "1s"
        # Another key of the same client has its own bucket.
        other = await edge.new_key(edge.client_id, [])
        assert (await bad_send(other))[0] == 400
        # The per-IP bucket counts every request from the address, with or without a valid key.
        assert (await bad_send("otpg_x"))[0] == 401
        status, body, headers = await bad_send(other)
        assert (status, headers["Retry-After"]) == (429, "1")
        # The IP is the first untrusted X-Forwarded-For hop: another address is not limited.
        assert (await bad_send(other, ip="203.0.113.5"))[0] == 400
        clock.advance(3)
        assert (await bad_send())[0] == 400


async def test_documents_and_health(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock) as edge:
        status, document, headers = await edge.get("/openapi.json")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert "/v1/messages" in document["paths"] and "/sandbox/v1/sms" in document["paths"]
        _, _, headers = await edge.get("/v1/bots", headers={"X-Request-Id": "req-abc-123"})
        assert headers["X-Request-Id"] == "req-abc-123"
        _, _, headers = await edge.get("/v1/bots")
        assert len(headers["X-Request-Id"]) == 16
        status, health, _ = await edge.get("/healthz")
        # Only the edge runs here: its database is fine, the services behind it are not reachable.
        assert status == 503 and health["checks"]["database"] == "SERVING"
        assert health["checks"]["delivery"] == "NOT_SERVING"
    async with edge_stack(mongo_client, keyring, clock=clock, overrides={"OTPGATE_SANDBOX": "false"}) as edge:
        status, document, _ = await edge.get("/openapi.json")
        assert not any(p.startswith("/sandbox") for p in document["paths"])
        status, body, _ = await edge.get("/sandbox/v1/sms?phone=%2B4915112345678")
        assert (status, _reason(body)) == (404, "ROUTE_NOT_FOUND")
        assert isinstance(edge.http, aiohttp.ClientSession)

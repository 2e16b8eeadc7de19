"""gRPC PublicService/AdminService: the same auth answers as HTTP; AdminService manages clients and keys."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import RpcFailure, http_status_for, parse_rpc_error
from services.core.mongo import Document
from tests.integration.edge.conftest import Edge, edge_stack


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


async def _grpc_failure(call: Any, request: Any, key: str) -> RpcFailure:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, metadata=_md(key))
    return parse_rpc_error(caught.value)


async def _same_answer(edge: Edge, key: str, path: str, call: Any, request: Any) -> RpcFailure:
    """The HTTP and gRPC answers to one call agree: status, reason and message."""
    failure = await _grpc_failure(call, request, key)
    status, body, _ = await edge.get(path, headers=edge.auth(key) if key else {})
    reason = next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert (status, body["code"], reason, body["message"]) == (
        http_status_for(failure.code),
        failure.code.value[0],
        failure.reason,
        failure.message,
    )
    return failure


async def test_grpc_and_http_refuse_alike(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock) as edge:
        stub = edge_pb2_grpc.PublicServiceStub(edge.stack.channel("edge"))
        request = edge_pb2.GetMessageRequest(id="01ABC")
        missing = await _same_answer(edge, "", "/v1/messages/01ABC", stub.GetMessage, request)
        assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")
        invalid = await _same_answer(edge, "otpg_bad", "/v1/messages/01ABC", stub.GetMessage, request)
        assert invalid.reason == "API_KEY_INVALID"
        send_only = await edge.new_key(edge.client_id, ["messages:send"])
        scope = await _same_answer(edge, send_only, "/v1/messages/01ABC", stub.GetMessage, request)
        assert (scope.code, scope.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
        verification = await _same_answer(
            edge, send_only, "/v1/verifications/01ABC", stub.GetVerification, edge_pb2.GetVerificationRequest(id="x")
        )
        assert verification.reason == "SCOPE_MISSING"
        # Admin keys are for AdminService only.
        admin_key = await edge.new_key(edge.client_id, ["admin"])
        assert (await _same_answer(edge, admin_key, "/v1/bots", stub.ListBots, edge_pb2.ListBotsRequest())).reason == (
            "SCOPE_MISSING"
        )


async def test_admin_service_manages_clients_and_keys(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock) as edge:
        admin = edge_pb2_grpc.AdminServiceStub(edge.stack.channel("edge"))
        denied = await _grpc_failure(admin.ListClients, edge_pb2.ListClientsRequest(), edge.key)
        assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
        key = await edge.new_key(edge.client_id, ["admin"])
        md = _md(key)

        created = await admin.CreateClient(edge_pb2.CreateClientRequest(display_name="Shop B"), metadata=md)
        assert created.client.display_name == "Shop B" and created.client.create_time.seconds > 0
        duplicate = await _grpc_failure(admin.CreateClient, edge_pb2.CreateClientRequest(display_name="Shop B"), key)
        assert (duplicate.code, duplicate.reason) == (grpc.StatusCode.ALREADY_EXISTS, "CLIENT_EXISTS")
        for name in ("Shop C", "Shop D"):
            await admin.CreateClient(edge_pb2.CreateClientRequest(display_name=name), metadata=md)
        first = await admin.ListClients(edge_pb2.ListClientsRequest(page_size=2), metadata=md)
        second = await admin.ListClients(
            edge_pb2.ListClientsRequest(page_size=2, page_token=first.next_page_token), metadata=md
        )
        names = [c.display_name for c in [*first.clients, *second.clients]]
        assert sorted(names) == ["Shop A", "Shop B", "Shop C", "Shop D"] and not second.next_page_token
        assert len(first.clients) == 2 and first.next_page_token
        fetched = await admin.GetClient(edge_pb2.GetClientRequest(id=created.client.id), metadata=md)
        assert fetched.client == created.client
        unknown = await _grpc_failure(admin.GetClient, edge_pb2.GetClientRequest(id="nope"), key)
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "CLIENT_NOT_FOUND")

        issued = await admin.CreateApiKey(
            edge_pb2.CreateApiKeyRequest(client_id=created.client.id, scopes=[edge_pb2.API_KEY_SCOPE_MESSAGES_READ]),
            metadata=md,
        )
        assert issued.key.startswith(f"otpg_{issued.api_key.id}_")
        assert list(issued.api_key.scopes) == [edge_pb2.API_KEY_SCOPE_MESSAGES_READ]
        bad_scope = await _grpc_failure(
            admin.CreateApiKey,
            edge_pb2.CreateApiKeyRequest(client_id=created.client.id, scopes=[edge_pb2.API_KEY_SCOPE_UNSPECIFIED]),
            key,
        )
        assert bad_scope.field_violations == [("scopes[0]", "unknown scope")]
        listed = await admin.ListApiKeys(edge_pb2.ListApiKeysRequest(client_id=created.client.id), metadata=md)
        assert [k.id for k in listed.api_keys] == [issued.api_key.id]
        assert issued.key not in str(listed)

        # The new key works over HTTP (it is read: 503 only because delivery is not running here) ...
        status, body, _ = await edge.get("/v1/messages/01ABC", headers=edge.auth(issued.key))
        assert status == 503 and body["message"] == "a service is temporarily unavailable; retry"
        assert "127.0.0.1" not in body["message"]
        revoked = await admin.RevokeApiKey(edge_pb2.RevokeApiKeyRequest(id=issued.api_key.id), metadata=md)
        assert revoked.api_key.revoke_time.seconds > 0
        # ... and is refused once revoked.
        status, body, _ = await edge.get("/v1/messages/01ABC", headers=edge.auth(issued.key))
        assert status == 401
        await edge.app.api.auth.drain()  # type: ignore[union-attr]
        listed = await admin.ListApiKeys(edge_pb2.ListApiKeysRequest(client_id=created.client.id), metadata=md)
        assert listed.api_keys[0].last_use_time.seconds > 0 and listed.api_keys[0].revoke_time.seconds > 0

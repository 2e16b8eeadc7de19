"""The client IP the edge derives (peer, or first untrusted X-Forwarded-For hop) on both transports,
and the edge's business metrics."""

from __future__ import annotations

import grpc
import pytest
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.edge.conftest import SiteVerify, edge_stack


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_origin_ip_on_both_transports(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    overrides = {"OTPGATE_EDGE_TRUSTED_PROXIES": "127.0.0.0/8"}
    async with edge_stack(
        mongo_client, keyring, clock=clock, overrides=overrides, siteverify_url=siteverify.url
    ) as edge:
        stub = edge_pb2_grpc.PublicServiceStub(edge.stack.channel("edge"))
        body = {"phone": "+4915112345678", "captchaToken": "bad-1"}
        headers = {**edge.auth(), "X-Forwarded-For": "192.0.2.1, 203.0.113.9, 127.0.0.2"}
        assert (await edge.post("/v1/verifications", headers=headers, json=body))[0] == 412
        metadata = (("authorization", f"Bearer {edge.key}"), ("x-forwarded-for", "198.51.100.23"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.StartVerification(
                edge_pb2.StartVerificationRequest(phone="+4915112345678", captcha_token="bad-2"), metadata=metadata
            )
        assert [r["remoteip"] for r in siteverify.requests] == ["203.0.113.9", "198.51.100.23"]
    # Without trusted proxies the header is ignored: the peer address counts.
    async with edge_stack(mongo_client, keyring, clock=clock, siteverify_url=siteverify.url) as edge:
        headers = {**edge.auth(), "X-Forwarded-For": "203.0.113.9"}
        assert (await edge.post("/v1/verifications", headers=headers, json={"captchaToken": "bad-3"}))[0] == 412
        assert siteverify.requests[-1]["remoteip"] == "127.0.0.1"


async def test_metrics(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock, siteverify_url=siteverify.url) as edge:
        stub = edge_pb2_grpc.PublicServiceStub(edge.stack.channel("edge"))
        route = {"route": "POST /v1/verifications", "code": "UNAUTHENTICATED"}
        grpc_route = {"route": "/otpgate.edge.v1.PublicService/ListBots", "code": "UNAUTHENTICATED"}
        before = {
            "http": _sample("otpgate_edge_requests_total", route),
            "grpc": _sample("otpgate_edge_requests_total", grpc_route),
            "missing": _sample("otpgate_edge_auth_failures_total", {"reason": "missing"}),
            "failed": _sample("otpgate_captcha_verifications_total", {"outcome": "failed"}),
            "replayed": _sample("otpgate_captcha_verifications_total", {"outcome": "replayed"}),
        }
        await edge.post("/v1/verifications", json={})
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ListBots(edge_pb2.ListBotsRequest())
        for _ in range(2):
            await edge.post("/v1/verifications", headers=edge.auth(), json={"captchaToken": "bad-metrics"})
        admin = edge_pb2_grpc.AdminServiceStub(edge.stack.channel("edge"))
        admin_route = "/otpgate.edge.v1.AdminService/GetClient"
        found = _sample("otpgate_edge_requests_total", {"route": admin_route, "code": "NOT_FOUND"})
        key = await edge.new_key(edge.client_id, ["admin"])
        with pytest.raises(grpc.aio.AioRpcError):
            await admin.GetClient(edge_pb2.GetClientRequest(id="nope"), metadata=(("authorization", f"Bearer {key}"),))
        assert _sample("otpgate_edge_requests_total", {"route": admin_route, "code": "NOT_FOUND"}) == found + 1
        assert _sample("otpgate_edge_requests_total", route) == before["http"] + 1
        assert _sample("otpgate_edge_requests_total", grpc_route) == before["grpc"] + 1
        assert _sample("otpgate_edge_auth_failures_total", {"reason": "missing"}) == before["missing"] + 2
        assert _sample("otpgate_captcha_verifications_total", {"outcome": "failed"}) == before["failed"] + 1
        assert _sample("otpgate_captcha_verifications_total", {"outcome": "replayed"}) == before["replayed"] + 1

"""The client IP the edge derives (peer, or first untrusted X-Forwarded-For hop) on both transports,
and the edge's business metrics."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import parse_rpc_error
from services.core.mongo import Document
from tests.integration.edge.conftest import SiteVerify, edge_stack


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SERVICES = ("edge", "delivery")
ALWAYS = {"captcha_rule": common_pb2.CAPTCHA_RULE_ALWAYS}


async def test_origin_ip_on_both_transports(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    overrides = {"OTPGATE_EDGE_TRUSTED_PROXIES": "127.0.0.0/8"}
    async with edge_stack(
        mongo_client, keyring, services=SERVICES, clock=clock, overrides=overrides, siteverify_url=siteverify.url
    ) as edge:
        await edge.set_policy(["captcha_rule"], **ALWAYS)
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
    async with edge_stack(mongo_client, keyring, services=SERVICES, clock=clock, siteverify_url=siteverify.url) as edge:
        await edge.set_policy(["captcha_rule"], **ALWAYS)
        headers = {**edge.auth(), "X-Forwarded-For": "203.0.113.9"}
        body = {"phone": "+4915112345678", "captchaToken": "bad-3"}
        assert (await edge.post("/v1/verifications", headers=headers, json=body))[0] == 412
        assert siteverify.requests[-1]["remoteip"] == "127.0.0.1"
        # A server calling for its users names the user's address: it wins over what the edge sees.
        body = {**body, "captchaToken": "bad-4", "endUserIp": "2001:db8::7"}
        assert (await edge.post("/v1/verifications", headers=headers, json=body))[0] == 412
        assert siteverify.requests[-1]["remoteip"] == "2001:db8::7"
        mapped = {**body, "captchaToken": "bad-5", "endUserIp": "::ffff:192.0.2.44"}
        assert (await edge.post("/v1/verifications", headers=headers, json=mapped))[0] == 412
        assert siteverify.requests[-1]["remoteip"] == "192.0.2.44"


async def test_end_user_fields_are_checked_before_anything_else(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    async with edge_stack(mongo_client, keyring, services=SERVICES, clock=clock, siteverify_url=siteverify.url) as edge:
        await edge.set_policy(["captcha_rule"], **ALWAYS)
        stub = edge_pb2_grpc.PublicServiceStub(edge.stack.channel("edge"))
        bad = {"endUserIp": "203.0.113.300", "endUserAgent": "x" * 513, "captchaToken": "pass-unused"}
        for path, body in (
            ("/v1/messages", {"phone": "+4915112345678", "text": "Your code: 1", **bad}),
            ("/v1/verifications", {"phone": "+4915112345678", **bad}),
        ):
            status, answer, _ = await edge.post(path, headers=edge.auth(), json=body)
            assert status == 400
            fields = {v["field"] for v in answer["details"][1]["fieldViolations"]}
            assert fields == {"end_user_ip", "end_user_agent"}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SendMessage(
                edge_pb2.SendMessageRequest(phone="+4915112345678", text="x", end_user_ip="localhost"),
                metadata=(("authorization", f"Bearer {edge.key}"),),
            )
        assert parse_rpc_error(caught.value).field_violations == [
            ("end_user_ip", "must be an IPv4 or IPv6 address, e.g. 203.0.113.7")
        ]
        assert siteverify.requests == []  # no token was spent on an invalid request


async def test_per_ip_limits_count_the_end_users_address(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    async with edge_stack(mongo_client, keyring, services=SERVICES, clock=clock) as edge:
        await edge.set_policy(  # the fraud guard off: this is about the limit alone
            ["sms_countries_any", "rate_limits.ip_sms", "fraud_mode"],
            sms_countries_any=True,
            fraud_mode=common_pb2.FRAUD_MODE_OFF,
            rate_limits=common_pb2.RateLimits(
                ip_sms=common_pb2.RateLimit(limit=2, window=duration_pb2.Duration(seconds=3600))
            ),
        )
        send = {"text": "Your code: 1", "channel": "CHANNEL_SMS"}
        numbers = iter(f"+49151{n}2345678"[:14] for n in range(1000, 1010))
        for _ in range(2):
            body = {**send, "phone": next(numbers), "endUserIp": "198.51.100.7"}
            assert (await edge.post("/v1/messages", headers=edge.auth(), json=body))[0] == 200
        body = {**send, "phone": next(numbers), "endUserIp": "198.51.100.7"}
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json=body)
        assert (status, answer["details"][0]["reason"]) == (429, "RATE_LIMITED")
        assert answer["details"][1]["violations"][0]["subject"] == "origin.ip"
        # Another user behind the same server is not held up by the first one's limit.
        body = {**send, "phone": next(numbers), "endUserIp": "198.51.100.8"}
        assert (await edge.post("/v1/messages", headers=edge.auth(), json=body))[0] == 200


async def test_metrics(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    async with edge_stack(mongo_client, keyring, services=SERVICES, clock=clock, siteverify_url=siteverify.url) as edge:
        await edge.set_policy(["captcha_rule"], **ALWAYS)
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
            await edge.post(
                "/v1/verifications",
                headers=edge.auth(),
                json={"phone": "+4915112345678", "captchaToken": "bad-metrics"},
            )
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

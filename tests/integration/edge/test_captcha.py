"""CAPTCHA checks against a local siteverify server that answers like Turnstile/hCaptcha/reCAPTCHA."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from otpgate.common.v1 import common_pb2
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.config import ConfigError
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from services.edge.captcha import PROVIDER_URLS, CaptchaSettings, CaptchaVerifier
from services.edge.store import EdgeStore
from tests.integration.edge.conftest import SITEVERIFY_SECRET, SiteVerify, edge_stack


async def _verifier(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify, **changes: Any
) -> CaptchaVerifier:
    store = EdgeStore(database)
    await store.create_indexes()
    settings = CaptchaSettings(provider="turnstile", secret=SITEVERIFY_SECRET, verify_url=siteverify.url)
    return CaptchaVerifier(dataclasses.replace(settings, **changes), store, keyring, clock)


async def _refusal(verifier: CaptchaVerifier, token: str) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await verifier.verify(token, "198.51.100.4")
    return caught.value


async def test_required_passed_failed_replayed(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    verifier = await _verifier(database, keyring, clock, siteverify)
    try:
        required = await _refusal(verifier, "")
        assert (required.code, required.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPTCHA_REQUIRED")
        failure = next(d for d in required.details if isinstance(d, error_details_pb2.PreconditionFailure))
        assert (failure.violations[0].type, failure.violations[0].subject) == ("CAPTCHA", "captcha_token")
        assert siteverify.requests == []

        await verifier.verify("pass-token-1", "198.51.100.4")
        assert siteverify.requests == [
            {"secret": SITEVERIFY_SECRET, "response": "pass-token-1", "remoteip": "198.51.100.4"}
        ]
        replayed = await _refusal(verifier, "pass-token-1")
        assert (replayed.reason, replayed.message) == (
            "CAPTCHA_INVALID",
            "the CAPTCHA token was refused: the token was already used",
        )
        assert len(siteverify.requests) == 1  # refused by us, the provider was not asked again

        failed = await _refusal(verifier, "wrong-token")
        assert (failed.code, failed.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPTCHA_INVALID")
        assert "invalid-input-response" in failed.message
        assert (await _refusal(verifier, "low-score")).message.endswith("score too low")
    finally:
        await verifier.close()


async def test_tokens_are_single_use_across_replicas(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    one = await _verifier(database, keyring, clock, siteverify)
    two = await _verifier(database, keyring, clock, siteverify)
    try:
        await one.verify("pass-shared", "")
        assert (await _refusal(two, "pass-shared")).reason == "CAPTCHA_INVALID"
        stored = await database["captcha_tokens"].find_one({})
        assert stored is not None and "pass-shared" not in str(stored)
        # Used tokens are forgotten once they could no longer be valid anyway.
        clock.advance(601)
        assert await EdgeStore(database).purge_captcha_tokens(clock.now()) == 1
    finally:
        await one.close()
        await two.close()


async def test_provider_outage_and_settings(
    database: AsyncDatabase[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    verifier = await _verifier(database, keyring, clock, siteverify, hostnames=("shop.example",))
    wrong_host = await _verifier(database, keyring, clock, siteverify, hostnames=("other.example",))
    wrong_secret = await _verifier(database, keyring, clock, siteverify, secret="nope")
    unconfigured = await _verifier(database, keyring, clock, siteverify, secret="")
    try:
        siteverify.status = 503
        down = await _refusal(verifier, "pass-later")
        assert (down.code, down.reason) == (grpc.StatusCode.UNAVAILABLE, "CAPTCHA_UNAVAILABLE")
        siteverify.status = 200
        await verifier.verify("pass-later", "")  # the provider never judged it: the same token may be retried
        assert (await _refusal(wrong_host, "pass-elsewhere")).message.endswith("wrong hostname")
        assert "invalid-input-secret" in (await _refusal(wrong_secret, "pass-x")).message
        assert (await _refusal(unconfigured, "pass-y")).reason == "CAPTCHA_UNAVAILABLE"
    finally:
        for item in (verifier, wrong_host, wrong_secret, unconfigured):
            await item.close()
    assert set(PROVIDER_URLS) == {"turnstile", "hcaptcha", "recaptcha"}


async def test_tokens_where_the_policy_demands_one_and_where_it_does_not(
    mongo_client: AsyncMongoClient[Document],
    keyring: Keyring,
    clock: ManualClock,
    siteverify: SiteVerify,
    captured_logs: Any,
) -> None:
    services = ("edge", "delivery")
    async with edge_stack(mongo_client, keyring, services=services, clock=clock, siteverify_url=siteverify.url) as edge:
        await edge.set_policy(
            ["captcha_rule", "sms_countries_any"], captcha_rule=common_pb2.CAPTCHA_RULE_ALWAYS, sms_countries_any=True
        )
        body = {"phone": "+4915112345678", "text": "Your code: 1234", "captchaToken": "wrong-1"}
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json=body)
        assert status == 412
        reasons = [d.get("reason") for d in answer["details"]]
        assert "CAPTCHA_INVALID" in reasons
        failure = next(d for d in answer["details"] if d["@type"].endswith("PreconditionFailure"))
        assert failure["violations"][0]["subject"] == "captcha_token"
        status, answer, _ = await edge.post(
            "/v1/verifications", headers=edge.auth(), json={"phone": "+4915112345678", "captchaToken": "wrong-1"}
        )
        assert status == 412 and "already used" in answer["message"]
        assert siteverify.requests[0]["remoteip"] == "127.0.0.1"
        # Input is checked before the provider is asked or the token spent.
        status, answer, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={**body, "captchaToken": "pass-1", "text": "\u200b\n\t"}
        )
        assert status == 400 and answer["details"][1]["fieldViolations"][0]["field"] == "text"
        assert len(siteverify.requests) == 1

        # A policy that needs no CAPTCHA: a token is only a hint for the fraud guard. A refused one
        # counts as none, and an unreachable provider is no outage for a request that needs none.
        await edge.set_policy(["captcha_rule"], captcha_rule=common_pb2.CAPTCHA_RULE_ON_RISK)
        status, answer, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={**body, "captchaToken": "wrong-2", "channel": "CHANNEL_SMS"}
        )
        assert status == 200, answer
        siteverify.status = 503
        status, answer, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={**body, "captchaToken": "pass-2", "channel": "CHANNEL_SMS"}
        )
        assert status == 200, answer
        assert "wrong-1" not in captured_logs.text() and "pass-2" not in captured_logs.text()


async def test_a_token_is_ignored_without_a_provider(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {"OTPGATE_CAPTCHA_SECRET": "", "OTPGATE_CAPTCHA_PROVIDER": "turnstile"}
    async with edge_stack(
        mongo_client, keyring, services=("edge", "delivery"), clock=clock, overrides=overrides
    ) as edge:
        await edge.set_policy(["sms_countries_any"], sms_countries_any=True)
        body = {"phone": "+4915112345678", "text": "Your code: 1234", "channel": "CHANNEL_SMS", "captchaToken": "t"}
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json=body)
        assert status == 200, answer
        # A policy that demands one cannot be served without a provider: that is an outage.
        await edge.set_policy(["captcha_rule"], captcha_rule=common_pb2.CAPTCHA_RULE_ALWAYS)
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json=body)
        assert (status, answer["details"][0]["reason"]) == (503, "CAPTCHA_UNAVAILABLE")


async def test_the_sandbox_provider_behaves_like_a_real_one(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {"OTPGATE_CAPTCHA_PROVIDER": "sandbox", "OTPGATE_CAPTCHA_HOSTNAMES": "shop.example"}
    async with edge_stack(
        mongo_client, keyring, services=("edge", "delivery"), clock=clock, overrides=overrides
    ) as edge:
        await edge.set_policy(
            ["captcha_rule", "sms_countries_any"], captcha_rule=common_pb2.CAPTCHA_RULE_ALWAYS, sms_countries_any=True
        )
        body = {"phone": "+4915112345678", "text": "Your code: 1234", "channel": "CHANNEL_SMS"}

        async def solve(hostname: str = "shop.example") -> str:
            status, answer, _ = await edge.post("/sandbox/v1/captcha:solve", json={"hostname": hostname})
            assert status == 200, answer
            return str(answer["token"])

        token = await solve()
        assert (await edge.post("/v1/messages", headers=edge.auth(), json={**body, "captchaToken": token}))[0] == 200
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**body, "captchaToken": token})
        assert (status, answer["details"][0]["reason"]) == (412, "CAPTCHA_INVALID")
        # Tokens last 300 s, come only from the widget, and name the site they were solved on.
        late = await solve()
        clock.advance(301)
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**body, "captchaToken": late})
        assert status == 412 and "timeout-or-duplicate" in answer["message"]
        forged = token.rsplit(".", 1)[0] + ".0123456789abcdef0123456789abcdef"
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**body, "captchaToken": forged})
        assert status == 412 and "invalid-input-response" in answer["message"]
        elsewhere = await solve("evil.example")
        status, answer, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={**body, "captchaToken": elsewhere}
        )
        assert status == 412 and "wrong hostname" in answer["message"]


async def test_the_fraud_guard_asks_through_the_edge_and_a_solved_captcha_answers_it(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    overrides = {"OTPGATE_CAPTCHA_PROVIDER": "sandbox"}
    async with edge_stack(
        mongo_client, keyring, services=("edge", "delivery"), clock=clock, overrides=overrides
    ) as edge:
        await edge.set_policy(["sms_countries_any"], sms_countries_any=True)  # captcha_rule: on_risk
        send = {"text": "Your code: 1234", "channel": "CHANNEL_SMS"}
        first = {**send, "phone": "+4915112340001", "endUserIp": "203.0.113.1"}
        assert (await edge.post("/v1/messages", headers=edge.auth(), json=first))[0] == 200
        second = {**send, "phone": "+4915112347777", "endUserIp": "198.51.100.2"}
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json=second)
        info = next(d for d in answer["details"] if d["@type"].endswith("ErrorInfo"))
        assert (status, info["reason"], info["metadata"]["signal"]) == (412, "CAPTCHA_REQUIRED", "PREFIX_VELOCITY")
        token = (await edge.post("/sandbox/v1/captcha:solve", json={}))[1]["token"]
        status, answer, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**second, "captchaToken": token})
        assert status == 200 and answer["message"]["status"] == "MESSAGE_STATUS_DELIVERED"


async def test_the_sandbox_provider_only_in_sandbox_mode_and_only_when_chosen(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    # A real provider configured: the sandbox widget would hand out tokens nobody accepts, so it says so.
    async with edge_stack(mongo_client, keyring, clock=clock, siteverify_url=siteverify.url) as edge:
        status, answer, _ = await edge.post("/sandbox/v1/captcha:solve", json={})
        assert (status, answer["details"][0]["reason"]) == (412, "CAPTCHA_SANDBOX_OFF")
    with pytest.raises(ConfigError, match="OTPGATE_CAPTCHA_PROVIDER=sandbox needs sandbox mode"):
        async with edge_stack(
            mongo_client,
            keyring,
            clock=clock,
            overrides={"OTPGATE_SANDBOX": "false", "OTPGATE_CAPTCHA_PROVIDER": "sandbox"},
        ):
            pass

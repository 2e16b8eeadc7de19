"""CAPTCHA checks against a local siteverify server that answers like Turnstile/hCaptcha/reCAPTCHA."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
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


async def test_http_refuses_bad_tokens_before_forwarding(
    mongo_client: AsyncMongoClient[Document],
    keyring: Keyring,
    clock: ManualClock,
    siteverify: SiteVerify,
    captured_logs: Any,
) -> None:
    async with edge_stack(mongo_client, keyring, clock=clock, siteverify_url=siteverify.url) as edge:
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
        assert "wrong-1" not in captured_logs.text()

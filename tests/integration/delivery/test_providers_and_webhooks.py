"""The smsc provider inside a running delivery (reports, errors, timeouts) and signed status webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

from aiohttp import web
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.delivery.support import QUIET, engine_of, refused, sms_request, stubs
from tests.support.stack import running_stack
from tests.unit.delivery.test_sms_providers import serve


async def test_smsc_provider_sends_reports_delivery_and_maps_errors_and_timeouts(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, captured_logs: Any
) -> None:
    state: dict[str, Any] = {"next_id": 100, "statuses": {}, "slow": True}

    async def send(request: web.Request) -> web.Response:
        form = await request.post()
        if str(form["phones"]).endswith("0007"):
            return web.json_response({"error": "invalid number", "error_code": 7})
        if str(form["phones"]).endswith("0008") and state["slow"]:
            state["slow"] = False
            await asyncio.sleep(1.0)
        state["next_id"] += 1
        state["statuses"][str(state["next_id"])] = 0
        return web.json_response({"id": state["next_id"], "cnt": 1})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": state["statuses"].get(request.query["id"], -3)})

    async with serve({"/sys/send.php": send, "/sys/status.php": status}) as base:
        overrides = {
            **QUIET,
            "OTPGATE_SMS_PROVIDER": "smsc",
            "OTPGATE_SMSC_URL": base + "/sys/",
            "OTPGATE_SMSC_LOGIN": "acme",
            "OTPGATE_SMSC_PASSWORD": "very-secret-password",
            "OTPGATE_SMS_TIMEOUT": "0.3",
        }
        async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
            delivery, _ = stubs(stack)
            engine = engine_of(stack)
            sent = await delivery.SendMessage(sms_request("+79991230001"))
            assert sent.message.status == common_pb2.MESSAGE_STATUS_SENT
            # The report is not there yet; then it is.
            clock.advance(31)
            await engine.poll_sms_once()
            get = delivery_pb2.GetMessageRequest(client_id="shop", id=sent.message.id)
            assert (await delivery.GetMessage(get)).message.status == common_pb2.MESSAGE_STATUS_SENT
            state["statuses"]["101"] = 1
            clock.advance(31)
            assert await engine.poll_sms_once() == 1
            delivered = (await delivery.GetMessage(get)).message
            assert delivered.status == common_pb2.MESSAGE_STATUS_DELIVERED and delivered.HasField("delivered_time")

            bad = await delivery.SendMessage(sms_request("+79991230007"))
            assert bad.message.status == common_pb2.MESSAGE_STATUS_FAILED
            assert bad.message.failure_reason == common_pb2.FAILURE_REASON_SMS_FAILED

            slow = await delivery.SendMessage(sms_request("+79991230008"))
            assert slow.message.status == common_pb2.MESSAGE_STATUS_QUEUED  # timed out: retried later
            clock.advance(5)
            assert await engine.dispatch_due_once() == 1
            again = await delivery.GetMessage(delivery_pb2.GetMessageRequest(client_id="shop", id=slow.message.id))
            assert again.message.status == common_pb2.MESSAGE_STATUS_SENT and again.message.attempts == 2
    assert "very-secret-password" not in captured_logs.text()


async def test_status_webhooks_are_signed_and_retried_until_the_receiver_accepts(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock
) -> None:
    secret = "whsec-0123456789abcdef"
    received: list[dict[str, Any]] = []
    answers = [500, 502, 200]

    async def receiver(request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Otpgate-Timestamp"]
        expected = hmac.new(secret.encode(), timestamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, request.headers["X-Otpgate-Signature"])
        received.append({"valid": valid, "body": json.loads(body), "event": request.headers["X-Otpgate-Event-Id"]})
        return web.Response(status=answers.pop(0) if answers else 500)

    async with serve({"/hook": receiver}) as base:
        overrides = {**QUIET, "OTPGATE_WEBHOOK_MAX_RETRIES": "4"}
        async with running_stack(mongo_client, keyring, ["delivery"], overrides=overrides, clock=clock) as stack:
            delivery, _ = stubs(stack)
            engine = engine_of(stack)
            failure = await refused(delivery.SendMessage(sms_request("+79991230001", callback_url=base + "/hook")))
            assert failure.reason == "WEBHOOK_SECRET_NOT_SET"
            await delivery.UpdateClientPolicy(
                delivery_pb2.UpdateClientPolicyRequest(
                    policy=common_pb2.ClientPolicy(client_id="shop", webhook_secret=secret),
                    update_mask=field_mask_pb2.FieldMask(paths=["webhook_secret"]),
                )
            )
            sent = await delivery.SendMessage(sms_request("+79991230001", callback_url=base + "/hook"))
            assert sent.message.status == common_pb2.MESSAGE_STATUS_DELIVERED
            assert await engine.webhooks.deliver_due_once() == 1
            assert await engine.webhooks.deliver_due_once() == 0  # not due before the backoff
            clock.advance(5)
            await engine.webhooks.deliver_due_once()
            clock.advance(10)
            await engine.webhooks.deliver_due_once()
            clock.advance(3600)
            assert await engine.webhooks.deliver_due_once() == 0  # accepted: never again
            assert len(received) == 3 and all(r["valid"] for r in received)
            body = received[-1]["body"]
            assert body["type"] == "message.status" and body["message"]["id"] == sent.message.id
            assert body["message"]["status"] == "MESSAGE_STATUS_DELIVERED"
            assert body["message"]["phone_masked"] == "+7******0001" and "text" not in body["message"]
            assert received[-1]["event"] == f"{sent.message.id}:DELIVERED"

            # A receiver that never accepts gets the first try and 4 retries, then we give up.
            received.clear()
            second = await delivery.SendMessage(sms_request("+79991230002", callback_url=base + "/hook"))
            for _ in range(8):
                await engine.webhooks.deliver_due_once()
                clock.advance(3600)
            assert len(received) == 5
            stored = await engine.webhooks.get(f"{second.message.id}:DELIVERED")
            assert stored is not None and stored["state"] == "failed"

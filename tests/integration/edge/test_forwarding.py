"""The edge in front of the real services: forwarding with the key's client id, isolation between
clients, errors passed through, CAPTCHA by policy, AdminService delegation, sandbox routes,
and the same answers over gRPC and HTTP."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.crypto import Keyring
from services.core.errors import RpcFailure, http_status_for, parse_rpc_error
from services.core.mongo import Document
from services.edge.jsonproto import to_json
from tests.integration.edge.conftest import Edge, SiteVerify, available, edge_stack
from tests.support.stack import ALL_SERVICES

pytestmark = pytest.mark.skipif(not available(*ALL_SERVICES), reason="needs all five services")
PHONE = "+4915112345678"


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _reason(body: dict[str, Any]) -> str:
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo"))


async def _connect(edge: Edge, user_id: int, phone: str, bot: str = "smscodes_bot") -> None:
    """A sandbox Telegram user starts a shared bot and shares their number (through the edge's sandbox routes)."""
    user = {"user": {"userId": str(user_id), "firstName": "Ann", "phone": phone}}
    assert (await edge.post("/sandbox/v1/users", json=user))[0] == 200
    assert (await edge.post(f"/sandbox/v1/users/{user_id}/bots/{bot}:start", json={}))[0] == 200
    assert (await edge.post(f"/sandbox/v1/users/{user_id}/bots/{bot}:shareContact", json={}))[0] == 200


async def _grpc_failure(call: Any, request: Any, key: str) -> RpcFailure:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, metadata=_md(key))
    return parse_rpc_error(caught.value)


def _same_error(failure: RpcFailure, status: int, body: dict[str, Any]) -> None:
    assert (status, body["code"], _reason(body), body["message"]) == (
        http_status_for(failure.code),
        failure.code.value[0],
        failure.reason,
        failure.message,
    )


async def test_messages_isolation_and_parity(mongo_client: AsyncMongoClient[Document], keyring: Keyring) -> None:
    async with edge_stack(mongo_client, keyring, services=ALL_SERVICES) as edge:
        stub = edge_pb2_grpc.PublicServiceStub(edge.stack.channel("edge"))
        await _connect(edge, 1001, PHONE)
        status, body, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={"phone": PHONE, "text": "Your code: 4711", "requestId": "r-1"}
        )
        assert status == 200, body
        sent = body["message"]
        assert sent["status"] == "MESSAGE_STATUS_SENT" and sent["botId"] == "smscodes_bot"
        assert sent["phoneMasked"] != PHONE
        chat = (await edge.get("/sandbox/v1/users/1001/bots/smscodes_bot/messages"))[1]["messages"]
        assert chat[-1]["text"] == "Your code: 4711"

        # gRPC sends for the same client; HTTP and gRPC read the same message identically.
        via_grpc = await stub.SendMessage(
            edge_pb2.SendMessageRequest(phone=PHONE, text="second"), metadata=_md(edge.key)
        )
        for message_id in (sent["id"], via_grpc.message.id):
            got = await stub.GetMessage(edge_pb2.GetMessageRequest(id=message_id), metadata=_md(edge.key))
            status, body, _ = await edge.get(f"/v1/messages/{message_id}", headers=edge.auth())
            assert status == 200 and body == to_json(got)
        listed = await stub.ListMessages(edge_pb2.ListMessagesRequest(), metadata=_md(edge.key))
        status, body, _ = await edge.get("/v1/messages?pageSize=10", headers=edge.auth())
        assert body == to_json(listed) and len(body["messages"]) == 2
        # Idempotency is decided downstream per client: the repeat returns the first message.
        again = (
            await edge.post(
                "/v1/messages",
                headers=edge.auth(),
                json={"phone": PHONE, "text": "Your code: 4711", "requestId": "r-1"},
            )
        )[1]
        assert again["message"]["id"] == sent["id"]

        # Client B cannot see, cancel or list client A's messages: an unknown id and A's id look the same.
        _, key_b = await edge.new_client("Shop B")
        for message_id in (sent["id"], "01HZZZZZZZZZZZZZZZZZZZZZZZ"):
            failure = await _grpc_failure(stub.GetMessage, edge_pb2.GetMessageRequest(id=message_id), key_b)
            status, body, _ = await edge.get(f"/v1/messages/{message_id}", headers=edge.auth(key_b))
            assert (status, _reason(body)) == (404, "MESSAGE_NOT_FOUND")
            _same_error(failure, status, body)
            status, body, _ = await edge.post(f"/v1/messages/{message_id}:cancel", headers=edge.auth(key_b), json={})
            assert (status, _reason(body)) == (404, "MESSAGE_NOT_FOUND")
        assert (await edge.get("/v1/messages", headers=edge.auth(key_b)))[1]["messages"] == []
        # The client id comes from the key only; a request cannot name one.
        status, body, _ = await edge.post(
            "/v1/messages", headers=edge.auth(key_b), json={"phone": PHONE, "text": "x", "clientId": edge.client_id}
        )
        assert (status, body["details"][1]["fieldViolations"]) == (
            400,
            [{"field": "clientId", "description": "unknown field"}],
        )

        # Downstream refusals pass through unchanged, on both transports.
        request = edge_pb2.SendMessageRequest(phone="12", text="")
        failure = await _grpc_failure(stub.SendMessage, request, edge.key)
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(), json={"phone": "12", "text": ""})
        assert status == 400 and failure.field_violations
        _same_error(failure, status, body)
        fields = [v["field"] for v in next(d for d in body["details"] if "fieldViolations" in d)["fieldViolations"]]
        assert fields == [f for f, _ in failure.field_violations]


async def test_verifications_and_bots(mongo_client: AsyncMongoClient[Document], keyring: Keyring) -> None:
    async with edge_stack(mongo_client, keyring, services=ALL_SERVICES) as edge:
        stub = edge_pb2_grpc.PublicServiceStub(edge.stack.channel("edge"))
        await _connect(edge, 2002, PHONE)
        status, body, _ = await edge.post(
            "/v1/verifications", headers=edge.auth(), json={"phone": PHONE, "codeLength": 6}
        )
        assert status == 200, body
        verification = body["verification"]
        chat = (await edge.get("/sandbox/v1/users/2002/bots/smscodes_bot/messages"))[1]["messages"]
        code = chat[-1]["text"].split(" ", 1)[0]
        assert code.isdigit() and len(code) == 6
        wrong = "000000" if code != "000000" else "111111"
        status, body, _ = await edge.post(
            f"/v1/verifications/{verification['id']}:check", headers=edge.auth(), json={"code": wrong}
        )
        assert status == 200 and body["approved"] is False
        checked = await stub.CheckVerification(
            edge_pb2.CheckVerificationRequest(id=verification["id"], code=code), metadata=_md(edge.key)
        )
        assert checked.approved and checked.verification.status == common_pb2.VERIFICATION_STATUS_APPROVED
        got = await stub.GetVerification(edge_pb2.GetVerificationRequest(id=verification["id"]), metadata=_md(edge.key))
        status, body, _ = await edge.get(f"/v1/verifications/{verification['id']}", headers=edge.auth())
        assert body == to_json(got)

        _, key_b = await edge.new_client("Shop B")
        failure = await _grpc_failure(
            stub.GetVerification, edge_pb2.GetVerificationRequest(id=verification["id"]), key_b
        )
        status, body, _ = await edge.get(f"/v1/verifications/{verification['id']}", headers=edge.auth(key_b))
        assert (status, _reason(body)) == (404, "VERIFICATION_NOT_FOUND")
        _same_error(failure, status, body)
        status, body, _ = await edge.post(
            f"/v1/verifications/{verification['id']}:check", headers=edge.auth(key_b), json={"code": code}
        )
        assert status == 404

        bots = await stub.ListBots(edge_pb2.ListBotsRequest(), metadata=_md(edge.key))
        status, body, _ = await edge.get("/v1/bots", headers=edge.auth())
        assert body == to_json(bots) and {b["id"] for b in body["bots"]} >= {"smscodes_bot"}


async def test_captcha_by_policy(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, siteverify: SiteVerify
) -> None:
    async with edge_stack(mongo_client, keyring, services=ALL_SERVICES, siteverify_url=siteverify.url) as edge:
        await _connect(edge, 3003, PHONE)
        admin_key = await edge.new_key(edge.client_id, ["admin"])
        admin = edge_pb2_grpc.AdminServiceStub(edge.stack.channel("edge"))

        async def set_rule(rule: int) -> None:
            await admin.UpdateClientPolicy(
                edge_pb2.UpdateClientPolicyRequest(
                    policy=common_pb2.ClientPolicy(client_id=edge.client_id, captcha_rule=rule, sms_countries_any=True),
                    update_mask=field_mask_pb2.FieldMask(paths=["captcha_rule", "sms_countries_any"]),
                ),
                metadata=_md(admin_key),
            )

        await set_rule(common_pb2.CAPTCHA_RULE_ALWAYS)
        policy = await admin.GetClientPolicy(
            edge_pb2.GetClientPolicyRequest(client_id=edge.client_id), metadata=_md(admin_key)
        )
        assert policy.policy.captcha_rule == common_pb2.CAPTCHA_RULE_ALWAYS
        send = {"phone": PHONE, "text": "Your code: 1"}
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(), json=send)
        assert (status, _reason(body)) == (412, "CAPTCHA_REQUIRED")
        assert siteverify.requests == []
        # Passed: the edge vouches for the token (origin.captcha_verified) and delivery, which demands it too, accepts.
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**send, "captchaToken": "pass-a"})
        assert status == 200, body
        # Replayed.
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**send, "captchaToken": "pass-a"})
        assert (status, _reason(body)) == (412, "CAPTCHA_INVALID")
        # Failed.
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**send, "captchaToken": "bad"})
        assert (status, _reason(body)) == (412, "CAPTCHA_INVALID")
        status, body, _ = await edge.post("/v1/verifications", headers=edge.auth(), json={"phone": PHONE})
        assert (status, _reason(body)) == (412, "CAPTCHA_REQUIRED")

        # SMS rule: only requests that may send an SMS need a CAPTCHA.
        await set_rule(common_pb2.CAPTCHA_RULE_SMS)
        status, body, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={**send, "channel": "CHANNEL_TELEGRAM"}
        )
        assert status == 200, body
        status, body, _ = await edge.post("/v1/messages", headers=edge.auth(), json={**send, "channel": "CHANNEL_SMS"})
        assert (status, _reason(body)) == (412, "CAPTCHA_REQUIRED")
        status, body, _ = await edge.post(
            "/v1/messages", headers=edge.auth(), json={**send, "channel": "CHANNEL_AUTO", "smsFallback": True}
        )
        assert (status, _reason(body)) == (412, "CAPTCHA_REQUIRED")
        assert [r["response"] for r in siteverify.requests] == ["pass-a", "bad"]


async def test_admin_delegates_policies_and_bots(mongo_client: AsyncMongoClient[Document], keyring: Keyring) -> None:
    async with edge_stack(mongo_client, keyring, services=ALL_SERVICES) as edge:
        admin = edge_pb2_grpc.AdminServiceStub(edge.stack.channel("edge"))
        key = await edge.new_key(edge.client_id, ["admin"])
        unknown = await _grpc_failure(
            admin.GetClientPolicy, edge_pb2.GetClientPolicyRequest(client_id="no-such-client"), key
        )
        assert unknown.reason == "CLIENT_NOT_FOUND"
        updated = await admin.UpdateClientPolicy(
            edge_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id=edge.client_id, daily_sms_cap=25),
                update_mask=field_mask_pb2.FieldMask(paths=["daily_sms_cap"]),
            ),
            metadata=_md(key),
        )
        assert updated.policy.daily_sms_cap == 25 and updated.policy.client_id == edge.client_id

        bot = await admin.RegisterBot(
            edge_pb2.RegisterBotRequest(token="777000111:own-bot-secret", owner_client_id=edge.client_id),
            metadata=_md(key),
        )
        assert bot.bot.owner_client_id == edge.client_id and not bot.bot.shared
        everything = await admin.ListAllBots(
            edge_pb2.ListAllBotsRequest(owner_client_id=edge.client_id), metadata=_md(key)
        )
        assert bot.bot.id in {b.id for b in everything.bots}
        # The client sees its own bot next to the shared ones; another client does not.
        own = (await edge.get("/v1/bots", headers=edge.auth()))[1]["bots"]
        assert bot.bot.id in {b["id"] for b in own}
        _, key_b = await edge.new_client("Shop B")
        assert bot.bot.id not in {b["id"] for b in (await edge.get("/v1/bots", headers=edge.auth(key_b)))[1]["bots"]}
        await admin.RemoveBot(edge_pb2.RemoveBotRequest(bot_id=bot.bot.id), metadata=_md(key))
        own = (await edge.get("/v1/bots", headers=edge.auth()))[1]["bots"]
        assert bot.bot.id not in {b["id"] for b in own}
        status, health, _ = await edge.get("/healthz")
        assert status == 200 and set(health["checks"].values()) == {"SERVING"}
        sms = await edge.get("/sandbox/v1/sms?phone=%2B4915112345678")
        assert sms[0] == 200 and sms[1]["messages"] == []

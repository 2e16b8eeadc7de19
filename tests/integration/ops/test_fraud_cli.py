"""`otpgate fraud ...` and AdminService's fraud methods over HTTP, against a running edge and delivery:
rules set, listed, applied and removed, naming the key that set them; events as the guard saw them."""

from __future__ import annotations

import json

import aiohttp
import grpc
import pytest
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.crypto import Keyring
from services.core.mongo import Document
from services.edge.app import EdgeApp
from tests.integration.ops.test_admin_cli import _cli
from tests.support.stack import running_stack


async def test_rules_and_events_through_the_cli_and_http(
    mongo_client: AsyncMongoClient[Document],
    keyring: Keyring,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"OTPGATE_FRAUD_SAFE_PREFIXES": "+4930"}
    async with running_stack(mongo_client, keyring, ["delivery", "edge"], overrides=env) as stack:
        edge = stack.app("edge")
        assert isinstance(edge, EdgeApp) and edge.admin is not None
        acme = await edge.admin.create_client("Acme Shop")
        admin_record, admin_key = await edge.admin.create_key(acme.id, ["admin"])
        monkeypatch.setenv("OTPGATE_EDGE_ADDR", stack.addresses["edge"])
        monkeypatch.setenv("OTPGATE_ADMIN_KEY", admin_key)
        for var in ("OTPGATE_TLS_CERT", "OTPGATE_TLS_KEY", "OTPGATE_TLS_CA"):
            monkeypatch.delenv(var, raising=False)

        code, out, err = await _cli("fraud", "events")
        assert (code, out.strip()) == (0, "no guard events in the last 7 days"), err
        code, out, err = await _cli("fraud", "block", "+4915198", "--reason", "pumping seen on 1 Dec")
        assert (code, out.strip()) == (0, "blocked +4915198 for every client"), err
        code, out, err = await _cli("fraud", "allow", "+4915198765", "--client", "Acme Shop", "--reason", "our office")
        assert (code, out.strip()) == (0, f"allowed +4915198765 for client {acme.id}"), err
        code, out, err = await _cli("--json", "fraud", "rules")
        rules = json.loads(out)["rules"]
        assert [(r["prefix"], r["action"], r["client_id"], r["created_by"]) for r in rules] == [
            ("+4930", "FRAUD_RULE_ACTION_ALLOW", "", "config"),
            ("+4915198", "FRAUD_RULE_ACTION_BLOCK", "", admin_record.id),
            ("+4915198765", "FRAUD_RULE_ACTION_ALLOW", acme.id, admin_record.id),
        ]
        code, out, err = await _cli("fraud", "block", "4915", "--reason", "x")
        assert code == 1 and "rule.prefix: must be + and 1 to 15 digits" in err

        # The rules apply: the longest prefix wins, a client's own rule only for that client.
        delivery = delivery_pb2_grpc.DeliveryServiceStub(stack.channel("delivery"))
        await delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id=acme.id, sms_countries_any=True)
            )
        )

        async def send(client_id: str, phone: str) -> str:
            request = delivery_pb2.SendMessageRequest(
                client_id=client_id, phone=phone, text="code 1", channel=common_pb2.CHANNEL_SMS
            )
            try:
                await delivery.SendMessage(request)
            except grpc.aio.AioRpcError as error:
                return str(error.details())
            return "sent"

        assert await send(acme.id, "+4915198765432") == "sent"
        assert "BLOCK_LIST" in await send(acme.id, "+4915198111111")
        assert "BLOCK_LIST" in await send("other", "+4915198765432")

        code, out, err = await _cli("fraud", "remove", "+4915198")
        assert (code, out.strip()) == (0, "removed the +4915198 rule for every client"), err
        code, out, err = await _cli("fraud", "remove", "+4915198")
        assert code == 1 and "FRAUD_RULE_NOT_FOUND" in err

        # An attack on a prefix becomes an event, listed over HTTP and by the CLI.
        for n in range(6):
            await send(acme.id, f"+491511234{n:04d}")
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{edge.http_port}"
            headers = {"Authorization": f"Bearer {admin_key}"}
            async with http.get(f"{base}/v1/fraudEvents", headers=headers) as reply:
                assert reply.status == 200
                events = (await reply.json())["events"]
            async with http.delete(f"{base}/v1/fraudRules/%2B4915198765?clientId={acme.id}", headers=headers) as reply:
                assert reply.status == 200 and (await reply.json())["rule"]["reason"] == "our office"
        prefix = next(e for e in events if e["value"] == "+491511234")
        assert prefix["kind"] == "FRAUD_EVENT_KIND_PREFIX" and prefix["state"] == "FRAUD_STATE_BLOCK"
        code, out, err = await _cli("fraud", "events", "--client", "Acme Shop")
        assert code == 0 and "+491511234" in out and "blocked" in out, err

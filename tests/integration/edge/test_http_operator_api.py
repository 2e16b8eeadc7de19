"""What the console uses over HTTP: the key's own identity, AdminService routes (admin scope),
the verification listing, usage, and the sandbox's user list."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from services.core.crypto import Keyring
from services.core.mongo import Document
from tests.integration.edge.conftest import Edge, edge_stack
from tests.integration.edge.test_http_api import _reason, _violations
from tests.support.stack import ALL_SERVICES


async def _call(edge: Edge, method: str, path: str, key: str, **kwargs: Any) -> tuple[int, Any]:
    async with edge.http.request(method, edge.url(path), headers=edge.auth(key), **kwargs) as reply:
        return reply.status, await reply.json(content_type=None)


async def test_the_key_reads_itself_and_admin_routes_need_the_admin_scope(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring
) -> None:
    async with edge_stack(mongo_client, keyring, services=ALL_SERVICES) as edge:
        status, body = await _call(edge, "GET", "/v1/apiKeys/current", edge.key)
        assert status == 200
        assert body["client"] == {
            "id": edge.client_id,
            "displayName": "Shop A",
            "createTime": body["client"]["createTime"],
        }
        assert body["apiKey"]["id"] == edge.key_id
        assert set(body["apiKey"]["scopes"]) == {
            "API_KEY_SCOPE_MESSAGES_SEND",
            "API_KEY_SCOPE_MESSAGES_READ",
            "API_KEY_SCOPE_VERIFY",
        }
        assert edge.key.split("_")[2] not in str(body)  # never the secret
        status, body = await _call(edge, "GET", f"/v1/clients/{edge.client_id}/policy", edge.key)
        assert (status, _reason(body)) == (403, "SCOPE_MISSING")

        admin = await edge.new_key(edge.client_id, ["admin"])
        status, body = await _call(edge, "POST", "/v1/clients", admin, json={"displayName": "Shop B"})
        assert status == 200, body
        other = body["client"]["id"]
        status, body = await _call(edge, "POST", "/v1/clients", admin, json={"displayName": "Shop B"})
        assert (status, _reason(body)) == (409, "CLIENT_EXISTS")
        status, body = await _call(edge, "GET", f"/v1/clients/{other}", admin)
        assert (status, body["client"]["displayName"]) == (200, "Shop B")
        status, body = await _call(edge, "GET", "/v1/clients", admin, params={"pageSize": "1"})
        assert status == 200 and len(body["clients"]) == 1 and body["nextPageToken"]
        status, body = await _call(edge, "GET", "/v1/clients", admin, params={"pageSize": "500"})
        assert (status, _violations(body)) == (400, [("page_size", "must be between 0 and 100")])

        # API keys: created (the secret once), listed without it, revoked.
        status, body = await _call(
            edge, "POST", f"/v1/clients/{other}/apiKeys", admin, json={"scopes": ["API_KEY_SCOPE_VERIFY"]}
        )
        assert status == 200, body
        new_key, key_id = body["key"], body["apiKey"]["id"]
        assert new_key.startswith(f"otpg_{key_id}_")
        status, body = await _call(edge, "POST", f"/v1/clients/{other}/apiKeys", admin, json={"scopes": ["NOPE"]})
        assert status == 400 and _violations(body)[0][0] == "scopes[0]"
        status, body = await _call(edge, "GET", f"/v1/clients/{other}/apiKeys", admin)
        assert [k["id"] for k in body["apiKeys"]] == [key_id] and new_key.split("_")[2] not in str(body)
        status, body = await _call(edge, "GET", "/v1/apiKeys/current", new_key)
        assert (status, body["client"]["id"]) == (200, other)
        status, body = await _call(edge, "POST", f"/v1/apiKeys/{key_id}:revoke", admin, json={})
        assert status == 200 and body["apiKey"]["revokeTime"]
        status, body = await _call(edge, "GET", "/v1/apiKeys/current", new_key)
        assert (status, _reason(body)) == (401, "API_KEY_INVALID")
        status, body = await _call(edge, "POST", "/v1/apiKeys/UNKNOWNKEY:revoke", admin, json={})
        assert (status, _reason(body)) == (404, "API_KEY_NOT_FOUND")

        # The policy: read, changed by update mask, and bad values named by field.
        status, body = await _call(edge, "GET", f"/v1/clients/{other}/policy", admin)
        assert status == 200 and body["policy"]["clientId"] == other
        status, body = await _call(
            edge,
            "PATCH",
            f"/v1/clients/{other}/policy",
            admin,
            params={"updateMask": "dailySmsCap,smsFallback"},
            json={"dailySmsCap": 7, "smsFallback": True, "defaultConfirmDays": 99, "clientId": edge.client_id},
        )
        assert status == 200, body
        assert body["policy"]["clientId"] == other  # the path names the client, not the body
        assert (body["policy"]["dailySmsCap"], body["policy"]["smsFallback"]) == (7, True)
        assert body["policy"]["defaultConfirmDays"] == 0  # not in the mask
        status, body = await _call(
            edge, "PATCH", f"/v1/clients/{other}/policy", admin, json={"dailySmsCap": -1, "smsCountries": ["Germany"]}
        )
        assert status == 400
        assert dict(_violations(body)) == {
            "policy.sms_countries[0]": "must be an ISO 3166-1 alpha-2 region, e.g. DE",
            "policy.daily_sms_cap": "must be >= 0",
        }
        status, body = await _call(edge, "PATCH", f"/v1/clients/{other}/policy", admin, json={"dailySmsCap": "x"})
        assert (status, _violations(body)) == (400, [("policy.daily_sms_cap", "must be an integer")])
        status, body = await _call(edge, "GET", f"/v1/clients/{other}/policy", admin)
        assert body["policy"]["dailySmsCap"] == 7  # nothing half-written

        # Bots: the shared ones for a client, every one with "-", and a token is required.
        status, body = await _call(edge, "GET", f"/v1/clients/{other}/bots", admin)
        assert status == 200 and {b["id"] for b in body["bots"]} >= {"smscodes_bot"}
        status, body = await _call(edge, "GET", "/v1/clients/-/bots", admin)
        assert status == 200 and body["bots"]
        status, body = await _call(edge, "POST", "/v1/bots", admin, json={"ownerClientId": other})
        assert (status, _violations(body)) == (400, [("token", "required")])
        status, body = await _call(edge, "DELETE", "/v1/bots/nobody_bot", admin)
        assert status == 404


async def test_verifications_usage_and_sandbox_users(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring
) -> None:
    async with edge_stack(mongo_client, keyring, services=ALL_SERVICES) as edge:
        sandbox = "/sandbox/v1/users"
        for user_id, phone in (("4100001", "+79990001111"), ("4100002", "+79990002222")):
            async with edge.http.post(edge.url(sandbox), json={"user": {"userId": user_id, "phone": phone}}) as reply:
                assert reply.status == 200
        status, body, _ = await edge.get(sandbox, params={"pageSize": "1"})
        assert status == 200 and [u["userId"] for u in body["users"]] == ["4100001"] and body["nextPageToken"]
        status, body, _ = await edge.get(sandbox, params={"pageToken": body["nextPageToken"]})
        assert [u["userId"] for u in body["users"]] == ["4100002"] and not body["nextPageToken"]
        status, body, _ = await edge.get(sandbox, params={"pageToken": "x"})
        assert (status, _violations(body)) == (400, [("page_token", "is not a token from a previous page")])

        async with edge.http.post(f"{edge.url(sandbox)}/4100001/bots/smscodes_bot:start", json={}) as reply:
            assert reply.status == 200
        async with edge.http.post(f"{edge.url(sandbox)}/4100001/bots/smscodes_bot:shareContact", json={}) as reply:
            assert reply.status == 200
        started = []
        for _ in range(2):
            status, body = await _call(
                edge,
                "POST",
                "/v1/verifications",
                edge.key,
                json={"phone": "+79990001111", "channel": "CHANNEL_TELEGRAM"},
            )
            assert status == 200, body
            started.append(body["verification"]["id"])
            await _call(edge, "POST", f"/v1/verifications/{started[-1]}:cancel", edge.key, json={})
        status, body = await _call(edge, "GET", "/v1/verifications", edge.key, params={"pageSize": "1"})
        assert status == 200 and [v["id"] for v in body["verifications"]] == [started[1]]
        status, body = await _call(
            edge, "GET", "/v1/verifications", edge.key, params={"pageToken": body["nextPageToken"]}
        )
        assert [v["id"] for v in body["verifications"]] == [started[0]]
        status, body = await _call(edge, "GET", "/v1/verifications", edge.key, params={"filter": "status = CANCELED"})
        assert len(body["verifications"]) == 2
        status, body = await _call(edge, "GET", "/v1/verifications", edge.key, params={"filter": "status ~ x"})
        assert status == 400 and _violations(body)[0][0] == "filter"

        status, body = await _call(edge, "GET", "/v1/usage", edge.key)
        assert status == 200
        telegram = [r for r in body["records"] if r["channel"] == "CHANNEL_TELEGRAM"]
        assert sum(int(r["messages"]) for r in telegram) == 2 and all(len(r["day"]) == 10 for r in telegram)
        status, body = await _call(edge, "GET", "/v1/usage", edge.key, params={"startDay": "2026-13-01"})
        assert (status, _violations(body)) == (400, [("start_day", "is not a calendar day")])
        verify_only = await edge.new_key(edge.client_id, ["verify"])
        status, body = await _call(edge, "GET", "/v1/usage", verify_only)
        assert (status, _reason(body)) == (403, "SCOPE_MISSING")

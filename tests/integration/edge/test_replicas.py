"""Two edge replicas on one database: revocation reaches the other within the key cache lifetime,
and a CAPTCHA token accepted by one is refused by the other."""

from __future__ import annotations

import aiohttp
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.edge.app import EdgeApp
from tests.integration.edge.conftest import SITEVERIFY_SECRET, SiteVerify, edge_stack
from tests.integration.edge.test_tls import _service


async def test_revocation_and_captcha_across_replicas(
    mongo_client: AsyncMongoClient[Document], keyring: Keyring, clock: ManualClock, siteverify: SiteVerify
) -> None:
    services = ("edge", "delivery")
    async with edge_stack(
        mongo_client, keyring, services=services, clock=clock, siteverify_url=siteverify.url
    ) as first:
        await first.set_policy(["captcha_rule"], captcha_rule=common_pb2.CAPTCHA_RULE_ALWAYS)
        env = {
            **first.stack.env,
            "OTPGATE_EDGE_PORT": "0",
            "OTPGATE_EDGE_HTTP_PORT": "0",
            "OTPGATE_CAPTCHA_SECRET": SITEVERIFY_SECRET,
            "OTPGATE_CAPTCHA_VERIFY_URL": siteverify.url,
        }
        # The second replica: same configuration and database, its own ports.
        async with _service("edge", env, mongo_client, clock, None) as (_, second):
            assert isinstance(second, EdgeApp)
            other = f"http://127.0.0.1:{second.http_port}"
            headers = first.auth()
            async with aiohttp.ClientSession() as http:

                async def status_at(base: str, path: str, **kwargs: object) -> int:
                    async with http.post(base + path, headers=headers, **kwargs) as reply:  # type: ignore[arg-type]
                        return reply.status

                # The key works on both replicas (400: the body is refused after authentication).
                assert await status_at(first.base, "/v1/messages", data=b"{") == 400
                assert await status_at(other, "/v1/messages", data=b"{") == 400

                admin_key = await first.new_key(first.client_id, ["admin"])
                await edge_pb2_grpc.AdminServiceStub(first.stack.channel("edge")).RevokeApiKey(
                    edge_pb2.RevokeApiKeyRequest(id=first.key_id), metadata=(("authorization", f"Bearer {admin_key}"),)
                )
                assert await status_at(first.base, "/v1/messages", data=b"{") == 401  # at once where it was revoked
                assert await status_at(other, "/v1/messages", data=b"{") == 400  # still cached over there ...
                clock.advance(5.1)
                assert await status_at(other, "/v1/messages", data=b"{") == 401  # ... for at most 5 seconds

                fresh = await first.new_key(first.client_id, [])
                headers = first.auth(fresh)
                body = {"phone": "+4915112345678", "captchaToken": "pass-once"}
                # Accepted by the first replica (then refused downstream: verification does not run here) ...
                assert await status_at(first.base, "/v1/verifications", json=body) == 503
                # ... and refused by the second as a replay, without asking the provider again.
                assert await status_at(other, "/v1/verifications", json=body) == 412
                assert [r["response"] for r in siteverify.requests] == ["pass-once"]

"""Fixtures for the edge: a local siteverify server and an edge stack with a client and keys."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.mongo import Document
from services.edge.app import EdgeApp
from tests.support.stack import Stack, running_stack

SITEVERIFY_SECRET = "test-siteverify-secret"


@dataclass
class SiteVerify:
    """A local stand-in for a CAPTCHA provider's siteverify endpoint, with the real request/answer shapes.

    Tokens starting with "pass" are valid once (a second presentation answers
    timeout-or-duplicate, as the real providers do); "low" passes with a low score; anything else
    fails with invalid-input-response. A wrong secret answers invalid-input-secret."""

    url: str = ""
    requests: list[dict[str, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    status: int = 200

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        token = form.get("response", "")
        if form.get("secret") != SITEVERIFY_SECRET:
            return web.json_response({"success": False, "error-codes": ["invalid-input-secret"]})
        if not token:
            return web.json_response({"success": False, "error-codes": ["missing-input-response"]})
        if token in self.seen:
            return web.json_response({"success": False, "error-codes": ["timeout-or-duplicate"]})
        self.seen.add(token)
        if token.startswith("pass"):
            return web.json_response(
                {"success": True, "challenge_ts": "2026-01-01T00:00:00Z", "hostname": "shop.example", "error-codes": []}
            )
        if token.startswith("low"):
            return web.json_response({"success": True, "score": 0.1, "hostname": "shop.example"})
        return web.json_response({"success": False, "error-codes": ["invalid-input-response"]})


@pytest.fixture
async def siteverify() -> AsyncIterator[SiteVerify]:
    verify = SiteVerify()
    app = web.Application()
    app.router.add_post("/siteverify", verify.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    verify.url = f"http://127.0.0.1:{port}/siteverify"
    yield verify
    await runner.cleanup()


def available(*services: str) -> bool:
    """Whether the named services can be started (they are built in parallel with the edge)."""
    return all(importlib.util.find_spec(f"services.{name}.app") is not None for name in services)


@dataclass
class Edge:
    stack: Stack
    app: EdgeApp
    http: aiohttp.ClientSession
    base: str
    client_id: str
    key: str
    key_id: str

    def url(self, path: str) -> str:
        return self.base + path

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key if key is None else key}"}

    async def new_client(self, name: str, scopes: Sequence[str] = ()) -> tuple[str, str]:
        assert self.app.admin is not None
        client = await self.app.admin.create_client(name)
        _, key = await self.app.admin.create_key(client.id, list(scopes))
        return client.id, key

    async def new_key(self, client_id: str, scopes: Sequence[str]) -> str:
        assert self.app.admin is not None
        _, key = await self.app.admin.create_key(client_id, list(scopes))
        return key

    async def set_policy(self, paths: Sequence[str], **fields: Any) -> common_pb2.ClientPolicy:
        """Change this client's policy through AdminService (delivery must run)."""
        key = await self.new_key(self.client_id, ["admin"])
        admin = edge_pb2_grpc.AdminServiceStub(self.stack.channel("edge"))
        reply = await admin.UpdateClientPolicy(
            edge_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id=self.client_id, **fields),
                update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
            ),
            metadata=(("authorization", f"Bearer {key}"),),
        )
        return reply.policy

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any, Mapping[str, str]]:
        async with self.http.get(self.url(path), **kwargs) as reply:
            return reply.status, await _body(reply), reply.headers

    async def post(self, path: str, **kwargs: Any) -> tuple[int, Any, Mapping[str, str]]:
        async with self.http.post(self.url(path), **kwargs) as reply:
            return reply.status, await _body(reply), reply.headers


async def _body(reply: aiohttp.ClientResponse) -> Any:
    text = await reply.text()
    try:
        return await reply.json(content_type=None) if text else None
    except ValueError:
        return text


@asynccontextmanager
async def edge_stack(
    mongo_client: AsyncMongoClient[Document],
    keyring: Keyring,
    *,
    services: Sequence[str] = ("edge",),
    overrides: Mapping[str, str] | None = None,
    clock: ManualClock | None = None,
    siteverify_url: str = "",
) -> AsyncIterator[Edge]:
    env = {
        "OTPGATE_CAPTCHA_PROVIDER": "turnstile",
        "OTPGATE_CAPTCHA_SECRET": SITEVERIFY_SECRET,
        "OTPGATE_CAPTCHA_VERIFY_URL": siteverify_url or "http://127.0.0.1:9/siteverify",
        "OTPGATE_RPC_TIMEOUT": "3",
        **(overrides or {}),
    }
    async with running_stack(mongo_client, keyring, services, overrides=env, clock=clock) as stack:
        app = stack.app("edge")
        assert isinstance(app, EdgeApp) and app.admin is not None
        client = await app.admin.create_client("Shop A")
        record, key = await app.admin.create_key(client.id, [])
        async with aiohttp.ClientSession() as http:
            yield Edge(
                stack=stack,
                app=app,
                http=http,
                base=f"http://127.0.0.1:{app.http_port}",
                client_id=client.id,
                key=key,
                key_id=record.id,
            )

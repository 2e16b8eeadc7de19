"""`otpgate clients ...` / `otpgate apikeys ...` against the edge's database."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from services.cli.main import main
from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.errors import ServiceError
from services.core.mongo import Document
from services.edge.keys import Authenticator
from services.edge.store import EdgeStore
from tests.support.stack import _spec_of


async def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


async def test_clients_and_keys_from_the_cli(
    mongo_uri: str,
    mongo_client: AsyncMongoClient[Document],
    keyring: Keyring,
    monkeypatch: pytest.MonkeyPatch,
    captured_logs: Any,
) -> None:
    name = f"t_edge_cli_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("OTPGATE_KEYS", ",".join(_spec_of(keyring)))
    monkeypatch.setenv("OTPGATE_EDGE_DATABASE", name)
    try:
        code, out, err = await _cli("--json", "clients", "create", "Acme Shop")
        assert code == 0, err
        created = json.loads(out)
        assert created["display_name"] == "Acme Shop" and created["key"].startswith(f"otpg_{created['key_id']}_")
        assert created["scopes"] == ["messages:send", "messages:read", "verify"]

        code, out, err = await _cli("clients", "create", "Acme Shop")
        assert code == 1 and "exists" in err

        code, out, _ = await _cli("apikeys", "create", "Acme Shop", "--scope", "admin")
        assert code == 0 and "api key: otpg_" in out
        admin_key = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("api key: "))

        code, out, _ = await _cli("--json", "clients", "list")
        assert [c["id"] for c in json.loads(out)] == [created["client_id"]]

        code, out, _ = await _cli("--json", "apikeys", "list", created["client_id"])
        listed = json.loads(out)
        assert sorted(k["scopes"] == ["admin"] for k in listed) == [False, True]
        assert created["key"] not in out and admin_key not in out

        store = EdgeStore(mongo_client[name])
        auth = Authenticator(store, keyring, ManualClock(), cache_seconds=0, miss_cache_seconds=0)
        principal = await auth.authenticate(f"Bearer {admin_key}", frozenset({"admin"}))
        assert principal.client_id == created["client_id"]

        code, out, _ = await _cli("apikeys", "revoke", principal.key_id)
        assert code == 0 and out.startswith(f"revoked {principal.key_id}")
        with pytest.raises(ServiceError):
            await auth.authenticate(f"Bearer {admin_key}", frozenset({"admin"}))

        code, _, err = await _cli("apikeys", "revoke", "nosuchkey")
        assert code == 1 and "not found" in err
        # The keys never reach a log line.
        assert created["key"] not in captured_logs.text() and admin_key not in captured_logs.text()
    finally:
        await mongo_client.drop_database(name)

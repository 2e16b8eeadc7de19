"""`otpgate clients ...` and `otpgate apikeys ...`: clients and API keys in the edge's database.

These work on the edge's database directly (MONGODB_URI, OTPGATE_KEYS and
OTPGATE_EDGE_DATABASE from the environment, as the edge reads them), so the first client
and its first key exist before anyone can call AdminService. A new key is printed once;
only its keyed hash is stored. A revoked key stops working on every edge replica within
the key cache lifetime (OTPGATE_EDGE_AUTH_CACHE_SECONDS, 5 s by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from services.core.clock import SystemClock
from services.core.config import ConfigError, Env, load_common
from services.core.errors import ServiceError
from services.core.mongo import connect
from services.edge.admin import ClientAdmin
from services.edge.keys import ALL_SCOPES, DEFAULT_SCOPES
from services.edge.store import ApiKeyRecord, ClientRecord, EdgeStore

T = TypeVar("T")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scope_help = f"scope of the key (repeatable; {', '.join(ALL_SCOPES)}; default: {', '.join(DEFAULT_SCOPES)})"

    clients = subparsers.add_parser("clients", help="client services of the public API")
    actions = clients.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a client and print its first API key (shown once)")
    create.add_argument("name", help="display name, unique")
    create.add_argument("--scope", action="append", default=[], choices=ALL_SCOPES, help=scope_help)
    create.set_defaults(handler=_clients_create)
    listing = actions.add_parser("list", help="list clients")
    listing.set_defaults(handler=_clients_list)

    apikeys = subparsers.add_parser("apikeys", help="API keys of a client")
    key_actions = apikeys.add_subparsers(dest="action", metavar="ACTION", required=True)
    key_create = key_actions.add_parser("create", help="issue an API key (printed once)")
    key_create.add_argument("client", help="client id or name")
    key_create.add_argument("--scope", action="append", default=[], choices=ALL_SCOPES, help=scope_help)
    key_create.set_defaults(handler=_keys_create)
    key_list = key_actions.add_parser("list", help="list a client's API keys (never the secrets)")
    key_list.add_argument("client", help="client id or name")
    key_list.set_defaults(handler=_keys_list)
    revoke = key_actions.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("key_id", help="the key id (the part after otpg_)")
    revoke.set_defaults(handler=_keys_revoke)


def _run(work: Callable[[ClientAdmin], Awaitable[T]]) -> T:
    env = Env(service="edge")
    common = load_common("edge", env)
    env.check()
    if common.keyring is None:
        raise ConfigError("OTPGATE_KEYS is required")

    async def main() -> T:
        client = connect(common.mongodb_uri, "cli")
        try:
            store = EdgeStore(client[common.database])
            await store.create_indexes()
            return await work(ClientAdmin(store, common.keyring, SystemClock()))
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except ServiceError as exc:
        raise RuntimeError(exc.message) from None


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else ""


def _client_json(record: ClientRecord) -> dict[str, Any]:
    return {"id": record.id, "display_name": record.display_name, "create_time": _when(record.created_at)}


def _key_json(record: ApiKeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "client_id": record.client_id,
        "scopes": list(record.scopes),
        "create_time": _when(record.created_at),
        "last_use_time": _when(record.last_used_at),
        "revoke_time": _when(record.revoked_at),
    }


def _print_new_key(args: argparse.Namespace, payload: dict[str, Any], key: str) -> None:
    if args.json:
        print(json.dumps({**payload, "key": key}))
        return
    for name, value in payload.items():
        print(f"{name}: {value}")
    print(f"api key: {key}")
    print("Store this key now: it is shown only once.", file=sys.stderr)


def _clients_create(args: argparse.Namespace) -> int:
    async def work(admin: ClientAdmin) -> tuple[ClientRecord, ApiKeyRecord, str]:
        client = await admin.create_client(args.name)
        record, key = await admin.create_key(client.id, list(args.scope))
        return client, record, key

    client, record, key = _run(work)
    _print_new_key(
        args,
        {
            "client_id": client.id,
            "display_name": client.display_name,
            "key_id": record.id,
            "scopes": list(record.scopes),
        },
        key,
    )
    return 0


def _clients_list(args: argparse.Namespace) -> int:
    async def work(admin: ClientAdmin) -> list[ClientRecord]:
        found: list[ClientRecord] = []
        while True:
            page = await admin.store.list_clients(found[-1].id if found else "", 500)
            found += page
            if len(page) < 500:
                return found

    clients = _run(work)
    if args.json:
        print(json.dumps([_client_json(c) for c in clients]))
    else:
        for client in clients:
            print(f"{client.id}  {client.display_name}  created {_when(client.created_at)}")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    async def work(admin: ClientAdmin) -> tuple[ApiKeyRecord, str]:
        return await admin.create_key(args.client, list(args.scope))

    record, key = _run(work)
    _print_new_key(args, {"client_id": record.client_id, "key_id": record.id, "scopes": list(record.scopes)}, key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    async def work(admin: ClientAdmin) -> list[ApiKeyRecord]:
        return await admin.list_keys(args.client)

    keys = _run(work)
    if args.json:
        print(json.dumps([_key_json(k) for k in keys]))
    else:
        for key in keys:
            state = f"revoked {_when(key.revoked_at)}" if key.revoked_at else "active"
            used = _when(key.last_used_at) or "never"
            print(f"{key.id}  {','.join(key.scopes)}  {state}  last used {used}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    async def work(admin: ClientAdmin) -> ApiKeyRecord:
        return await admin.revoke_key(args.key_id)

    record = _run(work)
    if args.json:
        print(json.dumps(_key_json(record)))
    else:
        print(f"revoked {record.id} at {_when(record.revoked_at)}")
    return 0

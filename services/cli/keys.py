"""`otpgate keys ...`: encryption keys."""

from __future__ import annotations

import argparse
import json
import secrets

from services.cli import rotate
from services.core.crypto import Keyring


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="encryption keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = actions.add_parser("generate", help="print a new root key for OTPGATE_KEYS")
    generate.add_argument("--id", default="", help="key id (default: k<random>)")
    generate.set_defaults(handler=_generate)
    rotate.register(actions)


def _generate(args: argparse.Namespace) -> int:
    key_id = args.id or f"k{secrets.token_hex(3)}"
    spec = Keyring.generate_spec(key_id)
    Keyring.parse(spec)  # validates the id
    if args.json:
        print(json.dumps({"key_id": key_id, "spec": spec}))
    else:
        print(spec)
    return 0

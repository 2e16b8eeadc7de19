"""The operator CLI: `otpgate <command> ...`. Each command group lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from services.core.logging import configure_logging

# Each module defines register(subparsers) and sets a `handler` default on its parsers.
COMMAND_MODULES: tuple[str, ...] = (
    "services.cli.dev",
    "services.cli.keys",
    "services.cli.clients",
    "services.cli.status",
    "services.cli.admin",
    "services.cli.usage",
    "services.cli.bots",
    "services.cli.fraud",
    "services.cli.sandbox",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otpgate", description="otpgate: one-time codes through Telegram bots.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout carries command output (often JSON); diagnostics go to stderr, redacted like the services'.
    configure_logging("cli", os.environ.get("OTPGATE_LOG_LEVEL", "warning"), stream=sys.stderr)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for operators; no traceback, no secrets
        print(f"otpgate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`otpgate bots ...`: the shared bot pool and clients' own bots, through the edge's AdminService."""

from __future__ import annotations

import argparse
import sys

from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2

from services.cli.edge_client import (
    AdminClient,
    CliError,
    connection_options,
    edge_target,
    emit,
    read_secret,
    table,
    to_dict,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bots = subparsers.add_parser(
        "bots",
        help="Telegram bots: the shared pool and clients' own bots",
        description="Register, list and remove Telegram bots through the edge's AdminService.",
    )
    actions = bots.add_subparsers(dest="action", metavar="ACTION", required=True)

    register_bot = actions.add_parser(
        "register",
        help="register a bot by its token (from @BotFather)",
        description=(
            "Register a Telegram bot. The token is read from a file, from standard input ('-') or from an "
            "environment variable (env:NAME; default env:OTPGATE_BOT_TOKEN), never from the command line; "
            "otpgate stores it sealed."
        ),
    )
    register_bot.add_argument(
        "--token-from",
        default="env:OTPGATE_BOT_TOKEN",
        metavar="SOURCE",
        help="file path, '-' for stdin, or env:NAME (default env:OTPGATE_BOT_TOKEN)",
    )
    owner = register_bot.add_mutually_exclusive_group(required=True)
    owner.add_argument("--owner", metavar="CLIENT", help="the client (id or name) whose own bot this is")
    owner.add_argument("--shared", action="store_true", help="add the bot to the shared pool")
    connection_options(register_bot)
    register_bot.set_defaults(handler=_bots_register)

    listing = actions.add_parser(
        "list",
        help="list the shared bots, and a client's own bots with --owner",
        description="List the shared pool, plus one client's own bots with --owner (every page is fetched).",
    )
    listing.add_argument("--owner", metavar="CLIENT", default="", help="also list this client's own bots (id or name)")
    listing.add_argument("--page-size", type=int, default=100, help="bots per request (default 100)")
    connection_options(listing)
    listing.set_defaults(handler=_bots_list)

    remove = actions.add_parser(
        "remove",
        help="remove a bot (stops its session; people linked to it are no longer reachable through it)",
        description="Remove a bot. Its Telegram session stops on every botgateway replica.",
    )
    remove.add_argument("bot_id", help="bot id, e.g. acme_codes_bot")
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    connection_options(remove)
    remove.set_defaults(handler=_bots_remove)


def _bot_row(bot: common_pb2.Bot) -> list[str]:
    created = bot.create_time.ToJsonString() if bot.HasField("create_time") else "-"
    return [
        bot.id,
        f"@{bot.username}" if bot.username else "-",
        "shared" if bot.shared else "own",
        bot.owner_client_id or "-",
        created,
    ]


_BOT_HEADERS = ("ID", "USERNAME", "KIND", "OWNER", "CREATED")


def _bots_register(args: argparse.Namespace) -> int:
    token = read_secret(args.token_from, "bot token")
    request = edge_pb2.RegisterBotRequest(token=token, owner_client_id=args.owner or "", shared=bool(args.shared))
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(admin.stub.RegisterBot, request)
    emit(args, {"bot": to_dict(reply.bot)}, "registered\n" + table(_BOT_HEADERS, [_bot_row(reply.bot)]))
    return 0


def _bots_list(args: argparse.Namespace) -> int:
    bots: list[common_pb2.Bot] = []
    token = ""
    with AdminClient(edge_target(args)) as admin:
        while True:
            reply = admin.call(
                admin.stub.ListAllBots,
                edge_pb2.ListAllBotsRequest(owner_client_id=args.owner, page_size=args.page_size, page_token=token),
            )
            bots.extend(reply.bots)
            token = reply.next_page_token
            if not token:
                break
    emit(args, {"bots": [to_dict(b) for b in bots]}, table(_BOT_HEADERS, [_bot_row(b) for b in bots]))
    return 0


def _bots_remove(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("refusing to remove a bot without confirmation: pass --yes")
        answer = input(f"Remove bot {args.bot_id}? People reach it no more. Type the bot id to confirm: ")
        if answer.strip() != args.bot_id:
            raise CliError("not confirmed; nothing removed")
    with AdminClient(edge_target(args)) as admin:
        admin.call(admin.stub.RemoveBot, edge_pb2.RemoveBotRequest(bot_id=args.bot_id))
    emit(args, {"removed": args.bot_id}, f"removed {args.bot_id}")
    return 0

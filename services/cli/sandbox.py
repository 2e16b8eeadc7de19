"""`otpgate sandbox ...`: play a Telegram user by hand against a running stack (sandbox mode).

    otpgate sandbox create-user --phone +79991234567 --language ru
    otpgate sandbox start 700000001 smscodes_bot
    otpgate sandbox share-contact 700000001 smscodes_bot            # own number
    otpgate sandbox share-contact 700000001 smscodes_bot --phone +79990000000   # someone else's
    otpgate sandbox send-text 700000001 smscodes_bot 123456
    otpgate sandbox block 700000001 smscodes_bot [--unblock]
    otpgate sandbox chat 700000001 smscodes_bot [--follow]
    otpgate sandbox reset --yes                                       # erase every user and chat

Talks to the simulated Telegram's SandboxService at OTPGATE_TELEGRAMSIM_ADDR (or --address), with
mTLS when OTPGATE_TLS_CERT / OTPGATE_TLS_KEY / OTPGATE_TLS_CA are set, like the services. When the
bot is offline (botgateway stopped), an action is queued for it like on Telegram and answers with
no replies; `chat --follow` shows them when the bot is back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.json_format import MessageToDict
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc

from services.core.config import SIMULATOR, SIMULATOR_PORT, TlsConfig, local_address
from services.core.errors import parse_rpc_error
from services.core.grpc_client import channel_credentials

if TYPE_CHECKING:
    from otpgate.telegramsim.v1.telegramsim_pb2_grpc import SandboxServiceAsyncStub as Stub

B = telegramsim_pb2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sandbox = subparsers.add_parser("sandbox", help="act as a Telegram user in the sandbox Telegram")
    sandbox.add_argument(
        "--address",
        default=os.environ.get("OTPGATE_TELEGRAMSIM_ADDR") or local_address(SIMULATOR, os.environ),
        help=(
            "simulated Telegram gRPC address (default: OTPGATE_TELEGRAMSIM_ADDR, else 127.0.0.1 on "
            f"OTPGATE_TELEGRAMSIM_PORT or {SIMULATOR_PORT})"
        ),
    )
    sandbox.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for each call")
    actions = sandbox.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser("create-user", help="create (or replace) a sandbox Telegram user")
    create.add_argument("--user-id", type=int, default=0, help="Telegram user id (default: a new one)")
    create.add_argument("--name", default="", help="first name")
    create.add_argument("--language", default="en", help="language code, e.g. en, ru")
    create.add_argument("--phone", default="", help="the user's own number, E.164")
    create.add_argument("--deactivated", action="store_true", help="a deleted account")
    create.set_defaults(handler=_create_user)

    start = actions.add_parser("start", help="open a bot and press Start")
    _chat_args(start)
    start.add_argument("--payload", default="", help="deep-link payload (/start <payload>)")
    start.set_defaults(handler=_start)

    share = actions.add_parser("share-contact", help="share a contact with a bot")
    _chat_args(share)
    share.add_argument("--phone", default="", help="someone else's number (default: the user's own)")
    share.add_argument("--forwarded", action="store_true", help="share it as a forwarded message")
    share.set_defaults(handler=_share)

    text = actions.add_parser("send-text", help="type a message to a bot")
    _chat_args(text)
    text.add_argument("text", help="what to type, e.g. /help or a code")
    text.set_defaults(handler=_send_text)

    block = actions.add_parser("block", help="block (or unblock) a bot")
    _chat_args(block)
    block.add_argument("--unblock", action="store_true", help="unblock instead")
    block.set_defaults(handler=_block)

    chat = actions.add_parser("chat", help="read the chat with a bot, oldest first")
    _chat_args(chat)
    chat.add_argument("--after", type=int, default=0, help="only messages after this message id")
    chat.add_argument("--follow", action="store_true", help="keep polling for new messages (Ctrl-C to stop)")
    chat.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    chat.set_defaults(handler=_chat)

    reset = actions.add_parser(
        "reset",
        help="erase every sandbox user, chat and message (bots and their sessions stay)",
        description=(
            "Erase every sandbox user, chat and message in the simulated Telegram. Bots, their sessions and "
            "their update counters stay; the directory and delivery keep what they know (start with "
            "`make run` after `otpgate dev --fresh` for an empty system)."
        ),
    )
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.set_defaults(handler=_reset)


def _chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user_id", type=int, help="the sandbox user's Telegram id")
    parser.add_argument("bot_id", help="the bot, e.g. smscodes_bot")


def _channel(address: str) -> grpc.aio.Channel:
    tls = TlsConfig(
        cert_file=os.environ.get("OTPGATE_TLS_CERT", ""),
        key_file=os.environ.get("OTPGATE_TLS_KEY", ""),
        ca_file=os.environ.get("OTPGATE_TLS_CA", ""),
    )
    if tls.enabled or tls.ca_file:
        return grpc.aio.secure_channel(address, channel_credentials(tls))
    return grpc.aio.insecure_channel(address)


def _run(args: argparse.Namespace, call: Callable[[Stub], Awaitable[int]]) -> int:
    async def main() -> int:
        async with _channel(args.address) as channel:
            stub: Stub = telegramsim_pb2_grpc.SandboxServiceStub(channel)
            try:
                return await call(stub)
            except grpc.aio.AioRpcError as err:
                failure = parse_rpc_error(err)
                raise RuntimeError(f"{failure.code.name} {failure.reason}: {failure.message}".strip()) from None

    return asyncio.run(main())


def _print_messages(args: argparse.Namespace, messages: Any) -> None:
    for message in messages:
        if args.json:
            print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False))
            continue
        who = "bot " if message.from_bot else "you "
        flags = [
            name
            for name, on in (
                ("protected", message.protect_content),
                ("silent", message.silent),
                ("[Share my phone number]", message.request_contact),
                ("deleted", message.deleted),
            )
            if on
        ]
        suffix = f"  ({', '.join(flags)})" if flags else ""
        print(f"#{message.message_id} {who}> {message.text}{suffix}")


def _create_user(args: argparse.Namespace) -> int:
    async def call(stub: Stub) -> int:
        user = B.SandboxUser(
            user_id=args.user_id,
            first_name=args.name,
            language_code=args.language,
            phone=args.phone,
            deactivated=args.deactivated,
        )
        reply = await stub.CreateSandboxUser(B.CreateSandboxUserRequest(user=user), timeout=args.timeout)
        if args.json:
            print(json.dumps(MessageToDict(reply.user, preserving_proto_field_name=True), ensure_ascii=False))
        else:
            created = reply.user
            print(
                f"user {created.user_id} ({created.first_name}, {created.language_code}, {created.phone or 'no phone'})"
            )
        return 0

    return _run(args, call)


def _start(args: argparse.Namespace) -> int:
    async def call(stub: Stub) -> int:
        request = B.StartBotRequest(user_id=args.user_id, bot_id=args.bot_id, payload=args.payload)
        _print_messages(args, (await stub.StartBot(request, timeout=args.timeout)).replies)
        return 0

    return _run(args, call)


def _share(args: argparse.Namespace) -> int:
    async def call(stub: Stub) -> int:
        request = B.ShareContactRequest(
            user_id=args.user_id, bot_id=args.bot_id, phone=args.phone, forwarded=args.forwarded
        )
        _print_messages(args, (await stub.ShareContact(request, timeout=args.timeout)).replies)
        return 0

    return _run(args, call)


def _send_text(args: argparse.Namespace) -> int:
    async def call(stub: Stub) -> int:
        request = B.SendTextRequest(user_id=args.user_id, bot_id=args.bot_id, text=args.text)
        _print_messages(args, (await stub.SendText(request, timeout=args.timeout)).replies)
        return 0

    return _run(args, call)


def _block(args: argparse.Namespace) -> int:
    async def call(stub: Stub) -> int:
        request = B.SetBotBlockedRequest(user_id=args.user_id, bot_id=args.bot_id, blocked=not args.unblock)
        await stub.SetBotBlocked(request, timeout=args.timeout)
        if not args.json:
            print(f"{'unblocked' if args.unblock else 'blocked'} {args.bot_id}")
        return 0

    return _run(args, call)


def _chat(args: argparse.Namespace) -> int:
    async def call(stub: Stub) -> int:
        after = args.after
        while True:
            request = B.ListChatMessagesRequest(user_id=args.user_id, bot_id=args.bot_id, after_message_id=after)
            messages = (await stub.ListChatMessages(request, timeout=args.timeout)).messages
            _print_messages(args, messages)
            if messages:
                after = messages[-1].message_id
            if not args.follow:
                return 0
            await asyncio.sleep(args.interval)

    return _run(args, call)


def _reset(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise RuntimeError("refusing to erase the sandbox without confirmation: pass --yes")
        if input("Erase every sandbox user and chat? Type 'reset' to confirm: ").strip() != "reset":
            raise RuntimeError("not confirmed; nothing erased")

    async def call(stub: Stub) -> int:
        reply = await stub.ResetSandbox(B.ResetSandboxRequest(), timeout=args.timeout)
        if args.json:
            print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True)))
        else:
            print(f"erased {reply.users_erased} users and {reply.messages_erased} messages")
        return 0

    return _run(args, call)

"""`otpgate policies ...` and `otpgate bots ...`: operator tasks through the edge's AdminService.

Every call goes over gRPC to the edge (OTPGATE_EDGE_ADDR, default 127.0.0.1:50051) with an API
key that has the admin scope (OTPGATE_ADMIN_KEY, or --admin-key; the variable is preferred: a
command-line argument is visible to other users of the machine). TLS: with OTPGATE_TLS_CA (or
--ca-file) the CLI verifies the edge against that CA and presents OTPGATE_TLS_CERT/KEY when set;
--tls uses the system's roots; otherwise plaintext (the dev setup). Secrets (bot tokens, webhook
secrets) are read from a file, standard input or an environment variable, never from arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, json_format
from google.protobuf.message import Message
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc

from services.core.config import local_address
from services.core.errors import parse_rpc_error

DEFAULT_EDGE_ADDR = "127.0.0.1:50051"
# Variables only the operator CLI reads: (name, default, help). Listed in docs/configuration.md.
CLI_ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("OTPGATE_ADMIN_KEY", "", "API key with the admin scope for `otpgate policies` and `otpgate bots` (secret)"),
    (
        "OTPGATE_EDGE_ADDR",
        DEFAULT_EDGE_ADDR,
        "edge gRPC address the admin commands call (default port: OTPGATE_EDGE_PORT)",
    ),
    ("OTPGATE_BOT_TOKEN", "", "bot token read by `otpgate bots register` by default (secret; unset it afterwards)"),
)
RATE_LIMIT_NAMES = tuple(f.name for f in common_pb2.RateLimits.DESCRIPTOR.fields)
CAPTCHA_RULES = {
    "on_risk": common_pb2.CAPTCHA_RULE_ON_RISK,
    "always": common_pb2.CAPTCHA_RULE_ALWAYS,
    "sms": common_pb2.CAPTCHA_RULE_SMS,
}
FRAUD_MODES = {
    "block": common_pb2.FRAUD_MODE_BLOCK,
    "monitor": common_pb2.FRAUD_MODE_MONITOR,
    "off": common_pb2.FRAUD_MODE_OFF,
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LADDER_CHANNELS = {
    "telegram": common_pb2.CHANNEL_TELEGRAM,
    "telegram_gateway": common_pb2.CHANNEL_TELEGRAM_GATEWAY,
    "sms": common_pb2.CHANNEL_SMS,
}
CHANNEL_WORDS: dict[int, str] = {int(v): k for k, v in LADDER_CHANNELS.items()}

R = TypeVar("R", bound=Message)


class CliError(Exception):
    """A failure to show the operator as one line (exit code 1)."""


@dataclass(frozen=True)
class EdgeTarget:
    address: str
    admin_key: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls: bool = False
    timeout: float = 10.0


def edge_target(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EdgeTarget:
    env = os.environ if environ is None else environ
    key = getattr(args, "admin_key", None) or env.get("OTPGATE_ADMIN_KEY", "")
    if not key:
        raise CliError("an admin API key is required: set OTPGATE_ADMIN_KEY (or pass --admin-key)")
    return EdgeTarget(
        address=getattr(args, "edge_addr", None) or env.get("OTPGATE_EDGE_ADDR", "") or local_address("edge", env),
        admin_key=key,
        ca_file=getattr(args, "ca_file", None) or env.get("OTPGATE_TLS_CA", ""),
        cert_file=env.get("OTPGATE_TLS_CERT", ""),
        key_file=env.get("OTPGATE_TLS_KEY", ""),
        tls=bool(getattr(args, "tls", False)),
        timeout=float(getattr(args, "timeout", 10.0)),
    )


def open_channel(target: EdgeTarget) -> grpc.Channel:
    if target.ca_file or target.tls:
        root = Path(target.ca_file).read_bytes() if target.ca_file else None
        cert = Path(target.cert_file).read_bytes() if target.cert_file and target.key_file else None
        key = Path(target.key_file).read_bytes() if target.cert_file and target.key_file else None
        return grpc.secure_channel(
            target.address,
            grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert),
        )
    return grpc.insecure_channel(target.address)


class AdminClient:
    """A thin synchronous client of otpgate.edge.v1.AdminService."""

    def __init__(self, target: EdgeTarget) -> None:
        self._target = target
        self._channel = open_channel(target)
        self.stub = edge_pb2_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def call(self, method: Callable[..., R], request: Message) -> R:
        try:
            return method(
                request,
                timeout=self._target.timeout,
                metadata=(("authorization", f"Bearer {self._target.admin_key}"),),
            )
        except grpc.RpcError as err:
            raise CliError(describe_rpc_error(err)) from None


def describe_rpc_error(err: grpc.RpcError) -> str:
    failure = parse_rpc_error(err)
    head = failure.code.name + (f" {failure.reason}" if failure.reason else "")
    text = f"{head}: {failure.message}" if failure.message else head
    if failure.field_violations:
        text += " (" + "; ".join(f"{f}: {d}" for f, d in failure.field_violations) + ")"
    if failure.retry_after:
        text += f" (retry after {failure.retry_after:g} s)"
    return text


# --- parsing helpers ------------------------------------------------------------------------


def parse_duration(text: str) -> duration_pb2.Duration:
    """'30s', '15m', '24h', '7d' or plain seconds."""
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _UNITS else "s"
    number = raw[:-1] if raw[-1:] in _UNITS else raw
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 15m, 24h, 7d)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a window must be positive")
    result = duration_pb2.Duration()
    result.FromNanoseconds(int(seconds * 1e9))
    return result


def parse_rate_limit(text: str) -> tuple[str, common_pb2.RateLimit]:
    """'phone_daily=10/24h' -> ('phone_daily', RateLimit(10, 24h)); 'client=default' -> limit 0 (service default)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in RATE_LIMIT_NAMES:
        raise argparse.ArgumentTypeError(f"expected NAME=LIMIT/WINDOW with NAME one of {', '.join(RATE_LIMIT_NAMES)}")
    if value.strip() == "default":
        return name, common_pb2.RateLimit(limit=0)
    count, slash, window = value.partition("/")
    try:
        limit = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a limit: {count!r}") from None
    if not slash or limit < 0:
        raise argparse.ArgumentTypeError("expected LIMIT/WINDOW, e.g. 5/10m")
    return name, common_pb2.RateLimit(limit=limit, window=parse_duration(window))


def _regions(text: str) -> list[str]:
    return [part.strip().upper() for part in text.split(",") if part.strip()]


def parse_ladder(text: str) -> list[common_pb2.LadderStep]:
    """`telegram,telegram_gateway:RU+KZ:500,sms`: channels in order, each with optional countries
    (joined by +) and a daily cap; '' clears the ladder."""
    steps: list[common_pb2.LadderStep] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, rest = part.partition(":")
        countries, _, cap = rest.partition(":")
        if name.lower() not in LADDER_CHANNELS:
            raise argparse.ArgumentTypeError(f"unknown channel {name!r}: use {', '.join(LADDER_CHANNELS)}")
        if cap and not cap.isdigit():
            raise argparse.ArgumentTypeError(f"daily cap {cap!r} of {name} is not a whole number")
        steps.append(
            common_pb2.LadderStep(
                channel=LADDER_CHANNELS[name.lower()],
                countries=[c.strip().upper() for c in countries.split("+") if c.strip()],
                daily_cap=int(cap or 0),
            )
        )
    return steps


def describe_ladder(steps: Sequence[common_pb2.LadderStep]) -> str:
    names = CHANNEL_WORDS
    out = []
    for step in steps:
        where = "+".join(step.countries) or "any country"
        cap = f", {step.daily_cap}/day" if step.daily_cap else ""
        out.append(f"{names.get(int(step.channel), str(step.channel))} ({where}{cap})")
    return " -> ".join(out) or "(bot, then SMS with sms_fallback)"


def read_secret(source: str, what: str) -> str:
    """A secret from `-` (standard input), `env:NAME` or a file path; surrounding whitespace dropped."""
    if source == "-":
        value = sys.stdin.readline()
    elif source.startswith("env:"):
        value = os.environ.get(source[4:], "")
        if not value:
            raise CliError(f"{what}: environment variable {source[4:]} is empty")
    else:
        try:
            value = Path(source).read_text()
        except OSError as exc:
            raise CliError(f"{what}: cannot read {source}: {exc.strerror}") from None
    value = value.strip()
    if not value:
        raise CliError(f"{what} is empty")
    return value


# --- output -----------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _enum_name(value: str, prefix: str) -> str:
    name = value.removeprefix(prefix).lower()
    return "service default" if name == "unspecified" else name


def describe_sms_countries(policy: common_pb2.ClientPolicy) -> str:
    """Where SMS may go, and why, in one line: the effective countries first."""
    service = set(policy.service_sms_countries)
    if policy.sms_countries_any:
        reach = (
            f"{','.join(sorted(service))} only (any country, within the service's list)" if service else "any country"
        )
    elif policy.sms_countries:
        chosen = sorted(policy.sms_countries)
        effective = [c for c in chosen if not service or c in service]
        reach = ",".join(effective) + " only" if effective else "none (SMS refused)"
        if service and effective != chosen:
            reach += f" (set: {','.join(chosen)}; the service allows {','.join(sorted(service))})"
    else:
        reach = "none (SMS refused)"
    source = {
        common_pb2.SMS_COUNTRIES_SOURCE_SANDBOX_DEFAULT: " - the sandbox default: set --sms-countries for production",
        common_pb2.SMS_COUNTRIES_SOURCE_SERVICE_DEFAULT: " - the default: no SMS until an operator sets --sms-countries",
    }.get(policy.sms_countries_source, "")
    return reach + source


def describe_policy(policy: common_pb2.ClientPolicy) -> str:
    def window(d: duration_pb2.Duration) -> str:
        seconds = d.ToSeconds()
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds and seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"

    limits = []
    for name in RATE_LIMIT_NAMES:
        rate = getattr(policy.rate_limits, name)
        limits.append(f"{name}={rate.limit}/{window(rate.window)}" if rate.limit else f"{name}=default")
    rows = [
        ("client", policy.client_id),
        ("allowed_countries", ",".join(policy.allowed_countries) or "(any)"),
        ("sms_countries", describe_sms_countries(policy)),
        ("sms_fallback", str(policy.sms_fallback).lower()),
        ("default_confirm_days", str(policy.default_confirm_days) if policy.default_confirm_days else "0 (off)"),
        ("captcha_rule", _enum_name(common_pb2.CaptchaRule.Name(policy.captcha_rule), "CAPTCHA_RULE_")),
        ("daily_sms_cap", str(policy.daily_sms_cap) if policy.daily_sms_cap else "0 (no cap)"),
        ("fraud_mode", _enum_name(common_pb2.FraudMode.Name(policy.fraud_mode), "FRAUD_MODE_")),
        ("allow_custom_code", str(policy.allow_custom_code).lower()),
        ("webhook_secret", "set" if policy.webhook_secret_set else "not set"),
        ("ladder", describe_ladder(policy.ladder)),
        ("gateway_token", "the client's own" if policy.telegram_gateway_token_set else "the service's"),
        ("rate_limits", " ".join(limits)),
        ("update_time", policy.update_time.ToJsonString() if policy.HasField("update_time") else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in all_rows)


def emit(args: argparse.Namespace, data: Mapping[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


# --- commands ---------------------------------------------------------------------------------


def connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--edge-addr", help=f"edge gRPC address (default: $OTPGATE_EDGE_ADDR or {DEFAULT_EDGE_ADDR})")
    group.add_argument(
        "--admin-key", help="API key with the admin scope (default: $OTPGATE_ADMIN_KEY; prefer the variable)"
    )
    group.add_argument("--ca-file", help="PEM CA to verify the edge with (default: $OTPGATE_TLS_CA); enables TLS")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds (default 10)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_policies(subparsers)
    _register_usage(subparsers)
    _register_bots(subparsers)


def _register_policies(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policies = subparsers.add_parser(
        "policies",
        help="clients' delivery policies (countries, SMS, re-confirmation, CAPTCHA, limits, fraud guard)",
        description="Read and change a client's delivery policy through the edge's AdminService.",
    )
    actions = policies.add_subparsers(dest="action", metavar="ACTION", required=True)

    get = actions.add_parser("get", help="show a client's policy", description="Show a client's delivery policy.")
    get.add_argument("client", help="client id or name")
    connection_options(get)
    get.set_defaults(handler=_policies_get)

    put = actions.add_parser(
        "set",
        help="change fields of a client's policy (only the options given change)",
        description=(
            "Change a client's delivery policy. Only the fields named by an option change; the rest stay as they "
            "are (the update mask is built from the options given)."
        ),
    )
    put.add_argument("client", help="client id or name")
    put.add_argument(
        "--allowed-countries", type=_regions, metavar="CC,..", help="ISO regions numbers may belong to; '' for any"
    )
    sms = put.add_mutually_exclusive_group()
    sms.add_argument(
        "--sms-countries",
        type=_regions,
        metavar="CC,..",
        help="the only ISO regions SMS may go to (replaces 'any'); '' for none",
    )
    sms.add_argument(
        "--sms-countries-any",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow SMS to any region (replaces a list); --no-sms-countries-any turns that off",
    )
    put.add_argument(
        "--sms-fallback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fall back to SMS for people with no bot",
    )
    put.add_argument(
        "--default-confirm-days", type=int, metavar="N", help="re-confirmation age when a request sets none (0: off)"
    )
    put.add_argument("--captcha-rule", choices=sorted(CAPTCHA_RULES), help="when the edge demands a CAPTCHA")
    put.add_argument("--daily-sms-cap", type=int, metavar="N", help="SMS per UTC day (0: no cap)")
    put.add_argument("--fraud-mode", choices=sorted(FRAUD_MODES), help="what the fraud guard does on SMS legs")
    put.add_argument(
        "--allow-custom-code",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let StartVerification carry the client's own code",
    )
    put.add_argument(
        "--rate-limit",
        action="append",
        type=parse_rate_limit,
        metavar="NAME=LIMIT/WINDOW",
        help=f"a rate limit, e.g. phone_daily=10/24h, or NAME=default (repeatable; NAME: {', '.join(RATE_LIMIT_NAMES)})",
    )
    secret = put.add_mutually_exclusive_group()
    secret.add_argument(
        "--webhook-secret-from",
        metavar="SOURCE",
        help="set the webhook signing secret from a file, '-' (stdin) or env:NAME (at least 16 characters)",
    )
    secret.add_argument("--clear-webhook-secret", action="store_true", help="remove the webhook signing secret")
    put.add_argument(
        "--ladder",
        type=parse_ladder,
        metavar="CH[:CC+CC[:CAP]],..",
        help=(
            "channels AUTO tries in order, e.g. telegram,telegram_gateway:RU+KZ:500,sms "
            f"(channels: {', '.join(LADDER_CHANNELS)}; '' for the default: bot, then SMS with --sms-fallback)"
        ),
    )
    token = put.add_mutually_exclusive_group()
    token.add_argument(
        "--telegram-gateway-token-from",
        metavar="SOURCE",
        help="the client's own Telegram Gateway API token from a file, '-' (stdin) or env:NAME",
    )
    token.add_argument(
        "--clear-telegram-gateway-token",
        action="store_true",
        help="remove the client's own Gateway token (the service's is used)",
    )
    connection_options(put)
    put.set_defaults(handler=_policies_set)


def _register_usage(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = subparsers.add_parser(
        "usage",
        help="a client's messages and what they cost, per UTC day and channel",
        description=(
            "A client's usage per UTC day and channel: messages sent, SMS parts (billed and sent), Telegram "
            "Gateway refunds, and cost (Gateway credits as Telegram charged them, SMS at OTPGATE_SMS_PART_COST "
            "per part, bots free), with totals per channel."
        ),
    )
    usage.add_argument("client", help="client id or name")
    usage.add_argument(
        "--from", dest="start_day", default="", metavar="YYYY-MM-DD", help="first day (default: 30 days ago)"
    )
    usage.add_argument("--to", dest="end_day", default="", metavar="YYYY-MM-DD", help="last day (default: today)")
    connection_options(usage)
    usage.set_defaults(handler=_usage)


def describe_usage(records: Sequence[edge_pb2.UsageRecord]) -> str:
    if not records:
        return "no messages sent in these days"
    names = CHANNEL_WORDS
    rows = [
        [
            r.day,
            names.get(int(r.channel), str(r.channel)),
            str(r.messages),
            str(r.sms_parts),
            str(r.refunded),
            f"{r.cost:.4f}",
        ]
        for r in records
    ]
    totals: dict[int, list[float]] = {}  # messages, parts, refunded, cost
    for r in records:
        total = totals.setdefault(int(r.channel), [0, 0, 0, 0.0])
        for i, value in enumerate((r.messages, r.sms_parts, r.refunded, r.cost)):
            total[i] += value
    for channel, (messages, parts, refunded, cost) in sorted(totals.items()):
        rows.append(
            [
                "total",
                names.get(channel, str(channel)),
                str(int(messages)),
                str(int(parts)),
                str(int(refunded)),
                f"{cost:.4f}",
            ]
        )
    rows.append(["total", "all", str(sum(r.messages for r in records)), "", "", f"{sum(r.cost for r in records):.4f}"])
    return table(["day", "channel", "messages", "sms_parts", "refunded", "cost"], rows)


def _usage(args: argparse.Namespace) -> int:
    request = edge_pb2.GetClientUsageRequest(client_id=args.client, start_day=args.start_day, end_day=args.end_day)
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(admin.stub.GetClientUsage, request)
    emit(args, {"records": [to_dict(r) for r in reply.records]}, describe_usage(reply.records))
    return 0


def build_policy_update(args: argparse.Namespace) -> tuple[common_pb2.ClientPolicy, list[str]]:
    """The policy message and update-mask paths for the options given on the command line."""
    policy = common_pb2.ClientPolicy(client_id=args.client)
    paths: list[str] = []
    if args.allowed_countries is not None:
        policy.allowed_countries.extend(args.allowed_countries)
        paths.append("allowed_countries")
    if args.sms_countries is not None:
        policy.sms_countries.extend(args.sms_countries)
        paths.append("sms_countries")
    for name in ("sms_countries_any", "sms_fallback", "allow_custom_code", "default_confirm_days", "daily_sms_cap"):
        value = getattr(args, name)
        if value is not None:
            setattr(policy, name, value)
            paths.append(name)
    if args.captcha_rule is not None:
        policy.captcha_rule = CAPTCHA_RULES[args.captcha_rule]
        paths.append("captcha_rule")
    if args.fraud_mode is not None:
        policy.fraud_mode = FRAUD_MODES[args.fraud_mode]
        paths.append("fraud_mode")
    for name, rate in args.rate_limit or []:
        getattr(policy.rate_limits, name).CopyFrom(rate)
        path = f"rate_limits.{name}"
        if path not in paths:
            paths.append(path)
    if args.webhook_secret_from:
        policy.webhook_secret = read_secret(args.webhook_secret_from, "webhook secret")
        paths.append("webhook_secret")
    elif args.clear_webhook_secret:
        paths.append("webhook_secret")
    if args.ladder is not None:
        policy.ladder.extend(args.ladder)
        paths.append("ladder")
    if args.telegram_gateway_token_from:
        policy.telegram_gateway_token = read_secret(args.telegram_gateway_token_from, "Telegram Gateway token")
        paths.append("telegram_gateway_token")
    elif args.clear_telegram_gateway_token:
        paths.append("telegram_gateway_token")
    if not paths:
        raise CliError("nothing to change: give at least one option (see `otpgate policies set --help`)")
    return policy, paths


def _policies_get(args: argparse.Namespace) -> int:
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(admin.stub.GetClientPolicy, edge_pb2.GetClientPolicyRequest(client_id=args.client))
    emit(args, {"policy": to_dict(reply.policy)}, describe_policy(reply.policy))
    return 0


def _policies_set(args: argparse.Namespace) -> int:
    policy, paths = build_policy_update(args)
    request = edge_pb2.UpdateClientPolicyRequest(policy=policy, update_mask=field_mask_pb2.FieldMask(paths=paths))
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(admin.stub.UpdateClientPolicy, request)
    emit(
        args,
        {"policy": to_dict(reply.policy), "updated": paths},
        f"updated {', '.join(paths)}\n\n{describe_policy(reply.policy)}",
    )
    return 0


def _register_bots(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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

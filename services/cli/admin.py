"""`otpgate policies get|set CLIENT`: a client's delivery policy (countries, SMS, re-confirmation,
CAPTCHA, limits, fraud guard, the channel ladder), through the edge's AdminService
(services/cli/edge_client.py: connection, admin key, TLS)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from google.protobuf import duration_pb2, field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2

from services.cli.edge_client import (
    AdminClient,
    CliError,
    connection_options,
    edge_target,
    emit,
    read_secret,
    to_dict,
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
    """`telegram,telegram_gateway:RU+KZ:500:60s,sms`: channels in order, each with optional
    countries (joined by +), a daily cap and (the Gateway) the seconds after which a code not yet
    delivered falls back to the next rung; '' clears the ladder."""
    steps: list[common_pb2.LadderStep] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, rest = part.partition(":")
        countries, _, rest = rest.partition(":")
        cap, _, after = rest.partition(":")
        if name.lower() not in LADDER_CHANNELS:
            raise argparse.ArgumentTypeError(f"unknown channel {name!r}: use {', '.join(LADDER_CHANNELS)}")
        if cap and not cap.isdigit():
            raise argparse.ArgumentTypeError(f"daily cap {cap!r} of {name} is not a whole number")
        seconds = after.strip().lower().removesuffix("s")
        if after and not seconds.isdigit():
            raise argparse.ArgumentTypeError(f"fallback time {after!r} of {name} is not a number of seconds, e.g. 60s")
        step = common_pb2.LadderStep(
            channel=LADDER_CHANNELS[name.lower()],
            countries=[c.strip().upper() for c in countries.split("+") if c.strip()],
            daily_cap=int(cap or 0),
        )
        if after:
            step.fallback_after.seconds = int(seconds)
        steps.append(step)
    return steps


def describe_ladder(steps: Sequence[common_pb2.LadderStep]) -> str:
    names = CHANNEL_WORDS
    out = []
    for step in steps:
        where = "+".join(step.countries) or "any country"
        cap = f", {step.daily_cap}/day" if step.daily_cap else ""
        after = step.fallback_after.seconds if step.HasField("fallback_after") else 0
        falls = f", falls back after {after} s undelivered" if after else ""
        out.append(f"{names.get(int(step.channel), str(step.channel))} ({where}{cap}{falls})")
    return " -> ".join(out) or "(bot, then SMS with sms_fallback)"


# --- output -----------------------------------------------------------------------------------


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


# --- commands ---------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_policies(subparsers)


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
        metavar="CH[:CC+CC[:CAP[:AFTER]]],..",
        help=(
            "channels AUTO tries in order, e.g. telegram,telegram_gateway:RU+KZ:500:60s,sms: a Gateway code "
            "not delivered 60 s after it went out is revoked and, once Telegram says it is, sent by SMS "
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

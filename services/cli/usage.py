"""`otpgate usage CLIENT`: a client's messages and what they cost, per UTC day and channel."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from otpgate.edge.v1 import edge_pb2

from services.cli.admin import CHANNEL_WORDS
from services.cli.edge_client import (
    AdminClient,
    connection_options,
    edge_target,
    emit,
    table,
    to_dict,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_usage(subparsers)


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

"""`otpgate fraud ...`: what the SMS fraud guard saw, and the operators' prefix rules.

    otpgate fraud events [--client C]                    ranges and segments needing CAPTCHAs or refused
    otpgate fraud rules                                  the safe list and the block list
    otpgate fraud allow +4915112 --reason "our office"   let a prefix through the guard
    otpgate fraud block +4915112 --reason "pumping"      refuse every SMS to a prefix
    otpgate fraud remove +4915112                        drop the rule again

Through the edge's AdminService with an admin key, like `otpgate policies` (services/cli/edge_client.py).
"""

from __future__ import annotations

import argparse
from datetime import UTC

from google.protobuf import timestamp_pb2
from otpgate.common.v1 import common_pb2
from otpgate.edge.v1 import edge_pb2

from services.cli.edge_client import AdminClient, connection_options, edge_target, emit, table, to_dict

STATES = {common_pb2.FRAUD_STATE_CAPTCHA: "captcha", common_pb2.FRAUD_STATE_BLOCK: "blocked"}
KINDS = {
    common_pb2.FRAUD_EVENT_KIND_PREFIX: "prefix",
    common_pb2.FRAUD_EVENT_KIND_RANGE: "range",
    common_pb2.FRAUD_EVENT_KIND_CLIENT_COUNTRY: "client+country",
}
ACTIONS = {"allow": common_pb2.FRAUD_RULE_ACTION_ALLOW, "block": common_pb2.FRAUD_RULE_ACTION_BLOCK}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fraud = subparsers.add_parser(
        "fraud",
        help="the SMS fraud guard: its events, and prefixes allowed or blocked by hand",
        description="What the SMS fraud guard saw, and the safe list and block list of prefixes.",
    )
    actions = fraud.add_subparsers(dest="action", metavar="ACTION", required=True)

    events = actions.add_parser(
        "events",
        help="ranges and client segments that needed a CAPTCHA or were refused (last 7 days)",
        description="Guard events, the most recently seen first: what, its state and since when, the deciding "
        "signal and the last ten minutes' counts when last seen.",
    )
    events.add_argument("--client", default="", help="only this client's (id or name)")
    connection_options(events)
    events.set_defaults(handler=_events)

    rules = actions.add_parser("rules", help="the safe list and the block list", description="List the prefix rules.")
    connection_options(rules)
    rules.set_defaults(handler=_rules)

    for name, verb in (
        ("allow", "always let SMS to a prefix through the guard"),
        ("block", "refuse every SMS to a prefix"),
    ):
        put = actions.add_parser(name, help=verb, description=f"{verb[0].upper()}{verb[1:]} (replaces its rule).")
        put.add_argument("prefix", help="E.164 prefix, from the country code on, e.g. +4915112")
        put.add_argument("--reason", required=True, help="why (kept with the rule and logged)")
        put.add_argument("--client", default="", help="for this client only (id or name); default: every client")
        connection_options(put)
        put.set_defaults(handler=_put, rule_action=name)

    remove = actions.add_parser("remove", help="remove a prefix's rule", description="Remove a prefix's rule.")
    remove.add_argument("prefix", help="the rule's prefix, e.g. +4915112")
    remove.add_argument("--client", default="", help="the rule of this client (id or name); default: every client's")
    connection_options(remove)
    remove.set_defaults(handler=_remove)


def _when(moment: timestamp_pb2.Timestamp) -> str:
    return moment.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _events(args: argparse.Namespace) -> int:
    found: list[common_pb2.FraudEvent] = []
    token = ""
    with AdminClient(edge_target(args)) as admin:
        while True:
            reply = admin.call(
                admin.stub.ListFraudEvents,
                edge_pb2.ListFraudEventsRequest(client_id=args.client, page_size=500, page_token=token),
            )
            found.extend(reply.events)
            token = reply.next_page_token
            if not token:
                break
    rows = [
        [
            KINDS.get(e.kind, "?"),
            e.value,
            e.region,
            STATES.get(e.state, "?"),
            _when(e.since),
            _when(e.last_seen),
            e.signal,
            f"{e.score:.1f}",
            f"{e.requests}/{e.sms}/{e.entered}",
            e.client_id,
        ]
        for e in found
    ]
    headers = (
        "KIND",
        "VALUE",
        "REGION",
        "STATE",
        "SINCE",
        "LAST SEEN",
        "SIGNAL",
        "NATS",
        "ASKED/SMS/ENTERED",
        "CLIENT",
    )
    text = table(headers, rows) if rows else "no guard events in the last 7 days"
    emit(args, {"events": [to_dict(e) for e in found]}, text)
    return 0


def _rule_row(rule: common_pb2.FraudRule) -> list[str]:
    action = "allow" if rule.action == common_pb2.FRAUD_RULE_ACTION_ALLOW else "block"
    created = _when(rule.create_time) if rule.HasField("create_time") else "-"
    return [rule.prefix, action, rule.client_id or "(every client)", rule.reason, rule.created_by or "-", created]


_RULE_HEADERS = ("PREFIX", "ACTION", "CLIENT", "REASON", "BY KEY", "SET")


def _rules(args: argparse.Namespace) -> int:
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(admin.stub.ListFraudRules, edge_pb2.ListFraudRulesRequest())
    rows = [_rule_row(r) for r in reply.rules]
    emit(args, {"rules": [to_dict(r) for r in reply.rules]}, table(_RULE_HEADERS, rows) if rows else "no rules")
    return 0


def _put(args: argparse.Namespace) -> int:
    rule = common_pb2.FraudRule(
        prefix=args.prefix, action=ACTIONS[args.rule_action], client_id=args.client, reason=args.reason
    )
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(admin.stub.CreateFraudRule, edge_pb2.CreateFraudRuleRequest(rule=rule))
    done = "allowed" if args.rule_action == "allow" else "blocked"
    whom = f"client {reply.rule.client_id}" if reply.rule.client_id else "every client"
    emit(args, {"rule": to_dict(reply.rule)}, f"{done} {reply.rule.prefix} for {whom}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with AdminClient(edge_target(args)) as admin:
        reply = admin.call(
            admin.stub.DeleteFraudRule, edge_pb2.DeleteFraudRuleRequest(prefix=args.prefix, client_id=args.client)
        )
    whom = f"client {reply.rule.client_id}" if reply.rule.client_id else "every client"
    emit(args, {"removed": to_dict(reply.rule)}, f"removed the {reply.rule.prefix} rule for {whom}")
    return 0

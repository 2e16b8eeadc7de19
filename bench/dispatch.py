"""Scenario 7: background dispatch on two delivery replicas (`python -m bench dispatch`).

The path every retry, held release, restart backlog and multi-replica deployment takes: a stack
whose delivery runs as two processes (`delivery`, `delivery-2`; the edge's channel spreads calls
over both, round robin) with inline dispatch off, so SendMessage only stores the message and the
replicas' dispatchers claim and send it.

- *steady*: an open loop of SendMessage at a fixed rate (20 msg/s) for a fixed time; dispatch lag =
  the simulated Telegram's send_time of the message minus its create_time (both stamped by the
  servers, on one clock); p50/p99/max, and every accepted message counted in the people's chats:
  arrived exactly once, never twice, none lost.
- *backlog*: both replicas restarted with their dispatchers off (OTPGATE_DELIVERY_DISPATCHER=false),
  the backlog accepted into the outbox, both restarted with their dispatchers on, as after a
  deployment or an outage; drain rate = messages ÷ time from the first send to the last.
- *inline*: both replicas restarted with inline dispatch on, the same number of messages sent at the
  same concurrency as the backlog was accepted; its rate measured the same way. drain/inline is
  the backlog's rate ÷ this one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from otpgate.edge.v1 import edge_pb2

from bench.scenarios import cpu_seconds, percentile, public_stub
from bench.system import RAISED_OURS, RAISED_TELEGRAM, System, User, workdir
from services.core.devdb import ROOT

REPLICAS = ("delivery", "delivery-2")
# Telegram's limits raised as in the send scenario: the dispatcher, not Telegram, is measured.
ENV = {**RAISED_OURS, **RAISED_TELEGRAM, "OTPGATE_DELIVERY_INLINE_DISPATCH": "false"}
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class DispatchPlan:
    users: int = 300
    rate: float = 20.0  # steady SendMessage per second
    seconds: float = 120.0  # of steady load: 2,400 messages at 20/s
    backlog: int = 2400
    concurrency: int = 16  # requests in flight while the backlog is accepted, and in the inline run
    settle: float = 60.0  # how long to wait for the last arrivals once none come


FULL = DispatchPlan()
TINY = DispatchPlan(users=9, rate=10.0, seconds=2.0, backlog=30, concurrency=4, settle=20.0)

# Targets (issue 18): lag p99 at most 2 s at 20 msg/s; the backlog drained at 80 % of the inline rate.
LAG_P99_TARGET = 2.0
DRAIN_RATIO_TARGET = 0.8


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Sent:
    """What the driver sent: text -> the message's create_time (s since the epoch)."""

    accepted: dict[str, float]
    errors: dict[str, int]
    seconds: float  # from the first request to the last answer


def arrival_counts(accepted: Mapping[str, float], arrivals: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """Every accepted message counted in the chats: once, twice or more, or not at all; and the
    first and last send_time of those that arrived."""
    seen = Counter(text for text, _ in arrivals if text in accepted)
    times = sorted(sent for text, sent in arrivals if text in accepted)
    return {
        "accepted": len(accepted),
        "arrived": len(seen),
        "twice": sum(1 for n in seen.values() if n > 1),
        "lost": len(accepted) - len(seen),
        "first_send": times[0] if times else 0.0,
        "last_send": times[-1] if times else 0.0,
    }


def lags(accepted: Mapping[str, float], arrivals: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Dispatch lag of each message (its first arrival - its create_time): p50, p99, max in s."""
    first: dict[str, float] = {}
    for text, sent in arrivals:
        if text in accepted:
            first[text] = min(sent, first.get(text, sent))
    values = [max(0.0, sent - accepted[text]) for text, sent in first.items()]
    return {
        "p50_s": round(percentile(values, 50), 3) if values else 0.0,
        "p99_s": round(percentile(values, 99), 3) if values else 0.0,
        "max_s": round(max(values), 3) if values else 0.0,
    }


def drain_rate(counts: Mapping[str, Any]) -> float:
    """Messages per second from the first send to the last."""
    span = float(counts["last_send"]) - float(counts["first_send"])
    return (int(counts["arrived"]) - 1) / span if span > 0 and counts["arrived"] > 1 else 0.0


async def send(system: System, user: User, text: str, request_id: str, errors: dict[str, int]) -> float | None:
    """One SendMessage; its create_time, or None when it failed. A call the stack could not take
    yet (UNAVAILABLE while the edge reconnects to restarted replicas) is repeated with the same
    request id, which makes the repeat safe."""
    stub, metadata = public_stub(system)
    request = edge_pb2.SendMessageRequest(phone=user.phone, text=text, bot=user.bots[0], request_id=request_id)
    for attempt in range(5):
        try:
            reply = await stub.SendMessage(request, metadata=metadata, timeout=30)
            return float(reply.message.create_time.ToMicroseconds()) / 1e6
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
                return None
            await asyncio.sleep(0.2 * (attempt + 1))
    return None


async def open_loop(system: System, users: Sequence[User], rate: float, seconds: float, tag: str) -> Sent:
    """SendMessage at `rate` per second for `seconds`, on schedule, whatever the answers take."""
    loop = asyncio.get_running_loop()
    accepted: dict[str, float] = {}
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        text = f"dispatch {tag} #{i}: your code is {i % 1_000_000:06d}"
        created = await send(system, users[i % len(users)], text, f"{tag}-{i}", errors)
        if created is not None:
            accepted[text] = created

    started = loop.time()
    tasks = []
    for i in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return Sent(accepted, errors, loop.time() - started)


async def closed_loop(system: System, users: Sequence[User], messages: int, concurrency: int, tag: str) -> Sent:
    """`messages` SendMessage calls, `concurrency` at a time."""
    accepted: dict[str, float] = {}
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        text = f"dispatch {tag} #{i}: your code is {i % 1_000_000:06d}"
        async with gate:
            created = await send(system, users[i % len(users)], text, f"{tag}-{i}", errors)
        if created is not None:
            accepted[text] = created

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(messages)))
    return Sent(accepted, errors, time.monotonic() - started)


async def arrivals_of(system: System, accepted: Mapping[str, float], settle: float) -> list[tuple[str, float]]:
    """The chats' new bot messages until every accepted one arrived and a second more passed (a
    message sent twice would show by then), or none arrived for `settle` seconds."""
    found: list[tuple[str, float]] = []
    wanted = set(accepted)
    progress = time.monotonic()
    complete_at: float | None = None
    while time.monotonic() - progress < settle:
        fresh = [(text, sent) for text, sent in await system.chat_messages() if text in wanted]
        if fresh:
            found.extend(fresh)
            progress = time.monotonic()
        if complete_at is None and {text for text, _ in found} >= wanted:
            complete_at = time.monotonic()
        if complete_at is not None and time.monotonic() - complete_at >= 1.0:
            break
        await asyncio.sleep(0.5)
    return found


async def restart_replicas(system: System, env: Mapping[str, str]) -> None:
    """Stop both delivery processes and start them again with `env` over the stack's."""
    assert system.stack is not None
    for name in REPLICAS:
        system.stack.stop_service(name)
    for name in REPLICAS:
        system.stack.start_service(name, env)
    await system.stack.wait_healthy(timeout=120, names=REPLICAS)


def claimed(system: System) -> dict[str, int]:
    """Messages each replica's dispatcher has claimed since it started (its dispatch lag samples)."""
    return {name: int(system.metric(name, "otpgate_dispatch_lag_seconds_count")) for name in REPLICAS}


def cpu_pct(before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> dict[str, float]:
    return {name: round(100 * (used - before.get(name, 0.0)) / seconds, 1) for name, used in after.items()}


async def steady(system: System, users: Sequence[User], plan: DispatchPlan) -> dict[str, Any]:
    await system.chat_messages()
    pids = system.pids()
    cpu0, wall0, claimed0 = cpu_seconds(pids), time.monotonic(), claimed(system)
    sent = await open_loop(system, users, plan.rate, plan.seconds, "steady")
    found = await arrivals_of(system, sent.accepted, plan.settle)
    cpu = cpu_pct(cpu0, cpu_seconds(pids), time.monotonic() - wall0)
    counts = arrival_counts(sent.accepted, found)
    return {
        "claimed_by": {name: n - claimed0[name] for name, n in claimed(system).items()},
        "rate": plan.rate,
        "seconds": plan.seconds,
        "offered_rate": round(len(sent.accepted) / sent.seconds, 2) if sent.seconds else 0.0,
        **counts,
        **lags(sent.accepted, found),
        "errors": sent.errors,
        "service_cpu_pct": cpu,
    }


async def backlog(system: System, users: Sequence[User], plan: DispatchPlan) -> dict[str, Any]:
    await restart_replicas(system, {"OTPGATE_DELIVERY_DISPATCHER": "false"})
    await system.chat_messages()
    sent = await closed_loop(system, users, plan.backlog, plan.concurrency, "backlog")
    # None should have gone out yet: nothing dispatches with the dispatchers off and inline off.
    early = [(text, at) for text, at in await system.chat_messages() if text in sent.accepted]
    started = time.time()
    await restart_replicas(system, {})  # dispatchers on, inline still off
    ready = time.time()
    pids = system.pids()
    cpu0, wall0 = cpu_seconds(pids), time.monotonic()
    found = await arrivals_of(system, sent.accepted, plan.settle)
    counts = arrival_counts(sent.accepted, [*early, *found])
    return {
        "claimed_by": claimed(system),  # both restarted: counted from zero
        "messages": plan.backlog,
        "accept_rate": round(len(sent.accepted) / sent.seconds, 2) if sent.seconds else 0.0,
        "sent_before_restart": len(early),
        "restart_s": round(ready - started, 2),
        "first_send_s": round(counts["first_send"] - started, 2) if counts["arrived"] else 0.0,
        **counts,
        "rate": round(drain_rate(counts), 2),
        "last_send_s": round(counts["last_send"] - started, 2) if counts["arrived"] else 0.0,
        "errors": sent.errors,
        "service_cpu_pct": cpu_pct(cpu0, cpu_seconds(pids), time.monotonic() - wall0),
    }


async def inline(system: System, users: Sequence[User], plan: DispatchPlan) -> dict[str, Any]:
    await restart_replicas(system, {"OTPGATE_DELIVERY_INLINE_DISPATCH": "true"})
    await system.chat_messages()
    pids = system.pids()
    cpu0, wall0 = cpu_seconds(pids), time.monotonic()
    sent = await closed_loop(system, users, plan.backlog, plan.concurrency, "inline")
    found = await arrivals_of(system, sent.accepted, plan.settle)
    counts = arrival_counts(sent.accepted, found)
    return {
        "messages": plan.backlog,
        "concurrency": plan.concurrency,
        **counts,
        "rate": round(drain_rate(counts), 2),
        "errors": sent.errors,
        "service_cpu_pct": cpu_pct(cpu0, cpu_seconds(pids), time.monotonic() - wall0),
    }


async def run(plan: DispatchPlan, work: Path, profile: str = "") -> dict[str, Any]:
    env = dict(ENV)
    if profile:
        env["OTPGATE_BENCH_PROFILE_SERVICES"] = profile
        env["OTPGATE_BENCH_PROFILE_DIR"] = str(work / "profiles")
        (work / "profiles").mkdir(parents=True, exist_ok=True)
    system = System(env=env, work=work / "dispatch", delivery_replicas=len(REPLICAS))
    report: dict[str, Any] = {"plan": asdict(plan)}
    try:
        say("bench dispatch: starting the stack (two delivery replicas, inline dispatch off)…")
        await system.start(os.environ.get("MONGODB_URI", ""))
        say(f"bench dispatch: connecting {plan.users} sandbox users over the shared bots…")
        users = await system.connect_users(plan.users)
        say(f"bench dispatch: steady load, {plan.rate:g} msg/s for {plan.seconds:g} s…")
        report["steady"] = await steady(system, users, plan)
        say(f"bench dispatch: lag p99 {report['steady']['p99_s']} s")
        say(f"bench dispatch: backlog of {plan.backlog} accepted with the dispatchers off, then drained…")
        report["backlog"] = await backlog(system, users, plan)
        say(f"bench dispatch: drained at {report['backlog']['rate']} msg/s")
        report["inline"] = await inline(system, users, plan)
        say(f"bench dispatch: inline at {report['inline']['rate']} msg/s")
        await system.close_channels()
    finally:
        system.stop()
    inline_rate = float(report["inline"]["rate"])
    report["drain_inline_ratio"] = round(float(report["backlog"]["rate"]) / inline_rate, 3) if inline_rate else 0.0
    return report


CPU = ("edge", "delivery", "delivery-2", "directory", "botgateway", "telegramsim", "database")


def table(report: Mapping[str, Any]) -> str:
    steady, drained, inline = report["steady"], report["backlog"], report["inline"]

    def cpu(row: Mapping[str, Any]) -> str:
        return "/".join(f"{float(row['service_cpu_pct'].get(name, 0.0)):.0f}" for name in CPU)

    def fate(row: Mapping[str, Any]) -> str:
        by = row.get("claimed_by")
        split = f" (claimed {'/'.join(str(by[name]) for name in REPLICAS)})" if by else ""
        return f"{row['arrived']}/{row['accepted']} arrived{split}, {row['twice']} twice, {row['lost']} lost"

    lines = [
        "Background dispatch, two delivery replicas (inline dispatch off unless said)",
        f"{'run':<8} {'messages':>8} {'msg/s':>8} {'lag p50':>8} {'lag p99':>8} {'lag max':>8}  fate; "
        "cpu% edge/deliv/deliv-2/dir/bot/tgsim/db",
        f"{'steady':<8} {steady['accepted']:>8} {steady['offered_rate']:>8.1f} {steady['p50_s']:>8.2f} "
        f"{steady['p99_s']:>8.2f} {steady['max_s']:>8.2f}  {fate(steady)}; {cpu(steady)}",
        f"{'backlog':<8} {drained['accepted']:>8} {drained['rate']:>8.1f} {'':>8} {'':>8} {'':>8}  "
        f"{fate(drained)}; {cpu(drained)}",
        f"{'inline':<8} {inline['accepted']:>8} {inline['rate']:>8.1f} {'':>8} {'':>8} {'':>8}  "
        f"{fate(inline)}; {cpu(inline)}",
        f"backlog: accepted at {drained['accept_rate']} msg/s with the dispatchers off "
        f"({drained['sent_before_restart']} sent before the restart); from the restart on: both replicas "
        f"serving at {drained['restart_s']} s, first send at {drained['first_send_s']} s, last at "
        f"{drained['last_send_s']} s",
        f"inline: the same {inline['messages']} messages at concurrency {inline['concurrency']}; "
        f"drain/inline = {report['drain_inline_ratio']:.2f}",
        f"targets: lag p99 <= {LAG_P99_TARGET:g} s (is {steady['p99_s']:.2f}), drain/inline >= "
        f"{DRAIN_RATIO_TARGET:g} (is {report['drain_inline_ratio']:.2f})",
    ]
    errors = {k: v for row in (steady, drained, inline) for k, v in row["errors"].items()}
    if errors:
        lines.append(f"errors: {errors}")
    return "\n".join(lines)


def summary_line(report: Mapping[str, Any]) -> str:
    return f"bench dispatch: lag_p99={report['steady']['p99_s']:.2f} drain/inline={report['drain_inline_ratio']:.2f}"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench dispatch", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds, what the test suite smoke-runs")
    parser.add_argument("--rate", type=float, help=f"steady SendMessage per second (default {FULL.rate:g})")
    parser.add_argument("--seconds", type=float, help=f"of steady load (default {FULL.seconds:g})")
    parser.add_argument("--backlog", type=int, help=f"messages in the backlog (default {FULL.backlog})")
    parser.add_argument("--concurrency", type=int, help=f"accepting the backlog, inline (default {FULL.concurrency})")
    parser.add_argument("--users", type=int, help=f"sandbox users (default {FULL.users})")
    parser.add_argument("--profile", default="", help="services to run under pyinstrument, e.g. delivery,delivery-2")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/dispatch-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep logs and profiles under bench/results/work")
    return parser.parse_args(argv)


def plan_of(args: argparse.Namespace) -> DispatchPlan:
    plan = TINY if args.tiny else FULL
    changes = {
        name: getattr(args, name)
        for name in ("rate", "seconds", "backlog", "concurrency", "users")
        if getattr(args, name) is not None
    }
    return DispatchPlan(**{**asdict(plan), **changes})


def main(argv: list[str]) -> int:
    args = parse(argv)
    work = workdir(args.keep or bool(args.profile))
    report = {"started": datetime.now(UTC).isoformat(), **asyncio.run(run(plan_of(args), work, args.profile))}
    out = args.out or RESULTS / f"dispatch-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["summary"] = summary_line(report)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    print(table(report))
    print(f"JSON: {out}" + (f"; logs/profiles: {work}" if args.keep or args.profile else ""))
    if not (args.keep or args.profile):
        shutil.rmtree(work, ignore_errors=True)
    print(report["summary"], flush=True)
    return 0

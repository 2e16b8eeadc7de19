"""`make bench`: send throughput against the database floor, Verify pairs, Telegram's ceiling, background
dispatch on two replicas, the fraud guard, the request-path calls at 100,000 messages.

    python -m bench [--quick] [--tiny] [--skip-ceiling] [--skip-dispatch] [--skip-fraud] [--skip-calls] [--profile SERVICES]
    python -m bench dispatch [--tiny] [--rate 20] [--backlog 2400]   background dispatch alone (bench/dispatch.py)
    python -m bench fraud [--seeds 1,2,3,4,5] [--minutes 30]     the fraud guard alone (bench/fraud.py)
    python -m bench.calls [--messages N] [--reps N]               the request-path calls alone (bench/calls.py)

See bench/README.md for the scenarios and how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from bench import calls, dispatch, fraud, scenarios
from bench.scenarios import (
    Floor,
    LoadResult,
    ceiling_plans,
    ceiling_run,
    floor_run,
    median_of,
    op_mix,
    send_run,
    verify_mix,
    verify_run,
)
from bench.system import RAISED_OURS, RAISED_TELEGRAM, SHARED_BOTS, TELEGRAM_LIMITS, System, proc_sample, workdir
from services.core.devdb import ROOT
from services.core.logging import configure_logging

RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]
    runs: int
    warmup: float
    duration: float
    users: int
    mix_messages: int
    mix_pairs: int
    verify_levels: tuple[int, ...]
    ceiling_users: int
    ceiling_messages: int
    ceiling_concurrency: int


FULL = Plan((1, 4, 16, 64), 3, 2.0, 6.0, 300, 200, 200, (4, 16, 64), 1000, 3000, 32)
QUICK = Plan((1, 4, 16, 64), 1, 1.0, 4.0, 150, 100, 100, (16, 64), 1000, 3000, 32)
TINY = Plan((2,), 1, 0.3, 1.0, 6, 10, 10, (2,), 12, 36, 8)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run per level (the ceiling stays full size)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test size: seconds, not minutes")
    parser.add_argument("--skip-ceiling", action="store_true", help="leave out the Telegram ceiling (scenario 4)")
    parser.add_argument("--skip-fraud", action="store_true", help="leave out the fraud guard (scenario 5)")
    parser.add_argument("--skip-calls", action="store_true", help="leave out the request-path calls (scenario 6)")
    parser.add_argument(
        "--skip-dispatch", action="store_true", help="leave out background dispatch on two replicas (scenario 7)"
    )
    parser.add_argument("--levels", help="concurrency levels, e.g. 1,8,32")
    parser.add_argument("--runs", type=int, help="runs per level (median reported)")
    parser.add_argument("--duration", type=float, help="measured seconds per run")
    parser.add_argument("--users", type=int, help="sandbox users of the send/verify stack")
    parser.add_argument("--ceiling-users", type=int, help="sandbox users of the ceiling (default 1000)")
    parser.add_argument("--ceiling-messages", type=int, help="messages per ceiling run (default 3000)")
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated services to run under pyinstrument during the send scenario (reports in the work dir)",
    )
    parser.add_argument(
        "--delivery-limits",
        choices=("raised", "off"),
        default="raised",
        help="delivery rate limits raised far out of reach (default; still counted) or off (not counted at all)",
    )
    parser.add_argument(
        "--no-request-id", action="store_true", help="send messages without request_id (no idempotency lookup)"
    )
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/bench-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep logs and profiles under bench/results/work")
    return parser.parse_args(argv)


def plan_of(args: argparse.Namespace) -> Plan:
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.levels:
        changes["levels"] = tuple(int(x) for x in args.levels.split(",") if x)
    if args.runs:
        changes["runs"] = args.runs
    if args.duration:
        changes["duration"] = args.duration
    if args.users:
        changes["users"] = args.users
    if args.ceiling_users:
        changes["ceiling_users"] = args.ceiling_users
    if args.ceiling_messages:
        changes["ceiling_messages"] = args.ceiling_messages
    return Plan(**{**plan.__dict__, **changes})


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def peak_rss(system: System) -> dict[str, int]:
    return {name: proc_sample(pid).peak_rss_kb // 1024 for name, pid in system.pids().items()}


async def pipeline(plan: Plan, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**RAISED_OURS, **RAISED_TELEGRAM, **limits_env(args)}
    if args.profile:
        env["OTPGATE_BENCH_PROFILE_SERVICES"] = args.profile
        env["OTPGATE_BENCH_PROFILE_DIR"] = str(work / "profiles")
        (work / "profiles").mkdir(parents=True, exist_ok=True)
    system = System(env=env, work=work / "pipeline")
    report: dict[str, Any] = {}
    try:
        say("bench: starting the stack (Telegram limits raised)…")
        await system.start(os.environ.get("MONGODB_URI", ""))
        say(f"bench: connecting {plan.users} sandbox users over the shared bots…")
        users = await system.connect_users(plan.users)
        mix = await op_mix(system, users, plan.mix_messages)
        report["op_mix"] = mix
        say(
            f"bench: one accepted+sent message costs {mix['total_per_message']} database operations (commands; inserts by document)"
        )

        # Send and floor side by side, level by level: the floor's collections are grown to the
        # size of ours before each floor level (ours grow as messages are sent).
        send: list[dict[str, Any]] = []
        floors: list[dict[str, Any]] = []
        floor = Floor(system.uri, mix["per_message"])
        await floor.prepare()
        source: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(system.uri, appname="bench-sizes")
        try:
            for level in plan.levels:
                runs: list[LoadResult] = []
                for run in range(plan.runs):
                    runs.append(await send_run(system, users, level, plan.warmup, plan.duration, f"s{level}r{run}"))
                send.append(median_of(runs))
                sizes = await floor.sync(source)
                fruns = [
                    await floor_run(floor, level, plan.warmup, plan.duration, system.pids()) for _ in range(plan.runs)
                ]
                floors.append({**median_of(fruns), "collection_sizes": sizes})
                ratio = send[-1]["rate"] / floors[-1]["rate"] if floors[-1]["rate"] else float("nan")
                say(f"bench: c={level}: send {send[-1]['rate']} msg/s, floor {floors[-1]['rate']} msg/s ({ratio:.2f})")
        finally:
            await floor.close()
            await source.close()
        report["send"] = send
        report["floor"] = floors

        vmix = await verify_mix(system, users, plan.mix_pairs)
        report["verify_mix"] = vmix
        say(
            f"bench: one verify pair costs {vmix['total_per_operation']} database operations and "
            f"{vmix['rpc_total_per_operation']} gRPC calls"
        )
        verify: list[dict[str, Any]] = []
        for level in plan.verify_levels:
            vruns = [
                await verify_run(
                    system, users, level, plan.warmup, plan.duration, f"v{level}r{run}-{os.urandom(2).hex()}"
                )
                for run in range(plan.runs)
            ]
            verify.append(median_of(vruns))
            say(f"bench: verify c={level}: {verify[-1]['rate']} pairs/s")
        report["verify"] = verify
        report["peak_rss_mb"] = peak_rss(system)
        await system.close_channels()
    finally:
        system.stop()
    return report


def limits_env(args: argparse.Namespace) -> dict[str, str]:
    """--delivery-limits off: every delivery rate limit set to 0 (unlimited), to measure what they cost."""
    if args.delivery_limits == "raised":
        return {}
    return {name: "0/60" for name in RAISED_OURS if name.startswith("OTPGATE_DELIVERY_LIMIT_")}


async def ceiling(plan: Plan, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    system = System(env={**RAISED_OURS, **TELEGRAM_LIMITS, **limits_env(args)}, work=work / "ceiling")
    report: dict[str, Any] = {}
    try:
        say("bench: starting the stack (sandbox enforcing 30 msg/s per bot, 1 msg/s per chat)…")
        await system.start(os.environ.get("MONGODB_URI", ""))
        say(f"bench: connecting {plan.ceiling_users} sandbox users (their bot replies are paced too)…")
        started = time.monotonic()
        # Several at once: each person's bot replies are paced at 1 msg/s per chat, so setup mostly waits.
        await system.connect_users(plan.ceiling_users, ceiling_plans(plan.ceiling_users), concurrency=24)
        report["setup_seconds"] = round(time.monotonic() - started, 1)
        report["setup_retries"] = system.setup_retries
        await asyncio.sleep(2.0)  # let the buckets refill after the set-up replies
        one = await ceiling_run(system, plan.ceiling_messages, False, plan.ceiling_concurrency, "c1")
        report["one_bot"] = one.summary()
        say(f"bench: one bot: {one.rate:.2f} msg/s (limit 30), flood errors {int(one.flood_errors)}")
        await asyncio.sleep(2.0)
        # The same requests in flight per bot as the one-bot run: 32 for each of the three.
        in_flight = plan.ceiling_concurrency * len(SHARED_BOTS)
        pool = await ceiling_run(system, plan.ceiling_messages, True, in_flight, "c3")
        report["pool"] = pool.summary()
        say(f"bench: three bots: {pool.rate:.2f} msg/s (limit 90), flood errors {int(pool.flood_errors)}")
        report["peak_rss_mb"] = peak_rss(system)
        await system.close_channels()
    finally:
        system.stop()
    return report


CPU_COLUMNS = ("edge", "delivery", "directory", "botgateway", "verification", "telegramsim", "database")
# Our own services: the simulated Telegram and the database stand in for what is not ours.
OUR_SERVICES = ("edge", "delivery", "directory", "botgateway", "verification")


def cpu_ms_per_message(row: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per sent message (or Verify pair) of each of our services and their total,
    at one level (CPU % of one core ÷ operations/s × 10)."""
    rate = float(row.get("rate") or 0.0)
    cpu = row.get("service_cpu_pct", {})
    per = {name: (float(cpu.get(name, 0.0)) * 10 / rate if rate else 0.0) for name in OUR_SERVICES}
    return {**per, "total": sum(per.values())}


def goals(report: dict[str, Any]) -> dict[str, float]:
    """The figures the performance goals are read from: the worst pipeline/floor over the levels,
    CPU per message at the busiest level, database operations per message, verify ÷ send."""
    pipe = report.get("pipeline", {})
    sends = pipe.get("send", [])
    floor_by = {row["concurrency"]: row["rate"] for row in pipe.get("floor", [])}
    ratios = [row["rate"] / floor_by[row["concurrency"]] for row in sends if floor_by.get(row["concurrency"])]
    busiest = max(sends, key=lambda row: row["rate"], default=None)
    best_send = busiest["rate"] if busiest else 0.0
    best_verify = max((row["rate"] for row in pipe.get("verify", [])), default=0.0)
    return {
        "pipeline_floor_min": min(ratios, default=0.0),
        "cpu_ms_per_msg": cpu_ms_per_message(busiest)["total"] if busiest else 0.0,
        "db_ops_per_msg": float(pipe.get("op_mix", {}).get("total_per_message", 0.0)),
        "verify_send": best_verify / best_send if best_send else 0.0,
    }


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(report: dict[str, Any]) -> str:
    lines: list[str] = []
    pipe = report.get("pipeline", {})
    floor_by = {row["concurrency"]: row for row in pipe.get("floor", [])}
    lines.append("Send (edge SendMessage over gRPC, Telegram limits raised) vs floor (same DB operations, direct)")
    header = (
        f"{'conc':>5} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rcv p50':>8} {'rcv p99':>8} "
        f"{'floor/s':>8} {'fl p99':>8} {'pipe/fl':>7} {'errors':>8}  cpu% edge/deliv/dir/bot/verif/tgsim/db/driver"
    )
    lines.append(header)
    for row in pipe.get("send", []):
        floor = floor_by.get(row["concurrency"], {})
        ratio = row["rate"] / floor["rate"] if floor.get("rate") else float("nan")
        cpu = row["service_cpu_pct"]
        cpus = "/".join(fmt(cpu.get(k, 0.0)) for k in CPU_COLUMNS)
        lines.append(
            f"{row['concurrency']:>5} {row['rate']:>8.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['received_p50_ms']:>8.1f} {row['received_p99_ms']:>8.1f} {floor.get('rate', 0):>8.1f} "
            f"{floor.get('p99_ms', 0):>8.1f} {ratio:>7.2f} {sum(row['errors'].values()):>8}  "
            f"{cpus}/{fmt(row['driver_cpu_pct'])}"
        )
    if pipe.get("send"):
        lines.append("CPU ms per sent message: " + "/".join(OUR_SERVICES) + " = total")
        for row in pipe["send"]:
            per = cpu_ms_per_message(row)
            parts = "/".join(f"{per[name]:.2f}" for name in OUR_SERVICES)
            lines.append(f"{row['concurrency']:>5}  {parts} = {per['total']:.2f}")
    if pipe.get("verify"):
        lines.append("Verify pairs (StartVerification with a client-supplied code + CheckVerification)")
        lines.append(
            f"{'conc':>5} {'pairs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8}  cpu ms per pair "
            + "/".join(OUR_SERVICES)
            + " = total"
        )
        for row in pipe["verify"]:
            per = cpu_ms_per_message(row)
            lines.append(
                f"{row['concurrency']:>5} {row['rate']:>8.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
                f"{sum(row['errors'].values()):>8}  cpu ms per pair "
                + "/".join(f"{per[name]:.2f}" for name in OUR_SERVICES)
                + f" = {per['total']:.2f}"
            )
    if pipe.get("peak_rss_mb"):
        lines.append("Peak RSS MB: " + ", ".join(f"{k} {v}" for k, v in pipe["peak_rss_mb"].items()))
    if pipe.get("op_mix"):
        mix = pipe["op_mix"]
        lines.append(
            f"DB operations (commands; inserts by document) per accepted+sent message: {mix['total_per_message']} "
            f"(~{mix.get('ms_per_message', 0)} ms of database round trips at concurrency 4)"
        )
        lines.append(f"    {'count':>6}  {'ms each':>7}  service|database.collection:command:shape")
        lines.extend(mix_lines(mix))
    if pipe.get("verify_mix"):
        mix = pipe["verify_mix"]
        lines.append(
            f"DB operations (commands; inserts by document) per Verify pair: {mix['total_per_operation']} "
            f"(~{mix.get('ms_per_operation', 0)} ms of database round trips at concurrency 4)"
        )
        lines.extend(mix_lines(mix))
    ceil = report.get("ceiling", {})
    for name, limit in (("one_bot", 30), ("pool", 90)):
        if name in ceil:
            row = ceil[name]
            lines.append(
                f"Telegram ceiling, {'one bot' if name == 'one_bot' else 'three bots'}: {row['received']}/"
                f"{row['messages']} msgs in {row['seconds']:.1f} s = {row['rate']:.2f} msg/s / {limit} = "
                f"{row['ratio']:.3f}; flood errors {row['flood_errors']}; bucket retries "
                f"{row['bot_rate_limited_retries']}; per bot {row['per_bot']}; cpu% edge/deliv/dir/bot/verif/tgsim/db "
                + "/".join(fmt(row.get("service_cpu_pct", {}).get(k, 0.0)) for k in CPU_COLUMNS)
            )
    return "\n".join(lines)


def mix_lines(mix: dict[str, Any]) -> list[str]:
    """A command mix's rows (count, mean round trip, key), then the gRPC calls it made."""
    lines = [f"    {'count':>6}  {'ms each':>7}  service|database.collection:command:shape"]
    for key, value in mix.get("per_operation", mix.get("per_message", {})).items():
        lines.append(f"    {value:>6.2f}  {mix.get('mean_ms', {}).get(key, 0):>7.1f}  {key}")
    rpcs = mix.get("rpc_per_operation", {})
    if rpcs:
        lines.append(f"    gRPC calls served: {mix.get('rpc_total_per_operation', 0)}")
        lines.extend(f"    {value:>6.2f}           {key}" for key, value in rpcs.items())
    return lines


def summary_line(report: dict[str, Any]) -> str:
    pipe = report.get("pipeline", {})
    best_send = max((row["rate"] for row in pipe.get("send", [])), default=0.0)
    best_floor = max((row["rate"] for row in pipe.get("floor", [])), default=0.0)
    ratio = best_send / best_floor if best_floor else 0.0
    ceil = report.get("ceiling", {})
    bot = ceil.get("one_bot", {}).get("ratio", 0.0)
    pool = ceil.get("pool", {}).get("ratio", 0.0)
    floods = int(ceil.get("one_bot", {}).get("flood_errors", 0)) + int(ceil.get("pool", {}).get("flood_errors", 0))
    figures = goals(report)
    return (
        f"bench: pipeline/floor={ratio:.2f} pipeline/floor_min={figures['pipeline_floor_min']:.2f} "
        f"cpu_ms_per_msg={figures['cpu_ms_per_msg']:.2f} db_ops_per_msg={figures['db_ops_per_msg']:.2f} "
        f"verify/send={figures['verify_send']:.2f} bot/limit={bot:.2f} pool/limit={pool:.2f} flood_errors={floods}"
    )


async def run(args: argparse.Namespace) -> int:
    plan = plan_of(args)
    scenarios.REQUEST_IDS["on"] = not args.no_request_id
    work = workdir(args.keep or bool(args.profile))
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "plan": plan.__dict__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "delivery_limits": args.delivery_limits,
        "request_ids": not args.no_request_id,
        "driver": "python asyncio + grpc.aio, one process (its CPU is reported as 'driver')",
    }
    out = args.out or RESULTS / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["pipeline"] = await pipeline(plan, args, work)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))  # partial: the ceiling is long
    if not args.skip_ceiling:
        report["ceiling"] = await ceiling(plan, args, work)
        out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    if not args.skip_dispatch:
        report["dispatch"] = await dispatch.run(dispatch.TINY if args.tiny else dispatch.FULL, work)
        report["dispatch"]["summary"] = dispatch.summary_line(report["dispatch"])
        out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    if not args.skip_fraud:
        # The guard runs the services in this process: their logs would bury the report.
        configure_logging("bench", "error", stream=sys.stderr)
        seeds = [1] if args.tiny else [1, 2, 3]
        minutes, scale = (1.0, 0.5) if args.tiny else (30.0, 1.0)
        report["fraud"] = {
            "minutes": minutes,
            "scale": scale,
            "runs": await fraud.run(seeds, minutes, scale, os.environ.get("MONGODB_URI", "")),
        }
        out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    if not args.skip_calls:
        report["calls"] = await calls.run(calls.TINY if args.tiny else calls.FULL, os.environ.get("MONGODB_URI", ""))
    report["summary"] = summary_line(report)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    print(table(report))
    if "dispatch" in report:
        print(dispatch.table(report["dispatch"]))
    if "fraud" in report:
        print(fraud.table(report["fraud"]["runs"]))
    print(f"JSON: {out}" + (f"; logs/profiles: {work}" if args.keep or args.profile else ""))
    if not (args.keep or args.profile):
        shutil.rmtree(work, ignore_errors=True)
    print(report["summary"], flush=True)
    if "dispatch" in report:
        print(report["dispatch"]["summary"], flush=True)
    if "fraud" in report:
        report["fraud"]["summary"] = fraud.summary_line(report["fraud"]["runs"])
        out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        print(report["fraud"]["summary"], flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["fraud"]:
        return fraud.main(args[1:])
    if args[:1] == ["dispatch"]:
        return dispatch.main(args[1:])
    return asyncio.run(run(parse(args)))


if __name__ == "__main__":
    raise SystemExit(main())

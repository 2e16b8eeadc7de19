"""`python -m bench fraud`: the SMS fraud guard against synthetic pumping mixed with real traffic.

    python -m bench fraud [--seeds 1,2,3,4,5] [--minutes 30] [--scale 1.0] [--out FILE]

For each seed: a cold start (fresh databases, no history), the edge, verification and delivery in
this process on the dev database (MONGODB_URI, or one started here), sandbox SMS and the sandbox
CAPTCHA provider, and a ManualClock that the replay moves from one event to the next, so half an
hour of traffic (bench/fraud_traffic.py) runs in minutes. The client is configured as
docs/operations.md recommends (SMS to its four countries, CAPTCHA on risk, the guard blocking, a
daily SMS cap). Every request goes through the public API (edge gRPC StartVerification with the
end user's address, device and session); a person asked for a CAPTCHA solves it with the sandbox
provider and asks again, and types the code read from the sandbox SMS inbox (CheckVerification).

Reported per kind and seed: requests, the share of attack requests that got an SMS, the share of
legitimate requests refused (no SMS in the end, CAPTCHA solved where asked) and shown a CAPTCHA;
then the mean, min and max over the seeds. Targets: at most 0.5 % of attack requests get an SMS
and at most 0.5 % of legitimate ones are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.edge.v1 import edge_pb2, edge_pb2_grpc

from bench.fraud_traffic import ATTACKS, COUNTRIES, LEGIT, Request, generate
from services.core.clock import ManualClock
from services.core.crypto import Keyring
from services.core.devdb import ROOT, DevDatabase
from services.core.errors import parse_rpc_error
from services.core.grpc_client import make_channel
from services.core.grpc_server import RunningService
from services.core.logging import configure_logging
from services.core.mongo import connect
from tests.support.stack import running_stack

RESULTS = ROOT / "bench" / "results"
SERVICES = ("delivery", "verification", "edge")
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
TARGET = 0.005
# Refusals a person may meet that are about them, not the guard: counted, but told apart.
RATE_REASONS = {"RATE_LIMITED", "RESEND_TOO_SOON", "MAX_SENDS_REACHED", "SMS_CAP_REACHED", "EDGE_RATE_LIMITED"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Tally:
    requests: int = 0
    sms: int = 0
    refused: int = 0
    captcha: int = 0
    # A person typed the code they got and it was not approved: how the verification stood then.
    not_approved: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "sms": self.sms,
            "refused": self.refused,
            "captcha_shown": self.captcha,
            "sms_share": self.sms / self.requests if self.requests else 0.0,
            "refused_share": self.refused / self.requests if self.requests else 0.0,
            "captcha_share": self.captcha / self.requests if self.requests else 0.0,
            "codes_not_approved": dict(self.not_approved.most_common()),
            "reasons": dict(self.reasons.most_common()),
        }


@asynccontextmanager
async def stack(uri: str, clock: ManualClock) -> AsyncIterator[dict[str, RunningService]]:
    """The three services in this process (as the integration tests start them: tests/support),
    each on a fresh database and a free port."""
    client = connect(uri, "bench-fraud")
    overrides = {
        "OTPGATE_CAPTCHA_PROVIDER": "sandbox",
        "OTPGATE_DELIVERY_DISPATCHER": "false",  # SMS go out inline; nothing waits for a retry
        "OTPGATE_RPC_TIMEOUT": "20",
    }
    try:
        keyring = Keyring.generate_spec("k1")
        async with running_stack(client, keyring, SERVICES, overrides=overrides, clock=clock, mongo_uri=uri) as running:
            yield running.running
    finally:
        await client.close()


class Replay:
    """Runs one traffic through the public API, one event at a time in simulated time."""

    def __init__(self, running: dict[str, RunningService], clock: ManualClock, seed: int) -> None:
        self.clock = clock
        self.rng = random.Random(seed * 7919 + 1)
        self.channels = {
            "edge": make_channel(
                running["edge"].address,
                [
                    edge_pb2.DESCRIPTOR.services_by_name["PublicService"],
                    edge_pb2.DESCRIPTOR.services_by_name["CaptchaSandboxService"],
                ],
            ),
            "delivery": make_channel(
                running["delivery"].address, [delivery_pb2.DESCRIPTOR.services_by_name["SmsSandboxService"]]
            ),
        }
        self.public = edge_pb2_grpc.PublicServiceStub(self.channels["edge"])
        self.captcha = edge_pb2_grpc.CaptchaSandboxServiceStub(self.channels["edge"])
        self.inbox = delivery_pb2_grpc.SmsSandboxServiceStub(self.channels["delivery"])
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.tallies: dict[str, Tally] = {kind: Tally() for kind in (LEGIT, *ATTACKS)}
        self._events: list[tuple[float, int, Callable[[], Awaitable[None]]]] = []
        self._seq = 0

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    def at(self, t: float, job: Callable[[], Awaitable[None]]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, job))

    async def run(self, schedule: list[tuple[float, Request]]) -> None:
        for t, request in schedule:
            self.at(t, lambda r=request: self.ask(r, counted=True))  # type: ignore[misc]
        while self._events:
            t, _, job = heapq.heappop(self._events)
            self.clock.set(START + timedelta(seconds=t))
            await job()

    def now(self) -> float:
        return (self.clock.now() - START).total_seconds()

    async def ask(self, request: Request, counted: bool, token: str = "", again: bool = False) -> None:
        """One StartVerification as the asker makes it; follow-ups are scheduled, not awaited."""
        tally = self.tallies[request.kind]
        if counted:
            tally.requests += 1
        start = edge_pb2.StartVerificationRequest(
            phone=request.phone,
            channel=common_pb2.CHANNEL_SMS,
            end_user_ip=request.ip,
            end_user_agent=request.user_agent,
            session_id=request.session_id,
            captcha_token=token,
        )
        try:
            reply = await self.public.StartVerification(start, metadata=self.metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            failure = parse_rpc_error(error)
            if failure.reason == "CAPTCHA_REQUIRED" and not token:
                tally.captcha += 1
                if self.rng.random() < request.solves_captcha:
                    solved = await self.captcha.SolveCaptcha(edge_pb2.SolveCaptchaRequest(), timeout=10)
                    self.at(
                        self.now() + request.solve_delay,
                        lambda: self.ask(request, counted=False, token=solved.token, again=again),
                    )
                    return
            detail = failure.metadata.get("signal", "") or _quota_subject(failure)
            tally.refused += 1
            tally.reasons[f"{failure.reason}:{detail}" if detail else failure.reason] += 1
            return
        tally.sms += 1
        if request.kind != LEGIT:
            return
        chance = request.second_enters if again else request.enters_code
        verification_id = reply.verification.id
        if self.rng.random() < chance:
            self.at(self.now() + request.enter_delay, lambda: self.enter(request, verification_id))
        elif request.asks_again_after is not None and not again:
            self.at(self.now() + request.asks_again_after, lambda: self.ask(request, counted=True, again=True))

    async def enter(self, request: Request, verification_id: str) -> None:
        """The person reads the SMS and types the code."""
        inbox = await self.inbox.ListSandboxSms(
            delivery_pb2.ListSandboxSmsRequest(phone=request.phone, page_size=1), timeout=10
        )
        code = inbox.messages[0].text.split(" ", 1)[0]
        check = edge_pb2.CheckVerificationRequest(id=verification_id, code=code)
        reply = await self.public.CheckVerification(check, metadata=self.metadata, timeout=30)
        if not reply.approved:
            status = common_pb2.VerificationStatus.Name(reply.verification.status)
            self.tallies[LEGIT].not_approved[status.removeprefix("VERIFICATION_STATUS_")] += 1


def _quota_subject(failure: Any) -> str:
    """Which limit a RESOURCE_EXHAUSTED named (QuotaFailure subject), if any."""
    from google.rpc import error_details_pb2

    for packed in failure.status.details if failure.status is not None else ():
        if packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            packed.Unpack(quota)
            return ",".join(v.description.split(":")[0] for v in quota.violations)
    return ""


async def configure_client(running: dict[str, RunningService], clock: ManualClock) -> tuple[tuple[str, str], ...]:
    """A client set up as docs/operations.md recommends; returns its key's call metadata."""
    edge = running["edge"].app
    assert edge.admin is not None  # type: ignore[attr-defined]
    client = await edge.admin.create_client("Bench Shop")  # type: ignore[attr-defined]
    _, key = await edge.admin.create_key(client.id, [])  # type: ignore[attr-defined]
    channel = make_channel(running["delivery"].address, [delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"]])
    try:
        await delivery_pb2_grpc.DeliveryServiceStub(channel).UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(
                    client_id=client.id,
                    sms_countries=sorted(COUNTRIES),
                    captcha_rule=common_pb2.CAPTCHA_RULE_ON_RISK,
                    fraud_mode=common_pb2.FRAUD_MODE_BLOCK,
                    daily_sms_cap=50_000,
                ),
                update_mask=field_mask_pb2.FieldMask(
                    paths=["sms_countries", "captcha_rule", "fraud_mode", "daily_sms_cap"]
                ),
            )
        )
    finally:
        await channel.close()
    return (("authorization", f"Bearer {key}"),)


async def one_seed(uri: str, seed: int, minutes: float, scale: float) -> dict[str, Any]:
    traffic = generate(seed, minutes * 60, scale)
    clock = ManualClock(START)
    started = time.monotonic()
    async with stack(uri, clock) as running:
        replay = Replay(running, clock, seed)
        try:
            replay.metadata = await configure_client(running, clock)
            await replay.run(traffic.schedule)
        finally:
            await replay.close()
    result = {kind: tally.as_dict() for kind, tally in replay.tallies.items()}
    attack = Tally()
    for kind in ATTACKS:
        attack.requests += replay.tallies[kind].requests
        attack.sms += replay.tallies[kind].sms
    return {
        "seed": seed,
        "wall_seconds": round(time.monotonic() - started, 1),
        "kinds": result,
        "attack_sms_share": attack.sms / attack.requests if attack.requests else 0.0,
        "legit_refused_share": result[LEGIT]["refused_share"],
    }


def spread(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):6.2f}% {100 * min(values):6.2f}% {100 * max(values):6.2f}%"


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "Fraud guard, per kind over seeds " + ",".join(str(r["seed"]) for r in runs) + " (mean / min / max)",
        f"{'kind':<18} {'requests':>9}  {'got an SMS (attacks) / refused (people)':>26}   {'CAPTCHA shown':>26}",
    ]
    for kind in (*ATTACKS, LEGIT):
        rows = [r["kinds"][kind] for r in runs]
        share = [row["refused_share"] if kind == LEGIT else row["sms_share"] for row in rows]
        captcha = [row["captcha_share"] for row in rows]
        requests = statistics.mean(row["requests"] for row in rows)
        lines.append(f"{kind:<18} {requests:>9.0f}  {spread(share):>26}   {spread(captcha):>26}")
    attack = [r["attack_sms_share"] for r in runs]
    legit = [r["legit_refused_share"] for r in runs]
    lines.append(f"{'all attacks':<18} {'':>9}  {spread(attack):>26}")
    reasons: Counter[str] = Counter()
    for r in runs:
        reasons.update(r["kinds"][LEGIT]["reasons"])
    if reasons:
        lines.append("people refused by reason (all seeds): " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    not_approved: Counter[str] = Counter()
    for r in runs:
        not_approved.update(r["kinds"][LEGIT]["codes_not_approved"])
    if not_approved:
        lines.append(
            "codes people typed that were not approved, by the verification's status (all seeds): "
            + ", ".join(f"{k} {v}" for k, v in not_approved.most_common())
        )
    lines.append(f"targets: attacks <= 0.50 % got an SMS (max {100 * max(attack):.2f} %), people <= 0.50 % refused "
                 f"(max {100 * max(legit):.2f} %)")  # fmt: skip
    return "\n".join(lines)


def summary_line(runs: list[dict[str, Any]]) -> str:
    attack = [r["attack_sms_share"] for r in runs]
    legit = [r["legit_refused_share"] for r in runs]
    return (
        f"bench fraud: attack_sms={100 * statistics.mean(attack):.2f}% (max {100 * max(attack):.2f}%) "
        f"legit_refused={100 * statistics.mean(legit):.2f}% (max {100 * max(legit):.2f}%) seeds={len(runs)}"
    )


async def run(seeds: list[int], minutes: float, scale: float, uri: str = "") -> list[dict[str, Any]]:
    database: DevDatabase | None = None
    if not uri:
        database = DevDatabase()
        database.start()
        uri = database.uri
    try:
        runs = []
        for seed in seeds:
            say(f"bench fraud: seed {seed}, {minutes:g} simulated minutes…")
            result = await one_seed(uri, seed, minutes, scale)
            say(
                f"bench fraud: seed {seed}: attacks {100 * result['attack_sms_share']:.2f}% got an SMS, "
                f"people {100 * result['legit_refused_share']:.2f}% refused ({result['wall_seconds']} s)"
            )
            runs.append(result)
        return runs
    finally:
        if database is not None:
            database.stop()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench fraud", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds (default 1,2,3,4,5)")
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated minutes per seed (default 30)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every traffic rate (default 1)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/fraud-<time>.json)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    configure_logging("bench", "error", stream=sys.stderr)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = asyncio.run(run(seeds, args.minutes, args.scale, os.environ.get("MONGODB_URI", "")))
    report = {"started": datetime.now(UTC).isoformat(), "minutes": args.minutes, "scale": args.scale, "runs": runs}
    report["summary"] = summary_line(runs)
    out = args.out or RESULTS / f"fraud-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(table(runs))
    print(f"JSON: {out}")
    print(report["summary"], flush=True)
    return 0

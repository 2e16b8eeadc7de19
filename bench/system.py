"""The system under test: the dev database and the five services as processes, sandbox mode.

Each service runs through `bench.instrument` (its database commands are counted, and it can
be profiled). Helpers create the API client, connect sandbox users, read sandbox chats and
sample /proc for CPU and peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2
from otpgate.common.v1 import common_pb2
from otpgate.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc
from otpgate.telegramsim.v1 import telegramsim_pb2, telegramsim_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.cli.dev import SERVICES, ProcessStack
from services.core.config import SIMULATOR
from services.core.crypto import Keyring
from services.core.devdb import ROOT, DevDatabase, free_port

SHARED_BOTS = ("smsccode_bot", "smsc_code_bot", "smscodes_bot")
HIGH = "100000000"

# Every limit that is not Telegram's raised far above what one machine can push.
RAISED_OURS = {
    "OTPGATE_EDGE_KEY_RATE": HIGH,
    "OTPGATE_EDGE_KEY_BURST": HIGH,
    "OTPGATE_EDGE_IP_RATE": HIGH,
    "OTPGATE_EDGE_IP_BURST": HIGH,
    "OTPGATE_DELIVERY_LIMIT_CLIENT": f"{HIGH}/60",
    "OTPGATE_DELIVERY_LIMIT_GLOBAL": f"{HIGH}/60",
    "OTPGATE_DELIVERY_LIMIT_PHONE_SHORT": f"{HIGH}/600",
    "OTPGATE_DELIVERY_LIMIT_PHONE_DAILY": f"{HIGH}/86400",
    "OTPGATE_DELIVERY_LIMIT_SESSION": f"{HIGH}/600",
    # Generous internal deadlines: an overloaded pipeline shows as lower throughput, not as errors.
    "OTPGATE_RPC_TIMEOUT": "20",
}
# Telegram's limits (sandbox and our own buckets) raised too: scenario 1-3.
RAISED_TELEGRAM = {
    "OTPGATE_SANDBOX_BOT_RATE": HIGH,
    "OTPGATE_SANDBOX_BOT_BURST": HIGH,
    "OTPGATE_SANDBOX_CHAT_RATE": HIGH,
    "OTPGATE_SANDBOX_CHAT_BURST": HIGH,
    "OTPGATE_BOTGATEWAY_BOT_RATE": HIGH,
    "OTPGATE_BOTGATEWAY_BOT_BURST": HIGH,
    "OTPGATE_BOTGATEWAY_CHAT_RATE": HIGH,
    "OTPGATE_BOTGATEWAY_CHAT_BURST": HIGH,
}
# Telegram's real limits, enforced by the sandbox: 30 msg/s per bot, 1 msg/s per chat (scenario 4).
TELEGRAM_LIMITS = {
    "OTPGATE_SANDBOX_BOT_RATE": "30",
    "OTPGATE_SANDBOX_CHAT_RATE": "1",
}


@dataclass
class User:
    user_id: int
    phone: str
    bots: list[str]


class InstrumentedStack(ProcessStack):
    """ProcessStack whose services run under bench.instrument (profiled: OTPGATE_BENCH_PROFILE_DIR
    and the comma-separated service names in OTPGATE_BENCH_PROFILE_SERVICES)."""

    def command(self, name: str, env: dict[str, str], process: str) -> list[str]:
        if name == SIMULATOR:  # Telegram's work is not ours: its database commands are not counted
            return super().command(name, env, process)
        profiled = {s for s in self.env.get("OTPGATE_BENCH_PROFILE_SERVICES", "").split(",") if s}
        if name in profiled:
            env["OTPGATE_BENCH_PROFILE"] = str(Path(self.env["OTPGATE_BENCH_PROFILE_DIR"]) / f"{process}.html")
        return [sys.executable, "-m", "bench.instrument", name, process]


@dataclass
class ProcSample:
    cpu: float  # user + system seconds
    peak_rss_kb: int


def proc_sample(pid: int) -> ProcSample:
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        peak = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1])
        return ProcSample(cpu, peak)
    except (OSError, IndexError, ValueError):
        return ProcSample(0.0, 0)


@dataclass
class System:
    """A running stack plus the channels and data a benchmark needs."""

    env: dict[str, str]
    work: Path
    database: DevDatabase | None = None
    stack: InstrumentedStack | None = None
    uri: str = ""
    http_port: int = 0
    api_key: str = ""
    client_id: str = ""
    users: list[User] = field(default_factory=list)
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    setup_retries: int = 0
    _last_seen: dict[tuple[int, str], int] = field(default_factory=dict)
    # Delivery processes: more than one runs delivery-2, delivery-3… on ports of their own.
    delivery_replicas: int = 1

    @property
    def counts_dir(self) -> Path:
        return self.work / "counts"

    async def start(self, uri: str = "") -> None:
        self.counts_dir.mkdir(parents=True, exist_ok=True)
        if uri:
            self.uri = uri
        else:
            self.database = DevDatabase(data_dir=self.work / "db")
            self.uri = self.database.start()
        self.http_port = free_port()
        env = {
            "MONGODB_URI": self.uri,
            "OTPGATE_KEYS": Keyring.generate_spec("bench1"),
            "OTPGATE_ENV": "dev",
            "OTPGATE_SANDBOX": "true",
            "OTPGATE_EDGE_HTTP_PORT": str(self.http_port),
            # The simulated Telegram's local Gateway listens too: a port of its own, never the default.
            "OTPGATE_TELEGRAMSIM_GATEWAY_PORT": str(free_port()),
            "OTPGATE_BENCH_COUNTS_DIR": str(self.counts_dir),
            **self.env,
        }
        # A fresh set of databases per stack (the dev database may be reused via MONGODB_URI).
        tag = os.urandom(3).hex()
        for name in SERVICES:
            env[f"OTPGATE_{name.upper()}_DATABASE"] = f"bench{tag}_{name}"
        self.stack = InstrumentedStack(
            env=env,
            log_dir=self.work / "logs",
            ports={name: free_port() for name in SERVICES},
            metrics_ports={name: free_port() for name in SERVICES},
        )
        for index in range(2, self.delivery_replicas + 1):
            self.stack.add_replica(f"delivery-{index}", "delivery", free_port(), free_port())
        self.stack.start()
        await self.stack.wait_healthy(timeout=120)
        await self._create_client()

    def stop(self) -> None:
        if self.stack is not None:
            # A profiled service writes its reports as it exits, which takes longer than a stop.
            profiled = bool(self.env.get("OTPGATE_BENCH_PROFILE_SERVICES"))
            self.stack.stop(grace=120.0 if profiled else 10.0)
        if self.database is not None:
            self.database.stop()

    async def close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def address(self, name: str) -> str:
        assert self.stack is not None
        return f"127.0.0.1:{self.stack.ports[name]}"

    def channel(self, name: str) -> grpc.aio.Channel:
        if name not in self._channels:
            self._channels[name] = grpc.aio.insecure_channel(self.address(name))
        return self._channels[name]

    def new_channel(self, name: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address(name))

    def pids(self) -> dict[str, int]:
        assert self.stack is not None
        pids = {name: proc.pid for name, proc in self.stack.processes.items()}
        if self.database is not None and self.database.process is not None:
            pids["database"] = self.database.process.pid
        return pids

    # Set-up ---------------------------------------------------------------------------------

    async def _create_client(self) -> None:
        assert self.stack is not None
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.cli.main", "--json", "clients", "create", "bench-shop"],
            env=self.stack.service_env(),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"otpgate clients create failed: {result.stderr[-2000:]}")
        created = json.loads(result.stdout)
        self.api_key, self.client_id = str(created["key"]), str(created["client_id"])
        delivery = delivery_pb2_grpc.DeliveryServiceStub(self.channel("delivery"))
        await delivery.UpdateClientPolicy(
            delivery_pb2.UpdateClientPolicyRequest(
                policy=common_pb2.ClientPolicy(client_id=self.client_id, allow_custom_code=True),
                update_mask=field_mask_pb2.FieldMask(paths=["allow_custom_code"]),
            ),
            timeout=10,
        )

    async def connect_users(
        self, count: int, plan: Iterable[list[str]] | None = None, concurrency: int = 8, first_id: int = 810_000_001
    ) -> list[User]:
        """Creates `count` sandbox users; user i starts the bots of plan[i] in order, sharing its
        contact with the first (the others recognise the person on /start)."""
        sandbox = telegramsim_pb2_grpc.SandboxServiceStub(self.channel(SIMULATOR))
        plans = list(plan) if plan is not None else [[SHARED_BOTS[i % len(SHARED_BOTS)]] for i in range(count)]
        base = len(self.users)
        users = [
            User(first_id + base + i, f"+7999{(first_id + base + i) % 10_000_000:07d}", plans[i]) for i in range(count)
        ]
        gate = asyncio.Semaphore(concurrency)

        async def retried(call: Callable[[], Awaitable[object]]) -> None:
            # The dev database answers SQLITE_BUSY under concurrent writes (INTERNAL): try again.
            for attempt in range(6):
                try:
                    await call()
                    return
                except grpc.aio.AioRpcError as err:
                    if err.code() not in {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE} or attempt == 5:
                        raise
                    self.setup_retries += 1
                    await asyncio.sleep(0.2 * (attempt + 1))

        async def one(user: User) -> None:
            async with gate:
                await retried(
                    lambda: sandbox.CreateSandboxUser(
                        telegramsim_pb2.CreateSandboxUserRequest(
                            user=telegramsim_pb2.SandboxUser(user_id=user.user_id, phone=user.phone, language_code="en")
                        ),
                        timeout=30,
                    )
                )
                for position, bot in enumerate(user.bots):
                    await retried(
                        lambda bot=bot: sandbox.StartBot(  # type: ignore[misc]
                            telegramsim_pb2.StartBotRequest(user_id=user.user_id, bot_id=bot), timeout=60
                        )
                    )
                    if position == 0:
                        await retried(
                            lambda bot=bot: sandbox.ShareContact(  # type: ignore[misc]
                                telegramsim_pb2.ShareContactRequest(user_id=user.user_id, bot_id=bot), timeout=60
                            )
                        )

        await asyncio.gather(*(one(u) for u in users))
        # A contact share whose reply was "try again later" (the directory answered too late under
        # the set-up load) leaves the person unlinked: check every one, and share again.
        directory: directory_pb2_grpc.DirectoryServiceAsyncStub = directory_pb2_grpc.DirectoryServiceStub(
            self.channel("directory")
        )
        for _ in range(3):
            missing = [u for u in users if not await self._connected(directory, u)]
            if not missing:
                break
            self.setup_retries += len(missing)
            await asyncio.gather(*(one(u) for u in missing))
        else:
            raise RuntimeError(f"{len(missing)} sandbox users could not be connected")
        self.users.extend(users)
        await self.chat_messages()  # remember where every chat is, so later reads only see new messages
        return users

    @staticmethod
    async def _connected(directory: directory_pb2_grpc.DirectoryServiceAsyncStub, user: User) -> bool:
        found = await directory.ResolvePhone(directory_pb2.ResolvePhoneRequest(phone=user.phone), timeout=30)
        return found.found and set(user.bots) <= set(found.connected_bot_ids)

    async def chat_messages(self, concurrency: int = 32) -> list[tuple[str, float]]:
        """(text, send_time) of every bot message that arrived since the last call."""
        sandbox = telegramsim_pb2_grpc.SandboxServiceStub(self.channel(SIMULATOR))
        gate = asyncio.Semaphore(concurrency)
        found: list[tuple[str, float]] = []

        async def one(user: User, bot: str) -> None:
            key = (user.user_id, bot)
            async with gate:
                reply = await sandbox.ListChatMessages(
                    telegramsim_pb2.ListChatMessagesRequest(
                        user_id=user.user_id, bot_id=bot, after_message_id=self._last_seen.get(key, 0)
                    ),
                    timeout=30,
                )
            for message in reply.messages:
                self._last_seen[key] = max(self._last_seen.get(key, 0), message.message_id)
                if message.from_bot:
                    found.append((message.text, message.send_time.ToMicroseconds() / 1e6))

        await asyncio.gather(*(one(u, b) for u in self.users for b in u.bots))
        return found

    # Observation --------------------------------------------------------------------------

    def db_counts(self) -> dict[str, dict[str, int]]:
        """Database commands each service has sent so far, by 'db.collection:command'."""
        assert self.stack is not None
        counts: dict[str, dict[str, int]] = {}
        for name in (*SERVICES, *self.stack.replicas):
            path = self.counts_dir / f"{name}.json"
            try:
                counts[name] = json.loads(path.read_text())
            except (OSError, ValueError):
                counts[name] = {}
        return counts

    def rpc_counts(self) -> dict[str, int]:
        """gRPC calls each of our services has served so far, by '<service>.<Method>' (health
        checks left out): what one operation costs in calls between services."""
        assert self.stack is not None
        counts: dict[str, int] = {}
        for service in SERVICES:
            if service == SIMULATOR:
                continue
            for labels, value in prometheus_samples(self._metrics_text(service), "grpc_server_started_total"):
                if labels.get("grpc_service", "").startswith("grpc.health"):
                    continue
                key = f"{service}.{labels.get('grpc_method', '')}"
                counts[key] = counts.get(key, 0) + int(value)
        return counts

    def _metrics_text(self, service: str) -> str:
        assert self.stack is not None
        url = f"http://127.0.0.1:{self.stack.metrics_port(service)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def metric(self, service: str, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of a Prometheus sample of one service (over series matching `labels`)."""
        samples = prometheus_samples(self._metrics_text(service), name)
        wanted = dict(labels or {})
        return sum(value for found, value in samples if all(found.get(k) == v for k, v in wanted.items()))


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named `name` in a Prometheus text exposition."""
    return [
        (dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def counts_delta(after: Mapping[str, Mapping[str, int]], before: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Commands sent between two snapshots, summed over services, keyed 'service|db.coll:command'."""
    delta: dict[str, int] = {}
    for service, counts in after.items():
        for key, value in counts.items():
            diff = value - before.get(service, {}).get(key, 0)
            if diff:
                delta[f"{service}|{key}"] = diff
    return delta


def workdir(keep: bool) -> Path:
    base = ROOT / "bench" / "results" / "work" if keep else Path(tempfile.mkdtemp(prefix="otpgate-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=base))

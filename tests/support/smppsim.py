"""The SMSC of the SMPP tests: jSMPP's server (Java, from Maven Central) behind the thin
scripting harness tools/smppsim/SmppSim.java, on loopback.

Built on first use into .cache/smppsim (dependencies with Maven, then javac) and rebuilt when
the harness or its pom change. Commands go to its stdin; its events (one line each) are read
into a queue the tests wait on, always with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.core.devdb import free_port

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tools" / "smppsim"
BUILD = ROOT / ".cache" / "smppsim"
LIB = BUILD / "lib"
CLASSES = BUILD / "classes"


class SmppSimError(RuntimeError):
    pass


def ensure_built() -> Path:
    sources = [SOURCE / "SmppSim.java", SOURCE / "pom.xml"]
    stamp = CLASSES / "SmppSim.class"
    if stamp.exists() and stamp.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return CLASSES
    for tool in ("java", "javac", "mvn"):
        if shutil.which(tool) is None:
            raise SmppSimError(
                f"{tool} is needed to build the SMPP test server (tools/smppsim): install a JDK 17+ and Maven"
            )
    shutil.rmtree(BUILD, ignore_errors=True)
    _run(["mvn", "-q", "-B", "-f", str(SOURCE / "pom.xml"), "dependency:copy-dependencies", f"-DoutputDirectory={LIB}"])
    CLASSES.mkdir(parents=True, exist_ok=True)
    _run(["javac", "-Xlint:none", "-d", str(CLASSES), "-cp", f"{LIB}/*", str(SOURCE / "SmppSim.java")])
    return CLASSES


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        raise SmppSimError(f"{' '.join(argv[:2])} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


@dataclass(frozen=True)
class Submit:
    message_id: str  # "-" when refused
    status: int
    source: str
    source_ton: int
    source_npi: int
    dest: str
    esm_class: int
    data_coding: int
    registered_delivery: int
    validity: str
    short_message: bytes


class SmppSim:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.events: asyncio.Queue[list[str]] = asyncio.Queue()
        self.log: list[list[str]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            words = raw.decode().split()
            if words:
                self.log.append(words)
                await self.events.put(words)

    async def send(self, *words: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((" ".join(str(w) for w in words) + "\n").encode())
        await self.process.stdin.drain()

    async def expect(self, kind: str, timeout: float = 10.0) -> list[str]:
        """The next event of `kind` (earlier events of other kinds stay in `log`)."""
        async with asyncio.timeout(timeout):
            while True:
                words = await self.events.get()
                if words[0] == kind:
                    return words
                if words[0] == "error":
                    raise SmppSimError(" ".join(words))

    def seen(self, kind: str) -> list[list[str]]:
        return [w for w in self.log if w[0] == kind]

    def submits(self) -> list[Submit]:
        return [_submit(w) for w in self.seen("submit")]

    def answered(self) -> set[str]:
        return {w[1] for w in self.seen("answered")}

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("quit")
            await asyncio.wait_for(self.process.wait(), 5)
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()


def _submit(w: list[str]) -> Submit:
    return Submit(
        message_id=w[1],
        status=int(w[2], 16),
        source=w[3],
        source_ton=int(w[4]),
        source_npi=int(w[5]),
        dest=w[6],
        esm_class=int(w[7]),
        data_coding=int(w[8]),
        registered_delivery=int(w[9]),
        validity=w[10],
        short_message=b"" if w[11] == "-" else bytes.fromhex(w[11]),
    )


@contextlib.asynccontextmanager
async def smpp_server(system_id: str = "otpgate", password: str = "secret") -> AsyncIterator[SmppSim]:  # noqa: S107
    classes = ensure_built()
    process = await asyncio.create_subprocess_exec(
        "java",
        "-cp",
        f"{classes}:{LIB}/*",
        "SmppSim",
        str(free_port()),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().split()
    if not line or line[0] != "listening":
        process.kill()
        raise SmppSimError(f"the SMPP test server did not start: {line}")
    sim = SmppSim(process, int(line[1]))
    await sim.send("credentials", system_id, password)
    try:
        yield sim
    finally:
        await sim.stop()

"""The dev database: a real MongoDB-wire server (FerretDB v1 on SQLite) built from tools/devdb.

Used by `otpgate dev` and the tests when MONGODB_URI is not set. The binary is built once
into .cache/bin (ignored by git); later runs reuse it. tools/devdb/patches.json lists small
patches to FerretDB, applied to a copy of the module: writes to one document are atomic as in
MongoDB, duplicate keys on update are reported as such, and queries use the collection's indexes
for their filters and, where an index gives their order, for their sorts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tools" / "devdb"
BINARY = ROOT / ".cache" / "bin" / "devdb"
PATCHES = SOURCE / "patches.json"
PATCHED = ROOT / ".cache" / "devdb-ferretdb"


class DevDatabaseError(RuntimeError):
    pass


def ensure_binary() -> Path:
    sources = [*SOURCE.glob("*.go"), SOURCE / "go.mod", SOURCE / "go.sum", PATCHES]
    newest = max(p.stat().st_mtime for p in sources if p.exists())
    if BINARY.exists() and BINARY.stat().st_mtime >= newest:
        return BINARY
    go = shutil.which("go")
    if go is None:
        raise DevDatabaseError(
            "Go is needed to build the dev database (tools/devdb); install Go 1.24+ or set MONGODB_URI"
        )
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0"}
    modfile = _patched_modfile(go, env)
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [go, "build", f"-modfile={modfile}", "-o", str(BINARY), "."],
        cwd=SOURCE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DevDatabaseError(f"building the dev database failed:\n{result.stderr[-4000:]}")
    return BINARY


def _patched_modfile(go: str, env: dict[str, str]) -> Path:
    """A copy of the FerretDB module with the patches in tools/devdb/patches.json applied, and a
    go.mod (for `go build -modfile`) that replaces the module with that copy."""
    spec = json.loads(PATCHES.read_text())
    found = subprocess.run(  # noqa: S603 - fixed arguments
        [go, "mod", "download", "-json", spec["module"]], cwd=SOURCE, env=env, capture_output=True, text=True
    )
    if found.returncode != 0:
        raise DevDatabaseError(f"fetching {spec['module']} failed:\n{found.stdout[-2000:]}{found.stderr[-2000:]}")
    shutil.rmtree(PATCHED, ignore_errors=True)
    module = PATCHED / "module"
    # The module cache is read-only; the copy must be writable to patch it and to remove it later.
    shutil.copytree(json.loads(found.stdout)["Dir"], module, copy_function=shutil.copyfile)
    for patch in spec["patches"]:
        target = module / patch["file"]
        if "create" in patch:
            if target.exists():
                raise DevDatabaseError(f"dev database patch creates {patch['file']}, which FerretDB now has")
            target.write_text("\n".join(patch["create"]) + "\n")
        else:
            target.write_text(replace_once(target.read_text(), patch["old"], patch["new"], patch["file"]))
    modfile = PATCHED / "go.mod"
    modfile.write_text((SOURCE / "go.mod").read_text() + f"\nreplace {spec['module']} => {module}\n")
    shutil.copyfile(SOURCE / "go.sum", PATCHED / "go.sum")
    return modfile


def replace_once(text: str, old: str, new: str, where: str) -> str:
    if text.count(old) != 1:
        raise DevDatabaseError(f"dev database patch for {where} no longer applies (expected its text once)")
    return text.replace(old, new)


# Ports handed out by free_port in this process: never handed out twice.
_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on that is free now. Chosen below the kernel's ephemeral range: a port the
    kernel hands out for bind(0) is also what it gives the next outgoing connection as its local
    port (database pools open many), so between this call and the server's bind it could be taken;
    ports below that range are only ever taken by someone binding them on purpose."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        # 0 (the kernel's choice) only where the ephemeral range leaves nothing below it.
        port = random.randrange(20000, low) if low > 21000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen = int(sock.getsockname()[1])
        _HANDED_OUT.add(chosen)
        return chosen
    raise DevDatabaseError("no free port to listen on")


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DevDatabaseError(f"dev database exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise DevDatabaseError(f"dev database did not listen on {host}:{port} within {timeout}s")


class DevDatabase:
    """A dev database process: start() returns its MongoDB URI. `flags` are passed on to
    tools/devdb (e.g. `-disable-pushdown`)."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        flags: Sequence[str] = (),
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="otpgate-devdb-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.flags = tuple(flags)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> str:
        binary = ensure_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(  # noqa: S603 - our own binary
            [
                str(binary),
                "-listen",
                f"{self.host}:{self.port}",
                "-data",
                str(self.data_dir),
                "-log-level",
                "error",
                *self.flags,
            ],
            stdout=log,
            stderr=log,
        )
        _wait_for_port(self.host, self.port, self.process, timeout)
        return self.uri

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DevDatabase:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

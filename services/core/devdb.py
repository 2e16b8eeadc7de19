"""The dev database: a real MongoDB-wire server (FerretDB v1 on SQLite) built from tools/devdb.

Used by `otpgate dev` and the tests when MONGODB_URI is not set. The binary is built once
into .cache/bin (ignored by git); later runs reuse it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tools" / "devdb"
BINARY = ROOT / ".cache" / "bin" / "devdb"


class DevDatabaseError(RuntimeError):
    pass


def ensure_binary() -> Path:
    sources = [*SOURCE.glob("*.go"), SOURCE / "go.mod", SOURCE / "go.sum"]
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
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [go, "build", "-o", str(BINARY), "."], cwd=SOURCE, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise DevDatabaseError(f"building the dev database failed:\n{result.stderr[-4000:]}")
    return BINARY


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
    """A dev database process: start() returns its MongoDB URI."""

    def __init__(
        self, data_dir: Path | None = None, port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="otpgate-devdb-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> str:
        binary = ensure_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(  # noqa: S603 - our own binary
            [str(binary), "-listen", f"{self.host}:{self.port}", "-data", str(self.data_dir), "-log-level", "error"],
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

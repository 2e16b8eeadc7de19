"""Run one service as `python -m services.<name>` would, counting its database commands.

    python -m bench.instrument <name> [<process>]

A PyMongo command listener counts every command the service sends, by collection and
command name; a thread writes the counts to $OTPGATE_BENCH_COUNTS_DIR/<process>.json (a
replica's process name, `delivery-2`; the service's name by default) every
quarter second, so the benchmark can take the difference over a measured run. With
OTPGATE_BENCH_PROFILE=<file.html> the whole process runs under pyinstrument (async mode)
and the report is written when the service stops (SIGTERM).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo import monitoring


class CommandCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.micros: Counter[str] = Counter()  # time the server took, summed per key
        self._pending: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name in {"hello", "ismaster", "isMaster", "ping", "endSessions", "buildInfo", "saslStart"}:
            return
        target = event.command.get(name)
        collection = target if isinstance(target, str) else ""
        key = f"{event.database_name}.{collection}:{name}:{shape(name, event.command)}"
        # Inserts count documents: concurrent requests share insert commands (group commit), so
        # documents, not commands, are what one message costs.
        weight = len(event.command.get("documents") or [None]) if name == "insert" else 1
        with self._lock:
            self.counts[key] += weight
            self._pending[(event.request_id, event.operation_id or 0)] = key

    def _done(self, event: monitoring.CommandSucceededEvent | monitoring.CommandFailedEvent) -> None:
        with self._lock:
            key = self._pending.pop((event.request_id, event.operation_id or 0), None)
            if key is not None:
                self.micros[key] += event.duration_micros

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._done(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._done(event)

    def snapshot(self) -> dict[str, int]:
        """Counts by key, and summed durations (microseconds) under "<key>#us"."""
        with self._lock:
            return {**self.counts, **{f"{k}#us": v for k, v in self.micros.items()}}


def shape(name: str, command: Any) -> str:
    """How a command finds its documents: "id" (by _id only: a key lookup on every server), "scan"
    (by other fields: an index lookup on MongoDB, a collection scan on the dev database) or "-"."""
    selector: Any = None
    if name in {"find", "count"}:
        selector = command.get("filter", command.get("query"))
    elif name == "findAndModify":
        selector = command.get("query")
    elif name in {"update", "delete"}:
        items = command.get("updates" if name == "update" else "deletes") or [{}]
        selector = items[0].get("q")
    elif name == "aggregate":
        stages = command.get("pipeline") or [{}]
        selector = stages[0].get("$match", {}) if stages else {}
    else:
        return "-"
    if not selector:
        return "scan"
    keys = set(selector)
    if keys == {"_id"}:
        value = selector["_id"]
        return "scan" if isinstance(value, dict) and "$in" not in value else "id"
    return "idplus" if "_id" in keys else "scan"


def _writer(counter: CommandCounter, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    while True:
        tmp.write_text(json.dumps(counter.snapshot()))
        tmp.replace(path)
        time.sleep(0.25)


def _dump_tasks(*_: object) -> None:
    """SIGUSR1: print every asyncio task's stack to stderr (the service log), to see what waits."""
    import asyncio
    import faulthandler

    faulthandler.dump_traceback(all_threads=True)
    try:
        loop = asyncio.get_event_loop()
        for task in asyncio.all_tasks(loop):
            try:
                task.print_stack(limit=12, file=sys.stderr)
            except Exception as exc:  # a frame mid-update: skip it
                print(f"task {task.get_name()}: {exc!r}", file=sys.stderr)
    except Exception as exc:
        print(f"dump failed: {exc!r}", file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str]) -> None:
    import signal

    signal.signal(signal.SIGUSR1, _dump_tasks)
    name = argv[0]
    process = argv[1] if len(argv) > 1 else name  # a replica's counts go to a file of its own
    counter = CommandCounter()
    monitoring.register(counter)
    counts_dir = os.environ.get("OTPGATE_BENCH_COUNTS_DIR", "")
    if counts_dir:
        path = Path(counts_dir) / f"{process}.json"
        threading.Thread(target=_writer, args=(counter, path), daemon=True, name="bench-counts").start()
    profile_to = os.environ.get("OTPGATE_BENCH_PROFILE", "")
    if not profile_to:
        runpy.run_module(f"services.{name}", run_name="__main__", alter_sys=True)
        return
    from pyinstrument import Profiler
    from pyinstrument.stack_sampler import get_stack_sampler

    # Samples weigh the main thread's CPU time, not wall time: on a shared machine a process waiting
    # for a core (or blocked in a system call) would otherwise show that wait as work in the frame.
    get_stack_sampler().timer_func = time.thread_time
    profiler: Any = Profiler(async_mode="disabled", interval=0.001)
    profiler.start()
    try:
        runpy.run_module(f"services.{name}", run_name="__main__", alter_sys=True)
    finally:
        profiler.stop()
        Path(profile_to).with_suffix(".txt").write_text(profiler.output_text(unicode=False, show_all=False))
        Path(profile_to).write_text(profiler.output_html())
        # The whole session, to render again another way: pyinstrument --load <file> -r text --show-all
        profiler.last_session.save(str(Path(profile_to).with_suffix(".pyisession")))


if __name__ == "__main__":
    main(sys.argv[1:])

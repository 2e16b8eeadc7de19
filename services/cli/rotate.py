"""`otpgate keys rotate`: re-seal every service's sealed fields with the primary key and recompute
blind indexes with the index key, in batches, resumable, with a progress bar and a final count.

Registered under `otpgate keys` by services/cli/keys.py. Reads the same environment as the
services (MONGODB_URI, OTPGATE_KEYS, OTPGATE_PRIMARY_KEY_ID, OTPGATE_INDEX_KEY_ID,
OTPGATE_<SERVICE>_DATABASE). See docs/security.md, "Key rotation".
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.core.config import DEFAULT_PORTS, SIMULATOR, ConfigError, Env, load_common, read_mode
from services.core.logging import configure_logging
from services.core.mongo import connect
from services.core.rotation_runner import (
    DEFAULT_BATCH_SIZE,
    CollectionRotation,
    RotationCounts,
    RotationResult,
    load_declarations,
    plan_collections,
)

# Exit codes beyond 0 (all done) and 1 (error).
EXIT_UNREADABLE = 3  # some values could not be opened: old keys must stay until an operator looks
EXIT_STOPPED = 4  # stopped by --max-batches: run again to resume
EXIT_STALE = 5  # finished, but values on other keys appeared meanwhile (a replica on old settings?): run again


def register(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rotate = actions.add_parser(
        "rotate",
        help="re-encrypt sealed fields to the primary key and recompute blind indexes (resumable)",
        description=(
            "Re-seal every value not under the primary key (OTPGATE_PRIMARY_KEY_ID) and recompute every blind "
            "index not under the index key (OTPGATE_INDEX_KEY_ID), for all services' declared sealed fields. "
            "Old key ids keep decrypting until this reports nothing left; only then remove them from OTPGATE_KEYS. "
            "An interrupted run resumes where it stopped."
        ),
    )
    rotate.add_argument(
        "--service",
        action="append",
        choices=sorted([*DEFAULT_PORTS, SIMULATOR]),
        help=(
            "only this service (repeatable; default: every service that declares sealed fields, and in sandbox "
            "mode the simulated Telegram)"
        ),
    )
    rotate.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"documents per batch (default {DEFAULT_BATCH_SIZE})"
    )
    rotate.add_argument(
        "--max-batches", type=int, default=None, help="stop after this many batches per collection (resume later)"
    )
    rotate.add_argument("--restart", action="store_true", help="ignore saved progress and scan from the start")
    rotate.add_argument("--dry-run", action="store_true", help="count what would change, write nothing")
    rotate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError("--max-batches must be positive")
    env = Env(service="cli")
    _, sandbox = read_mode(env)
    services = args.service or [*DEFAULT_PORTS, *([SIMULATOR] if sandbox else [])]
    commons = {name: load_common(name, env) for name in services}
    env.check()
    first = next(iter(commons.values()))
    if first.keyring is None:
        raise ConfigError("OTPGATE_KEYS is required")
    json_out = bool(getattr(args, "json", False))
    # Problems (unreadable values, clashes) go to stderr as JSON lines; stdout keeps the report.
    configure_logging("cli", "warning", stream=sys.stderr)
    console = Console(stderr=True)
    results = asyncio.run(_rotate(args, commons, console, quiet=json_out))
    total = RotationCounts()
    for result in results:
        total.add(result.run)
    if json_out:
        print(json.dumps({"results": [_result_json(r) for r in results], "run": asdict(total)}))
    else:
        # Piped or logged output gets a table wide enough not to fold its columns.
        report_console = Console() if sys.stdout.isatty() else Console(width=140)
        _print_report(report_console, results, total, dry_run=args.dry_run, keyring_primary=first.keyring.primary_id)
    if any(r.total.failed for r in results):
        return EXIT_UNREADABLE
    if not all(r.finished for r in results):
        return EXIT_STOPPED
    if not args.dry_run and any(r.remaining for r in results):
        return EXIT_STALE
    return 0


async def _rotate(
    args: argparse.Namespace, commons: dict[str, Any], console: Console, quiet: bool
) -> list[RotationResult]:
    first = next(iter(commons.values()))
    client = connect(first.mongodb_uri, "cli")
    results: list[RotationResult] = []
    try:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        with progress:
            for declarations in load_declarations(commons):
                common = commons[declarations.service]
                database = client[common.database]
                for collection, (fields, indexes) in plan_collections(declarations).items():
                    rotation = CollectionRotation(
                        database,
                        collection,
                        common.keyring,
                        sealed_fields=fields,
                        blind_indexes=indexes,
                        service=declarations.service,
                        batch_size=args.batch_size,
                    )
                    done = 0 if (args.restart or args.dry_run) else await rotation.resumable_scanned()
                    task = progress.add_task(
                        f"{declarations.service}.{collection}", total=await rotation.count(), completed=done
                    )
                    result = await rotation.run(
                        restart=args.restart,
                        max_batches=args.max_batches,
                        dry_run=args.dry_run,
                        on_batch=functools.partial(_advance, progress, task),
                    )
                    progress.update(task, completed=result.total.scanned if result.finished else None)
                    results.append(result)
    finally:
        await client.close()
    return results


def _advance(progress: Progress, task: TaskID, count: int) -> None:
    progress.advance(task, count)


def _result_json(result: RotationResult) -> dict[str, Any]:
    return {
        "service": result.service,
        "collection": result.collection,
        "finished": result.finished,
        "resumed": result.resumed,
        "run": asdict(result.run),
        "total": asdict(result.total),
        "remaining": result.remaining,
    }


def _print_report(
    console: Console, results: list[RotationResult], total: RotationCounts, *, dry_run: bool, keyring_primary: str
) -> None:
    table = Table(title="key rotation" + (" (dry run: nothing written)" if dry_run else ""))
    for column in ("collection", "state", "scanned", "resealed", "reindexed", "clashes", "concurrent", "failed"):
        table.add_column(column, justify="left" if column in ("collection", "state") else "right")
    for r in results:
        state = "done" if r.finished else "stopped (resume)"
        if r.resumed:
            state += ", resumed"
        counts = r.total
        table.add_row(
            f"{r.service}.{r.collection}",
            state,
            *(
                str(v)
                for v in (
                    counts.scanned,
                    counts.resealed,
                    counts.reindexed,
                    counts.clashes,
                    counts.concurrent,
                    counts.failed,
                )
            ),
        )
    console.print(table)
    verb = "would re-seal" if dry_run else "re-sealed"
    console.print(
        f"This run {verb} {total.resealed} values and {'would recompute' if dry_run else 'recomputed'} "
        f"{total.reindexed} blind indexes in {total.scanned} documents across {len(results)} collections; "
        f"{total.failed} could not be opened."
    )
    stale = {f"{r.service}.{r.collection}.{f}": ids for r in results for f, ids in r.remaining.items() if ids}
    if all(r.finished for r in results) and not stale and not dry_run:
        console.print(f"Everything is on the current keys (primary {keyring_primary}); older key ids can be retired.")
    elif stale:
        console.print(f"Still on other keys: {json.dumps(stale)}", style="yellow")
    elif not all(r.finished for r in results):
        console.print("Stopped before the end: run the same command again to resume.", style="yellow")
    sys.stdout.flush()

"""``engine.run backfill`` and ``engine.run report``: the CLI of the backfill job.

Kept apart from ``engine/run.py``, which only calls ``add_commands``; the run itself goes
through the same helpers as ``validate`` (``run_job``, ``follow_run``, exit codes).

    python -m engine.run backfill --ids ids.txt --url-template 'https://api/x/{id}' \\
        --rate-limit 3000/5m [--workers 4 --concurrency 50 --batch-size 50] \\
        [--header 'Authorization=env:API_TOKEN'] [--json]
    python -m engine.run backfill --resume RUN_ID
    python -m engine.run report RUN_ID [--json]

Exit codes as everywhere: 0 the run completed — every ID has a stored outcome, *including*
IDs that failed for good (404, 500 after retries), which are counted as failed and listed by
``report``; 1 the run ended otherwise; 2 bad input; 130 aborted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.jobs.backfill.params import BackfillParams
from engine.jobs.params import add_param_flags, params_from_args
from storage.errors import DatabaseLockedError


def add_commands(sub: Any) -> None:
    b = sub.add_parser(
        "backfill",
        help="fetch a long ID list through a rate-limited JSON API",
        description="Fetch every ID of a list from a JSON API under a hard rate limit shared "
        "by all workers (never more than N requests in any window of the stated period), "
        "storing each response once per run and ID; resumable after any crash.",
        epilog="Exit code 0 when the run completed (IDs that failed for good are counted as "
        "failed; `report RUN_ID` lists them), 1 otherwise, 2 for bad input.",
    )
    b.add_argument("--db", help="database URL or DuckDB path")
    b.add_argument(
        "--json", action="store_true", help="print one JSON summary at the end and nothing else"
    )
    add_param_flags(b, BackfillParams)
    b.add_argument("--workers", type=int, help="local worker processes (default 2)")
    b.add_argument("--concurrency", type=int, help="IDs in flight per worker (200)")
    b.add_argument("--max-attempts", type=int, help="tries per task after worker crashes (3)")
    b.add_argument(
        "--resume",
        type=int,
        metavar="RUN_ID",
        help="finish an earlier backfill (stopped, failed, or left running by a killed CLI)",
    )
    b.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: fetch again the IDs stored as failed (after a wrong token, an "
        "outage), also for a completed run",
    )
    b.set_defaults(func=cmd_backfill)

    r = sub.add_parser(
        "report",
        help="a backfill run's evaluation: throughput, limit use, errors, workers",
        description="Throughput, utilisation of the rate limit (and the busiest window), "
        "failures by kind with example IDs, and each worker's share of a backfill run.",
    )
    r.add_argument("--db", help="database URL or DuckDB path")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("run_id", type=int)
    r.set_defaults(func=cmd_report)


def backfill_params(args: argparse.Namespace) -> dict[str, Any]:
    from engine.cli.common import UserError

    missing = [
        flag
        for flag, value in (
            ("--ids FILE", args.ids),
            ("--url-template URL", args.url_template),
            ("--rate-limit N/PERIOD", args.rate_limit),
        )
        if not value
    ]
    if missing:
        raise UserError(
            f"backfill needs {', '.join(missing)} (or --resume RUN_ID); "
            "see `python -m engine.run backfill --help`"
        )
    params = params_from_args(BackfillParams, args)
    BackfillParams.build(params)  # a bad value: exit 2 naming its flag (ParamError)
    return params


def cmd_backfill(args: argparse.Namespace) -> int:
    from engine.cli.common import UserError, run_job, settings_from
    from engine.jobs import get_kind

    if args.resume is not None:
        given = [
            flag
            for flag, value in (
                ("--ids", args.ids),
                ("--url-template", args.url_template),
                ("--rate-limit", args.rate_limit),
                ("--header", args.header),
            )
            if value
        ]
        if given:
            raise UserError(
                f"--resume continues run {args.resume} with the parameters it was started "
                f"with; drop {', '.join(given)} (or start a new backfill without --resume)"
            )
        return resume_backfill(args)
    if args.retry_failed:
        raise UserError("--retry-failed goes with --resume RUN_ID")
    params = backfill_params(args)
    # Check the ID file before a coordinator and its pool start (fast exit 2).
    get_kind("backfill", settings_from(args)).prepare(dict(params))
    return run_job(args, "backfill", params)


def resume_backfill(args: argparse.Namespace) -> int:
    """``resume`` that also takes over a run left ``running`` by a CLI killed with -9."""
    from engine.cli.common import (
        EXIT_NOT_COMPLETED,
        EXIT_OK,
        UserError,
        emit,
        follow_run,
        format_summary,
        open_db,
        settings_from,
    )
    from engine.cli.runs import cmd_resume
    from engine.runtime.coordinator import Coordinator
    from engine.summary import run_summary
    from storage import runs

    run_id = args.resume
    try:
        db = open_db(args)
    except DatabaseLockedError:
        # Another process holds the DuckDB file: ask its coordinator, as `resume` does.
        args.run_id = run_id
        return cmd_resume(args)
    try:
        with db.connect() as conn:
            run = runs.get_run(conn, run_id)
        if run is None:
            raise UserError(f"no run with id {run_id}: `python -m engine.run status` lists runs")
        retried = 0
        if args.retry_failed:
            if run.kind != "backfill":
                raise UserError(
                    f"run {run_id} is a {run.kind} run; --retry-failed is for backfills"
                )
            if run.status in ("running", "stopping") and not db.is_duckdb:
                raise UserError(
                    f"run {run_id} is {run.status}; stop it first (`python -m engine.run stop "
                    f"{run_id}`), then --resume --retry-failed"
                )
            retried = retry_failed(db, run_id, run.params)
            if retried and run.status == "completed":
                run.status = "running"  # retry_failed reopened it
            if not args.json:
                print(f"run {run_id}: {retried:,} failed ID(s) queued again", file=sys.stderr)
        if run.status == "completed":
            summary = run_summary(db, run_id)
            emit(args, summary, format_summary(summary))
            return EXIT_OK
        if run.status == "cancelled":
            raise UserError(f"run {run_id} was cancelled; start a new backfill")
        if run.status == "queued":
            raise UserError(
                f"run {run_id} never finished planning (its CLI stopped while reading the "
                "ID list); start the backfill again"
            )
        if run.status in ("running", "stopping") and db.is_duckdb:
            # We hold the file, so the coordinator that ran it is gone: its leases are void.
            requeued = take_over(db, run_id)
            if not args.json:
                print(
                    f"run {run_id} was left {run.status} by a process that is gone; "
                    f"{requeued} task(s) back in the queue",
                    file=sys.stderr,
                )
    except BaseException:
        db.dispose()
        raise
    settings = settings_from(args)
    coordinator = Coordinator(db, settings, log_level=args.log_level).start()
    try:
        if run.status != "running":
            try:
                coordinator.command(run_id, "resume", source="cli backfill --resume")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if not args.json:
            print(
                f"run {run_id} resumed ({settings.workers} workers × {settings.concurrency} "
                f"concurrent, database {db.display_url})",
                file=sys.stderr,
            )
        summary = follow_run(db, coordinator, run_id, args)
    finally:
        coordinator.shutdown()
        db.dispose()
    emit(args, summary, format_summary(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def retry_failed(db: Any, run_id: int, params: dict[str, Any], page: int = 10_000) -> int:
    """Queue the IDs a run stored as failed as new tasks and forget those results (one
    transaction); a completed run is reopened. Returns how many IDs were queued."""
    from engine.settings import Settings
    from storage import backfill as store
    from storage import queue as q
    from storage import runs

    batch = int(params.get("batch_size") or 50)
    max_attempts = Settings().max_attempts
    queued = 0
    with db.begin() as conn:
        seq = q.last_seq(conn, run_id) or 0
        after = None
        n_tasks = 0
        while ids := store.failed_ids_after(conn, run_id, after, page):
            after = ids[-1]
            chunk = [ids[k : k + batch] for k in range(0, len(ids), batch)]
            q.add_tasks(conn, run_id, chunk, seq + 1, max_attempts)
            seq += len(chunk)
            n_tasks += len(chunk)
            queued += len(ids)
        if not queued:
            return 0
        store.forget_failed(conn, run_id)
        runs.add_planned(conn, run_id, 0, n_tasks)  # the IDs were counted when planned
        runs.reopen(conn, run_id)
    return queued


def take_over(db: Any, run_id: int) -> int:
    """Return the tasks a dead coordinator's workers held to the queue (the claim does not
    count as an attempt) and mark those workers dead. Only with the DuckDB file held."""
    from storage import queue as q

    with db.begin() as conn:
        held = q.leased_tasks(conn, run_id)
        for task_id, worker_id in held:
            q.release(conn, worker_id, [task_id])
        for worker_id in {w for _, w in held if w}:
            q.end_worker(conn, worker_id, "dead", "its coordinator is gone (taken over)")
    return len(held)


def cmd_report(args: argparse.Namespace) -> int:
    from engine.cli.common import EXIT_OK, UserError, emit
    from engine.jobs.backfill.kind import format_report, run_report
    from storage.db import open_database, resolve_db_url

    try:
        db = open_database(resolve_db_url(args.db), create=False, wait_s=0)
    except DatabaseLockedError as exc:
        raise UserError(
            f"{exc}; `report` reads the database directly: run it when that process is "
            "done, or follow a running run with `python -m engine.run status RUN_ID`"
        ) from None
    try:
        report = run_report(db, args.run_id)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        db.dispose()
    emit(args, report, format_report(report))
    return EXIT_OK

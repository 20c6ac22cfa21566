"""What every CLI command shares: exit codes, the user-error type, the database, the
summary, following a run with a progress bar, and ``run_job`` (submit, follow, print)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from engine.settings import Settings

if TYPE_CHECKING:
    from storage.db import Database

log = logging.getLogger("fetchfleet")

EXIT_OK, EXIT_NOT_COMPLETED, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 130


class JobCaptured(Exception):
    """Raised by ``run_job`` in capture mode (``args.capture_job``): the job a command line
    describes, checked by its kind like a run, for ``schedule add`` to keep."""

    def __init__(self, kind: str, params: dict[str, Any], settings: dict[str, Any]) -> None:
        super().__init__(kind)
        self.kind, self.params, self.settings = kind, params, settings


class UserError(Exception):
    """Bad input: the message says what to change. Exit code 2, no traceback."""


class _Teardown:
    """Set once a job's pool is stopped and its database closed: `python -m engine.run` may
    then skip the interpreter's teardown (engine.runtime.process.exit_now)."""

    skippable = False


TEARDOWN = _Teardown()


# storage.db (SQLAlchemy, DuckDB) is imported on first use: spawned pool workers re-import
# this module as their __main__, and they never open the database.
def resolve_db_url(cli_url: str | None = None) -> str:
    from storage.db import resolve_db_url as resolve

    return resolve(cli_url)


def open_database(url: str, **kwargs: Any) -> Database:
    """``storage.db.open_database`` with the registered kinds' schema components (a plugin
    kind's tables are migrated by every command that opens the database)."""
    from engine.jobs import components
    from storage.db import open_database as open_db_at

    kwargs.setdefault("components", components())
    return open_db_at(url, **kwargs)


def parse_duration(text: str) -> float:
    """'30m', '1h', '90s', '2d' or bare minutes → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise UserError(f"--every {text!r}: write a duration like 30m, 1h or 90s")
    value = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 60}[m[2]]
    if value <= 0:
        raise UserError(f"--every {text!r}: must be more than zero")
    return value


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a command line gave (the pool's and the run's task shape)."""
    overrides = {
        key: getattr(args, key)
        for key in ("workers", "concurrency", "batch_size", "max_attempts")
        if getattr(args, key, None) is not None
    }
    if getattr(args, "timeout", None) is not None:
        overrides["check_timeout_s"] = args.timeout
    return overrides


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        return Settings(**given_settings(args))
    except Exception as exc:  # pydantic's message names the field and the bound
        raise UserError(f"invalid option: {exc}") from None


def open_db(args: argparse.Namespace) -> Database:
    url = resolve_db_url(getattr(args, "db", None))
    return open_database(url)


def emit(args: argparse.Namespace, obj: Any, human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, default=str))
    else:
        print(human)


def format_summary(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = [
        f"run {s['run_id']} ({s['kind']}): {s['status']}",
        f"  items: {c['done']:,} of {c['total']:,} done, {c['ok']:,} ok, {c['failed']:,} failed",
        f"  time:  {s['duration_s']:.1f}s, {s['items_per_s']:.1f} items/s",
    ]
    if c["outcomes"]:
        lines.append("  outcomes: " + ", ".join(f"{k} {v:,}" for k, v in c["outcomes"].items()))
    if s.get("tasks"):
        lines.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(s["tasks"].items())))
    if s.get("auto_stop"):
        lines.append(f"  stopped by rule {s['auto_stop']['rule']}: {s['error']}")
    elif s.get("error"):
        lines.append(f"  error: {s['error']}")
    from engine.costs import cost_lines
    from engine.summary import summary_lines

    lines.extend(summary_lines(s))  # the kind's own (the scrape job's entities, methods)
    lines.extend(cost_lines(s.get("cost")))
    return "\n".join(lines)


def follow_run(db: Database, coordinator: Any, run_id: int, args: argparse.Namespace) -> dict:
    """Wait for a run with a progress bar; Ctrl-C stops it gracefully, a second one aborts."""
    from engine.api import wait_run
    from engine.cli.progress import RunProgress

    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            print(
                f"\nstopping run {run_id}: in-flight items finish, the rest stay queued "
                f"(resume with `python -m engine.run resume {run_id}`); Ctrl-C again aborts",
                file=sys.stderr,
            )
            with contextlib.suppress(ValueError):
                coordinator.command(run_id, "stop", source="cli ctrl-c")
        else:
            coordinator.abort()
            print("aborted", file=sys.stderr)
            raise SystemExit(EXIT_ABORTED)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with RunProgress(enabled=None if not args.json else False) as progress:
            wait = getattr(coordinator, "wait_settled", time.sleep)
            notes = RunNotes(db, run_id, progress.note)

            def sleep(seconds: float) -> None:
                wait(seconds)
                notes.poll()

            settings = getattr(coordinator, "settings", None)
            summary = wait_run(
                db,
                run_id,
                on_progress=progress,
                sleep=sleep,
                on_warning=lambda msg: progress.note(run_warning(run_id, msg)),
                fresh_s=settings.lease_s if settings is not None else 30.0,
            )
            notes.poll(force=True)
            return summary
    finally:
        signal.signal(signal.SIGINT, previous)


def run_warning(run_id: int, msg: str | None) -> str:
    """What the CLI prints (stderr) when ``wait_run``'s country warning changes."""
    if msg is None:
        return f"run {run_id}: every queued country has a live worker now"
    return f"warning: run {run_id}: {msg}"


class RunNotes:
    """Prints a run's engine notes as they arrive (``storage.runs.add_note``: a worker that
    leaves the run's tasks alone because it runs another code version says so there), each
    once, looking at most every ``every_s``; to stderr, so ``--json`` stays one object."""

    def __init__(self, db: Database, run_id: int, out: Any, every_s: float = 2.0) -> None:
        self.db, self.run_id, self.out, self.every_s = db, run_id, out, every_s
        self._last_id = 0
        self._next = 0.0

    def poll(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        from storage.runs import notes_after

        try:
            with self.db.connect() as conn:
                new = notes_after(conn, self.run_id, self._last_id)
        except Exception as exc:  # notes are a courtesy: the wait goes on without them
            log.debug("run %s: notes not read: %s", self.run_id, exc)
            return
        for note_id, line in new:
            self._last_id = note_id
            self.out(line)


def print_bad_input(db: Database, run_id: int) -> None:
    """Malformed input lines recorded while planning, so the user can fix them."""
    from storage.error_log import bad_input

    with db.connect() as conn:
        rows, total = bad_input(conn, run_id, limit=5)
    if total:
        print(f"{total:,} malformed line(s) skipped, the rest loaded:", file=sys.stderr)
        for key, msg in rows[:5]:
            print(f"  {key}: {msg}", file=sys.stderr)
        if total > 5:
            print(
                f"  … see `python -m engine.run export --table errors --run {run_id} "
                "--format csv --out errors.csv`",
                file=sys.stderr,
            )


def run_job(args: argparse.Namespace, kind: str, params: dict[str, Any]) -> int:
    """Submit a run, follow it to its end and print its summary, with the kind's own
    section (``RunKind.summary_extra``: the scrape job's entities and method mix)."""
    from engine.api import submit_run
    from engine.runtime.coordinator import Coordinator
    from engine.summary import add_summary_extra

    settings = settings_from(args)
    if getattr(args, "capture_job", False):  # `schedule add … -- JOB`: keep it, run nothing
        raise JobCaptured(kind, params, given_settings(args))
    db = open_db(args)
    if db.is_duckdb and settings.workers == 0:
        db.dispose()
        raise UserError(
            "--workers 0 needs PostgreSQL (standalone workers do the work); "
            "with DuckDB only this process's pool can"
        )
    coordinator = Coordinator(db, settings, log_level=args.log_level).start()
    try:
        try:
            run_id = submit_run(db, settings, kind, params, coordinator.name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not args.json:
            print(
                f"run {run_id} started ({settings.workers} workers × "
                f"{settings.concurrency} concurrent, database {db.display_url})",
                file=sys.stderr,
            )
        print_bad_input(db, run_id)
        summary = add_summary_extra(db, follow_run(db, coordinator, run_id, args), settings)
        if settings.alerts:  # the run's alert, when no console or scheduler is running
            from engine.alerts.deliver import deliver_now

            deliver_now(db, settings, [run_id])
    finally:
        coordinator.shutdown()
        db.dispose()
    TEARDOWN.skippable = True  # the pool is gone and the database closed
    emit(args, summary, format_summary(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def common_opts(sp: argparse.ArgumentParser, json_help: str = "print one JSON object") -> None:
    """--db and --json, on every command."""
    sp.add_argument("--db", help="database URL or DuckDB path")
    sp.add_argument("--json", action="store_true", help=json_help)


def pool_opts(sp: argparse.ArgumentParser, task_shape: bool = True) -> None:
    """The local pool's size and the run's task shape, on every command that runs a job
    (``task_shape=False``: a kind whose Params model adds --batch-size and --timeout)."""
    sp.add_argument("--workers", type=int, help="local worker processes (default 2)")
    sp.add_argument("--concurrency", type=int, help="items in flight per worker (200)")
    sp.add_argument("--max-attempts", type=int, help="tries per task (3)")
    if task_shape:
        sp.add_argument("--batch-size", type=int, help="items per task (50)")
        sp.add_argument("--timeout", type=float, help="seconds per check attempt (5)")

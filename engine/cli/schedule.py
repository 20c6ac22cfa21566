"""``schedule`` and ``scheduler``: jobs that start themselves, given as the command line one
would run by hand (``schedule add NAME --cron '0 3 * * *' -- validate --revalidate …``)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from typing import Any

from engine.cli.common import (
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    TEARDOWN,
    JobCaptured,
    UserError,
    emit,
    format_summary,
    open_db,
    parse_duration,
    settings_from,
)

NOT_SCHEDULABLE = {
    "--resume": "a schedule starts new runs; resume one by hand (`resume RUN_ID`)",
    "--every": "the schedule is the repetition: drop --every/--rounds",
    "--rounds": "the schedule is the repetition: drop --every/--rounds",
}
PATH_METAVARS = ("FILE", "DIR")


def capture_job(argv: list[str]) -> Any:
    """The job a command line describes, checked by its kind exactly as if it were run
    (a bad flag or value exits 2 with the same message), without running it. Relative file
    paths become absolute: the scheduler may run from another directory."""
    from engine.cli.main import build_parser
    from engine.jobs import get_kind, kinds
    from engine.jobs.base import JobKind
    from engine.jobs.params import meta
    from engine.schedules.service import Job

    if not argv:
        raise UserError("give the job after --, e.g. -- validate --revalidate --judge URL")
    if argv[0] not in kinds():
        raise UserError(f"{argv[0]!r} is not a job: schedule one of {', '.join(sorted(kinds()))}")
    for flag, why in NOT_SCHEDULABLE.items():
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UserError(f"{flag}: {why}")
    args = build_parser().parse_args(argv)
    kind = get_kind(argv[0], settings_from(args))
    if not isinstance(kind, JobKind):
        raise UserError(
            f"{argv[0]} runs in the process that starts it, not in the task queue: "
            "it cannot be scheduled (run it from cron or a systemd timer)"
        )
    args.capture_job = True
    try:
        args.func(args)
    except JobCaptured as job:
        params = dict(job.params)
        model = kind.params_model
        for name, info in model.model_fields.items():
            value = params.get(name)
            if isinstance(value, str) and meta(info).get("metavar") in PATH_METAVARS:
                params[name] = os.path.abspath(value)
        return Job(job.kind, params, job.settings, shlex.join(argv))
    raise UserError(f"{argv[0]}: this command line does not start a run")


def _timing(args: argparse.Namespace) -> Any:
    from engine.schedules.timing import Timing

    if bool(args.cron) == bool(args.every):
        raise UserError("give --cron EXPR or --every DURATION (one of them)")
    every = parse_duration(args.every) if args.every else None
    return Timing(args.cron, every, args.tz)


def _with_db(args: argparse.Namespace, fn: Any) -> Any:
    from engine.schedules.service import ScheduleError

    db = open_db(args)
    try:
        return fn(db)
    except ScheduleError as exc:
        raise UserError(str(exc)) from None
    finally:
        db.dispose()


def _row_dict(row: Any) -> dict[str, Any]:
    from engine.schedules.scheduler import timing_of

    return {
        "name": row.name,
        "kind": row.kind,
        "command": row.command,
        "when": timing_of(row).describe(),
        "overlap": row.overlap,
        "missed": row.missed,
        "enabled": row.enabled,
        "next_due_at": row.next_due_at.isoformat() + "Z" if row.next_due_at else None,
    }


def cmd_add(args: argparse.Namespace) -> int:
    from engine.schedules.service import add_schedule

    argv = list(args.job)
    timing = _timing(args)
    job = capture_job(argv)
    row = _with_db(
        args, lambda db: add_schedule(db, args.name, job, timing, args.overlap, args.missed)
    )
    d = _row_dict(row)
    emit(args, d, f"schedule {row.name}: {d['when']}, next at {d['next_due_at']}\n  {row.command}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from engine.schedules.service import list_schedules, recent_fires

    def read(db: Any) -> list[dict[str, Any]]:
        out = []
        for row in list_schedules(db):
            d = _row_dict(row)
            d["last_fires"] = [
                {
                    "due_at": f.due_at.isoformat() + "Z",
                    "outcome": f.outcome,
                    "run_id": f.run_id,
                    "run_status": f.run_status,
                    "note": f.note,
                }
                for f in recent_fires(db, row.name, limit=3)
            ]
            out.append(d)
        return out

    rows = _with_db(args, read)
    lines = []
    for d in rows:
        state = "" if d["enabled"] else "  (disabled)"
        lines.append(f"{d['name']:<20} {d['when']:<28} next {d['next_due_at'] or '-'}{state}")
        lines.append(f"  {d['command']}")
        for f in d["last_fires"]:
            run = f" run {f['run_id']} {f['run_status']}" if f["run_id"] else ""
            lines.append(
                f"  {f['due_at']} {f['outcome']}{run}" + (f": {f['note']}" if f["note"] else "")
            )
    emit(args, rows, "\n".join(lines) or "no schedules: add one with `schedule add`")
    return EXIT_OK


def cmd_enable(args: argparse.Namespace, enabled: bool = True) -> int:
    from engine.schedules.service import set_enabled

    row = _with_db(args, lambda db: set_enabled(db, args.name, enabled))
    d = _row_dict(row)
    emit(
        args,
        d,
        f"schedule {row.name} "
        + (f"enabled, next at {d['next_due_at']}" if enabled else "disabled"),
    )
    return EXIT_OK


def cmd_disable(args: argparse.Namespace) -> int:
    return cmd_enable(args, enabled=False)


def cmd_remove(args: argparse.Namespace) -> int:
    from engine.schedules.service import remove_schedule

    _with_db(args, lambda db: remove_schedule(db, args.name))
    emit(args, {"removed": args.name}, f"removed schedule {args.name} (its runs stay)")
    return EXIT_OK


def cmd_run_now(args: argparse.Namespace) -> int:
    """Fire now with this process's pool doing the work, followed like a run by hand
    (``--no-wait`` on PostgreSQL: create the run for the fleet and return)."""
    from engine.cli.common import follow_run
    from engine.runtime.coordinator import Coordinator
    from engine.schedules.scheduler import Scheduler
    from engine.schedules.service import get_schedule
    from engine.summary import add_summary_extra

    settings = settings_from(args)
    db = open_db(args)
    if args.no_wait and db.is_duckdb:
        db.dispose()
        raise UserError("--no-wait needs PostgreSQL (workers elsewhere do the run)")
    coordinator = (
        None if args.no_wait else Coordinator(db, settings, log_level=args.log_level).start()
    )
    try:
        _with_existing(db, lambda: get_schedule(db, args.name))
        name = coordinator.name if coordinator else "schedule run-now"
        fired = Scheduler(db, settings, name).fire(args.name, now_anyway=True)
        if fired is None or fired.run_id is None:
            why = fired.note if fired else "another scheduler is firing right now: try again"
            raise UserError(f"schedule {args.name}: no run started: {why}")
        if coordinator is None:
            emit(args, {"run_id": fired.run_id}, f"run {fired.run_id} started")
            return EXIT_OK
        print(f"run {fired.run_id} started for schedule {args.name}", file=sys.stderr)
        summary = add_summary_extra(db, follow_run(db, coordinator, fired.run_id, args), settings)
    finally:
        if coordinator is not None:
            coordinator.shutdown()
        db.dispose()
    TEARDOWN.skippable = True
    emit(args, summary, format_summary(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def _with_existing(db: Any, fn: Any) -> Any:
    from engine.schedules.service import ScheduleError

    try:
        return fn()
    except ScheduleError as exc:
        raise UserError(str(exc)) from None


def cmd_scheduler(args: argparse.Namespace) -> int:
    """Fire schedules with this process's pool (``--workers 0`` on PostgreSQL: the fleet's
    workers do the runs) until Ctrl-C/SIGTERM, and deliver alerts (``Settings.alerts``);
    ``--once``: fire what is due, wait, deliver, exit."""
    from engine.alerts.deliver import Deliverer
    from engine.api import wait_run
    from engine.runtime.coordinator import Coordinator
    from engine.schedules.scheduler import Scheduler

    settings = settings_from(args)
    db = open_db(args)
    if db.is_duckdb and settings.workers == 0:
        db.dispose()
        raise UserError("--workers 0 needs PostgreSQL (standalone workers do the runs)")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    coordinator = Coordinator(db, settings, log_level=args.log_level).start()
    try:
        scheduler = Scheduler(db, settings, coordinator.name)
        deliverer = Deliverer(db, settings)
        if args.once:
            fired = scheduler.tick()
            for f in fired:
                print(f"{f.schedule}: {f.outcome}" + (f" run {f.run_id}" if f.run_id else "")
                      + (f" ({f.note})" if f.note else ""), file=sys.stderr)  # fmt: skip
            results = [
                wait_run(db, f.run_id, sleep=coordinator.wait_settled)
                for f in fired
                if f.run_id is not None
            ]
            if settings.alerts:
                deliverer.run_once()  # the alerts of the runs (and fires) just ended
            emit(args, [f.__dict__ for f in fired], f"{len(fired)} fire(s)")
            return (
                EXIT_OK if all(r["status"] == "completed" for r in results) else EXIT_NOT_COMPLETED
            )
        print(
            f"scheduler running ({settings.workers} local workers, database {db.display_url}); "
            "Ctrl-C ends",
            file=sys.stderr,
        )
        alerts = deliverer.start(stop) if settings.alerts else None
        scheduler.run_forever(stop, poll_s=args.poll)
        if alerts is not None:
            alerts.join(settings.alerts_timeout_s + 5)
        return EXIT_OK
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        coordinator.shutdown()
        db.dispose()
        TEARDOWN.skippable = True


def add_commands(sub: Any) -> None:
    from engine.cli.common import common_opts

    s = sub.add_parser(
        "schedule",
        help="jobs that start themselves: add, list, enable, disable, remove, run-now",
        description="Schedules are kept in the database (every console and CLI sees them) "
        "and fired by a scheduler: the console's server, or `engine.run scheduler`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m engine.run schedule add nightly --cron '0 3 * * *' "
        "--tz Europe/Berlin -- validate --revalidate --minutes-old 60 --judge URL",
    )
    ss = s.add_subparsers(dest="schedule_cmd", required=True, metavar="ACTION")
    a = ss.add_parser(
        "add",
        help="add a schedule: its timing, then -- and the job's command line",
        usage="python -m engine.run schedule add NAME (--cron EXPR | --every DURATION) "
        "[options] -- JOB…",
        description="The job is the command line you would run by hand, after --; it is "
        "checked now exactly as it would be then. Relative paths are made absolute.",
    )
    common_opts(a)
    a.add_argument("name", help="letters, digits, - _ .")
    a.add_argument("--cron", help="a cron expression: minute hour day month weekday ('0 3 * * *')")
    a.add_argument("--every", help="an interval instead: 30m, 1h, 90s, 2d")
    a.add_argument("--tz", default="UTC", help="the time zone the cron is read in (UTC)")
    a.add_argument(
        "--overlap",
        choices=("skip", "queue"),
        default="skip",
        help="when the previous run still goes: skip this fire, or queue it until that run "
        "ends (skip)",
    )
    a.add_argument(
        "--missed",
        choices=("once", "skip"),
        default="once",
        help="fires missed while no scheduler ran: run once on return, or skip them (once)",
    )
    a.set_defaults(func=cmd_add, job=[])
    ls = ss.add_parser("list", help="schedules, next due times, last fires and their runs")
    common_opts(ls)
    ls.set_defaults(func=cmd_list)
    for action, fn, text in (
        ("enable", cmd_enable, "enable (the next due time counts from now)"),
        ("disable", cmd_disable, "disable (keeps it and its history)"),
        ("remove", cmd_remove, "remove it and its fire history (its runs stay)"),
    ):
        p = ss.add_parser(action, help=text)
        common_opts(p)
        p.add_argument("name")
        p.set_defaults(func=fn)
    r = ss.add_parser(
        "run-now",
        help="fire now, with this process's pool, followed like a run by hand",
    )
    common_opts(r)
    r.add_argument("name")
    r.add_argument("--workers", type=int, help="local worker processes (default 2)")
    r.add_argument("--concurrency", type=int, help="items in flight per worker (200)")
    r.add_argument(
        "--no-wait", action="store_true", help="PostgreSQL: create the run for the fleet, return"
    )
    r.set_defaults(func=cmd_run_now)

    d = sub.add_parser(
        "scheduler",
        help="fire schedules here until Ctrl-C (the console's server does it too)",
        description="Fires due schedules into runs done by this process's pool (or, with "
        "--workers 0 on PostgreSQL, by the fleet). Several schedulers on one PostgreSQL "
        "are safe: each due time fires exactly once.",
    )
    common_opts(d)
    d.add_argument("--workers", type=int, help="local worker processes (default 2)")
    d.add_argument("--concurrency", type=int, help="items in flight per worker (200)")
    d.add_argument("--poll", type=float, default=5.0, help="seconds between rounds (5)")
    d.add_argument(
        "--once", action="store_true", help="fire what is due now, wait for those runs, exit"
    )
    d.set_defaults(func=cmd_scheduler)

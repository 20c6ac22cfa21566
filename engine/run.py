"""Fetchfleet's command line: ``python -m engine.run <command>``. A thin shell over the
engine API that the console uses too. Exit code 0 only when the run completed."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.settings import Settings
from storage.errors import DatabaseLockedError, StorageError

if TYPE_CHECKING:
    from storage.db import Database

log = logging.getLogger("fetchfleet")

EXIT_OK, EXIT_NOT_COMPLETED, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 130
# Set once a job's pool is stopped and its database closed: `python -m engine.run` may then
# skip the interpreter's teardown (engine.runtime.exit_now).
TEARDOWN_SKIPPABLE = False


class UserError(Exception):
    """Bad input: the message says what to change. Exit code 2, no traceback."""


# --- helpers ---------------------------------------------------------------------------------


# storage.db (SQLAlchemy, DuckDB) is imported on first use: spawned pool workers re-import
# this module as their __main__, and they never open the database.
def resolve_db_url(cli_url: str | None = None) -> str:
    from storage.db import resolve_db_url as resolve

    return resolve(cli_url)


def open_database(url: str, **kwargs: Any) -> Database:
    from storage.db import open_database as open_db_at

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


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key)
        for key in ("workers", "concurrency", "batch_size", "max_attempts")
        if getattr(args, key, None) is not None
    }
    if getattr(args, "timeout", None) is not None:
        overrides["check_timeout_s"] = args.timeout
    try:
        return Settings(**overrides)
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
    if s.get("error"):
        lines.append(f"  error: {s['error']}")
    if s.get("scrape"):
        from engine.cli_scrape import format_scrape

        lines.extend(format_scrape(s["scrape"]))
    return "\n".join(lines)


def follow_run(db: Database, coordinator: Any, run_id: int, args: argparse.Namespace) -> dict:
    """Wait for a run with a progress bar; Ctrl-C stops it gracefully, a second one aborts."""
    from engine.api import wait_run
    from engine.progress import RunProgress

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
            return wait_run(db, run_id, on_progress=progress, sleep=wait)
    finally:
        signal.signal(signal.SIGINT, previous)


def print_bad_input(db: Database, run_id: int) -> None:
    """Malformed input lines recorded while planning, so the user can fix them."""
    import sqlalchemy as sa

    from storage.bulk import fetch_all
    from storage.schema import errors

    with db.connect() as conn:
        rows = fetch_all(
            conn,
            sa.select(errors.c.item_key, errors.c.message)
            .where(errors.c.run_id == run_id, errors.c.error_type == "bad_input")
            .order_by(errors.c.id)
            .limit(6),
        )
        total = fetch_all(
            conn,
            sa.select(sa.func.count())
            .select_from(errors)
            .where(errors.c.run_id == run_id, errors.c.error_type == "bad_input"),
        )[0][0]
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


# --- commands --------------------------------------------------------------------------------


def validate_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {
        "judge_url": args.judge,
        "timeout_s": args.timeout,
        "batch_size": args.batch_size,
        "proxies_file": args.proxies,
        "status": args.status,
        "protocol": args.type,
        "older_than_hours": args.older_than_hours,
        "limit": args.limit,
    }
    if args.revalidate:
        params["minutes_old"] = args.minutes_old if args.minutes_old is not None else 60
    elif args.minutes_old is not None:
        params["minutes_old"] = args.minutes_old
    if args.proxies and (args.revalidate or args.status or args.older_than_hours):
        raise UserError("--proxies imports a list; the filters select stored proxies: pick one")
    return params


def run_job(
    args: argparse.Namespace,
    kind: str,
    params: dict[str, Any],
    finish: Callable[[Database, dict[str, Any]], None] | None = None,
) -> int:
    """Submit a run, follow it to its end; ``finish`` may add to the summary before it is
    printed (the scrape job's entities and method mix)."""
    from engine.api import submit_run
    from engine.coordinator import Coordinator

    settings = settings_from(args)
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
        summary = follow_run(db, coordinator, run_id, args)
        if finish is not None:
            finish(db, summary)
    finally:
        coordinator.shutdown()
        db.dispose()
    global TEARDOWN_SKIPPABLE
    TEARDOWN_SKIPPABLE = True  # the pool is gone and the database closed
    emit(args, summary, format_summary(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def cmd_validate(args: argparse.Namespace) -> int:
    params = validate_params(args)
    if not args.every:
        return run_job(args, "validate", params)
    period = parse_duration(args.every)
    if args.proxies is None and "minutes_old" not in params and not args.older_than_hours:
        params["minutes_old"] = period / 60  # revalidate what is older than one period
    code = EXIT_OK
    rounds = 0
    while args.rounds is None or rounds < args.rounds:
        started = time.monotonic()
        code = run_job(args, "validate", params)
        rounds += 1
        params["proxies_file"] = None  # later rounds revalidate the pool
        params.setdefault("minutes_old", period / 60)
        if args.rounds is not None and rounds >= args.rounds:
            break
        wait = max(0.0, period - (time.monotonic() - started))
        print(f"next round in {wait:.0f}s (Ctrl-C to quit)", file=sys.stderr)
        try:
            time.sleep(wait)
        except KeyboardInterrupt:
            break
    return code


def _with_db_or_coordinator(args: argparse.Namespace, request: dict[str, Any]) -> Any:
    """Run a request against the database, or through the coordinator that holds it."""
    from engine.control import ask, control_path, dispatch

    try:
        db = open_database(resolve_db_url(getattr(args, "db", None)), create=False, wait_s=0)
    except DatabaseLockedError as exc:
        try:
            return ask(control_path(exc.path), request)
        except ConnectionError:
            raise exc from None
        except ValueError as err:
            raise UserError(str(err)) from None

    class Direct:
        def __init__(self, db: Database) -> None:
            self.db = db

        def command(self, run_id: int, action: str, source: str = "cli") -> str:
            from storage import runs

            with db.begin() as conn:
                status = runs.apply_command(conn, run_id, action, source)
                runs.settle(conn)
            return status

    try:
        return dispatch(Direct(db), request)
    except ValueError as err:
        raise UserError(str(err)) from None
    finally:
        db.dispose()


def cmd_status(args: argparse.Namespace) -> int:
    result = _with_db_or_coordinator(args, {"op": "status", "run_id": args.run_id})
    if args.run_id is not None:
        emit(args, result, format_summary(result))
        return EXIT_OK
    if args.json:
        print(json.dumps(result, default=str))
    elif not result:
        print("no runs yet: start one with `python -m engine.run validate --proxies FILE`")
    else:
        print(f"{'run':>5}  {'kind':9} {'status':10} {'items':>9} {'secs':>8}  created")
        for r in result:
            print(
                f"{r['run_id']:>5}  {r['kind']:9} {r['status']:10} {r['total']:>9,} "
                f"{r['duration_s']:>8.1f}  {r['created_at']}"
            )
    return EXIT_OK


def cmd_command(args: argparse.Namespace) -> int:
    try:
        result = _with_db_or_coordinator(
            args, {"op": "command", "run_id": args.run_id, "action": args.command, "source": "cli"}
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    emit(args, result, f"run {result['run_id']}: {result['status']}")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume here (starting a coordinator), or ask the coordinator holding the database."""
    from engine.control import ask, control_path
    from engine.coordinator import Coordinator

    try:
        db = open_db(args)
    except DatabaseLockedError as exc:
        try:
            result = ask(
                control_path(exc.path), {"op": "command", "run_id": args.run_id, "action": "resume"}
            )
        except ConnectionError:
            raise exc from None
        except ValueError as err:
            raise UserError(str(err)) from None
        emit(args, result, f"run {args.run_id}: {result['status']} (in PID {exc.pid})")
        return EXIT_OK
    from storage.runs import get_run

    with db.connect() as conn:
        found = get_run(conn, args.run_id)
    if found is not None and found.kind == "pipeline":
        db.dispose()
        raise UserError(
            f"run {args.run_id} is a pipeline: `python -m engine.run pipeline --resume {args.run_id}`"
        )
    settings = settings_from(args)
    coordinator = Coordinator(db, settings, log_level=args.log_level).start()
    try:
        with db.connect() as conn:
            run = get_run(conn, args.run_id)
        if run is not None and run.status == "running" and db.is_duckdb:
            # Its coordinator was killed (nobody else can hold the file): this one has
            # re-queued the orphaned leases and takes the run over as it is.
            print(
                f"taking over run {args.run_id}, left running by a killed process", file=sys.stderr
            )
        else:
            try:
                coordinator.command(args.run_id, "resume", source="cli")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        summary = follow_run(db, coordinator, args.run_id, args)
    finally:
        coordinator.shutdown()
        db.dispose()
    global TEARDOWN_SKIPPABLE
    TEARDOWN_SKIPPABLE = True  # the pool is gone and the database closed
    emit(args, summary, format_summary(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def cmd_export(args: argparse.Namespace) -> int:
    from storage.export import export, parse_where

    fmt = args.format or Path(args.out).suffix.lstrip(".").lower()
    try:
        where = parse_where(args.where)
        db = open_db(args)
        try:
            n = export(db, args.table, fmt, Path(args.out), run_id=args.run, where=where)
        finally:
            db.dispose()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    emit(
        args,
        {"table": args.table, "format": fmt, "rows": n, "out": args.out},
        f"wrote {n:,} rows of {args.table} to {args.out}",
    )
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """A standalone worker (PostgreSQL): this machine joins the fleet."""
    import asyncio
    import multiprocessing as mp

    from engine.queue_sql import SqlQueue
    from engine.worker import Worker, install_uvloop, new_worker_id, run_worker

    url = resolve_db_url(args.db)
    if url.startswith("duckdb"):
        raise UserError(
            "a standalone worker needs a shared PostgreSQL database (--db postgresql://…); "
            "with DuckDB, the coordinator's own pool does the work"
        )
    settings = settings_from(args)
    if args.processes > 1:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker_process, args=(vars(args),)) for _ in range(args.processes)
        ]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.join(30)
        return EXIT_OK
    db = open_database(url, create=True)
    install_uvloop()
    worker = Worker(
        SqlQueue(db, settings),
        settings,
        new_worker_id(args.kind),
        kind=args.kind,
        run_id=args.run,
        idle_exit_s=args.idle_exit,
    )
    if not args.json:
        print(f"worker {worker.worker_id} joined {db.display_url}", file=sys.stderr)
    reason = asyncio.run(run_worker(worker))
    db.dispose()
    emit(
        args,
        {"worker_id": worker.worker_id, "exit": reason},
        f"worker {worker.worker_id} exited: {reason}",
    )
    return EXIT_OK


def _worker_process(ns: dict[str, Any]) -> None:
    ns = dict(ns, processes=1, json=True)
    cmd_worker(argparse.Namespace(**ns))


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo

    return run_demo(args)


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Fetchfleet engine: validate proxy lists, supervise runs, export data.",
        epilog="Database: --db URL, else FETCHFLEET_DB, else POSTGRES_HOST/PORT/DB/USER/"
        "PASSWORD, else data/fetchfleet.duckdb. Exit code 0 only when the run completed.",
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, json_help: str = "print one JSON object") -> None:
        sp.add_argument("--db", help="database URL or DuckDB path")
        sp.add_argument("--json", action="store_true", help=json_help)

    def pool_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workers", type=int, help="local worker processes (default 2)")
        sp.add_argument("--concurrency", type=int, help="items in flight per worker (200)")
        sp.add_argument("--batch-size", type=int, help="items per task (50)")
        sp.add_argument("--max-attempts", type=int, help="tries per task (3)")
        sp.add_argument("--timeout", type=float, help="seconds per check attempt (5)")

    v = sub.add_parser(
        "validate",
        help="check proxies through a judge",
        description="Check a proxy list (or stored proxies) through a judge: "
        "alive, latency, anonymity, exit IP, country.",
    )
    common(v, "print one JSON summary at the end and nothing else on stdout")
    pool_opts(v)
    v.add_argument(
        "--proxies",
        help="proxy list (text or CSV): ip:port, scheme://[user:pass@]"
        "host:port or ip:port:user:pass; schemes http, https, socks4, socks5",
    )
    v.add_argument("--judge", help="judge URL: httpbin-style /get JSON or an azenv page")
    v.add_argument(
        "--revalidate",
        action="store_true",
        help="re-check stored proxies last checked more than --minutes-old ago",
    )
    v.add_argument("--minutes-old", type=float, help="with --revalidate (default 60)")
    v.add_argument("--status", choices=("untested", "active", "inactive"))
    v.add_argument("--type", choices=("http", "https", "socks4", "socks5"))
    v.add_argument(
        "--older-than-hours", type=float, help="stored proxies not checked for this long (or never)"
    )
    v.add_argument("--limit", type=int, help="at most this many stored proxies")
    v.add_argument(
        "--every",
        help="repeat on a schedule, e.g. 30m: each round revalidates "
        "proxies older than one period (Ctrl-C ends)",
    )
    v.add_argument("--rounds", type=int, help="with --every: stop after this many rounds")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("status", help="show runs, or one run's counts")
    common(s)
    s.add_argument("run_id", nargs="?", type=int)
    s.set_defaults(func=cmd_status)

    for name, text in (
        ("stop", "stop a run: in-flight items finish, the rest stay queued"),
        ("pause", "pause a run (resume continues it)"),
        ("cancel", "cancel a run for good"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        common(c)
        c.add_argument("run_id", type=int)
        c.set_defaults(func=cmd_command, command=name)

    r = sub.add_parser(
        "resume",
        help="resume a stopped, paused or failed run",
        description="Resume a run: here with a local pool, or in the "
        "coordinator that holds the DuckDB file.",
    )
    common(r)
    pool_opts(r)
    r.add_argument("run_id", type=int)
    r.set_defaults(func=cmd_resume)

    e = sub.add_parser("export", help="export a table or a run to CSV or Parquet")
    common(e)
    e.add_argument(
        "--table",
        required=True,
        help="runs, tasks, workers, commands, errors, proxies, proxy_checks",
    )
    e.add_argument("--format", choices=("csv", "parquet"), help="default: from --out suffix")
    e.add_argument("--out", required=True)
    e.add_argument("--run", type=int, help="only rows of this run")
    e.add_argument(
        "--where",
        action="append",
        metavar="COL=VALUE",
        help="filter, repeatable, e.g. --where status=active",
    )
    e.set_defaults(func=cmd_export)

    w = sub.add_parser(
        "worker",
        help="run a standalone worker against PostgreSQL",
        description="Join a PostgreSQL-backed fleet: claim tasks of running "
        "runs until stopped (SIGTERM/Ctrl-C finish in-flight items).",
    )
    common(w)
    w.add_argument("--concurrency", type=int)
    w.add_argument("--processes", type=int, default=1, help="worker processes (1)")
    w.add_argument("--run", type=int, help="only work on this run")
    w.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    w.add_argument("--kind", default="standalone", help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser(
        "demo",
        help="start the simulated world, validate its proxies and scrape its shops",
        description="Offline demo: starts sim/ on loopback (a judge and a "
        "proxy fleet), validates the fleet, then scrapes one sim shop per country "
        "through the fetcher cascade; prints the summaries, which method won where, "
        "and how both match the sim's ground truth.",
    )
    common(d)
    d.add_argument("--proxies", type=int, default=120, help="sim proxies (120)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--concurrency", type=int, default=200)
    d.add_argument("--timeout", type=float, default=2.0)
    d.add_argument("--batch-size", type=int, default=20)
    d.add_argument("--max-attempts", type=int)
    d.add_argument(
        "--skip-scrape", action="store_true", help="validate only; do not scrape the sim shops"
    )
    d.set_defaults(func=cmd_demo)

    from engine import cli_backfill

    cli_backfill.add_commands(sub)  # backfill, report

    from engine import cli_fetch

    cli_fetch.add_commands(sub)  # fetch, doctor

    from engine import cli_scrape

    cli_scrape.add_commands(sub)  # scrape

    from engine import cli_pipeline

    cli_pipeline.add_commands(sub)  # pipeline
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from engine.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except (UserError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_ABORTED


if __name__ == "__main__":
    # `python -m engine.run` loads this file as __main__; run the importable module's main
    # instead, so the UserError that other modules raise is the class main() catches.
    from engine import run as _importable

    _code = _importable.main()
    if _importable.TEARDOWN_SKIPPABLE:
        from engine.runtime import exit_now

        exit_now(_code)
    sys.exit(_code)

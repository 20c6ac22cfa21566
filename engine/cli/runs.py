"""The commands about runs and workers, whatever their kind: status, stop, pause, resume,
cancel, export, snapshots, worker."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import (
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    TEARDOWN,
    UserError,
    emit,
    follow_run,
    format_summary,
    open_database,
    open_db,
    resolve_db_url,
    settings_from,
)
from storage.errors import DatabaseLockedError

if TYPE_CHECKING:
    from storage.db import Database


def _with_db_or_coordinator(args: argparse.Namespace, request: dict[str, Any]) -> Any:
    """Run a request against the database, or through the coordinator that holds it."""
    from engine.runtime.control import ask, control_path, dispatch

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
        """No coordinator holds the database: this process applies the command itself."""

        def __init__(self, db: Database) -> None:
            self.db = db

        def command(self, run_id: int, action: str, source: str = "cli") -> str:
            from engine import lifecycle

            return lifecycle.command(db, settings_from(args), run_id, action, source)

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


def _check_queue_driven(kind_name: str, run_id: int, settings: Any) -> None:
    """``resume`` hands a run back to the task queue: that only resumes runs of a queue-driven
    kind (a ``JobKind``). A kind that runs in its own process (a ``RunKind`` only, such as
    pipelines) names its own resume command."""
    from engine.jobs import get_kind
    from engine.jobs.base import JobKind

    try:
        kind = get_kind(kind_name, settings)
    except ValueError as exc:
        raise UserError(f"run {run_id}: {exc}") from None
    if not isinstance(kind, JobKind):
        raise UserError(
            f"run {run_id} is a {kind_name} run, which runs in the process that started it, "
            f"not in the task queue: `python -m engine.run {kind.resume_command(run_id)}`"
        )


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume here (starting a coordinator), or ask the coordinator holding the database."""
    from engine.runtime.control import ask, control_path
    from engine.runtime.coordinator import Coordinator

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
    from storage.runs import get_run, set_code_version

    settings = settings_from(args)
    with db.connect() as conn:
        found = get_run(conn, args.run_id)
    if found is not None:
        try:
            _check_queue_driven(found.kind, args.run_id, settings)
        except UserError:
            db.dispose()
            raise
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
        elif run is not None and run.status == "running":
            # PostgreSQL: the run's tasks are in the shared queue; this process joins it with
            # its pool and follows it. Leases of a coordinator that died expire (lease_s) and
            # its workers' tasks are re-queued without costing an attempt.
            print(
                f"joining run {args.run_id}, which is running (a coordinator that died leaves "
                "leases that are re-queued once they expire)",
                file=sys.stderr,
            )
        else:
            try:
                coordinator.command(args.run_id, "resume", source="cli")
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if run is not None and run.status == "running":  # goes on with this code
            with db.begin() as conn:
                set_code_version(conn, args.run_id, coordinator.version)
        summary = follow_run(db, coordinator, args.run_id, args)
        from engine.summary import add_summary_extra

        add_summary_extra(db, summary, settings)
    finally:
        coordinator.shutdown()
        db.dispose()
    TEARDOWN.skippable = True  # the pool is gone and the database closed
    emit(args, summary, format_summary(summary))
    return EXIT_OK if summary["status"] == "completed" else EXIT_NOT_COMPLETED


def cmd_export(args: argparse.Namespace) -> int:
    from storage.export import export, parse_where

    fmt = args.format or Path(args.out).suffix.lstrip(".").lower()
    try:
        where = parse_where(args.where)
        db = open_db(args)
        try:
            order = ("-" if args.desc else "") + args.order_by if args.order_by else None
            n = export(db, args.table, fmt, Path(args.out), args.run, where, order)
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


def cmd_snapshots(args: argparse.Namespace) -> int:
    """A run's error snapshots: listed, or written to --out (HTML, PNG, index.csv)."""
    from storage.snapshots import list_snapshots, write_snapshots

    db = open_db(args)
    try:
        with db.connect() as conn:
            snaps = list_snapshots(conn, args.run_id)
            if args.out:
                write_snapshots(conn, args.run_id, Path(args.out))
    finally:
        db.dispose()
    lines = [
        f"{s['kind']:<36} {s['method'] or '-':<10} {'png' if s['has_screenshot'] else '-':<4} "
        f"{s['url']}"
        for s in snaps
    ]
    where = f"; written to {args.out} (index.csv)" if args.out else ""
    human = "\n".join([*lines, f"{len(snaps)} snapshot(s) of run {args.run_id}{where}"])
    emit(
        args,
        {"run_id": args.run_id, "snapshots": len(snaps), "out": args.out, "items": snaps},
        human,
    )
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """A standalone worker (PostgreSQL): this machine joins the fleet."""
    import asyncio
    import multiprocessing as mp

    from engine.jobs.base import WorkerEnv
    from engine.queue.sql import SqlBoot
    from engine.runtime.worker import Worker, install_uvloop, new_worker_id, run_worker
    from fetchers.lifeline import end_own_lineage, mark_lineage

    url = resolve_db_url(args.db)
    if url.startswith("duckdb"):
        raise UserError(
            "a standalone worker needs a shared PostgreSQL database (--db postgresql://…); "
            "with DuckDB, the coordinator's own pool does the work"
        )
    settings = settings_from(args)
    countries = worker_countries(args.countries, quiet=args.json)
    if args.processes > 1:
        # what a worker killed with -9 left is ended once they are all gone
        mark_lineage(new_worker_id(f"{args.kind}-processes"))
        from engine.version import code_version

        args.code_version = code_version()  # one version for all: computed here, once
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker_process, args=(vars(args),)) for _ in range(args.processes)
        ]
        for p in procs:
            p.start()
        forward_sigterm(procs)
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.join(30)
        end_own_lineage()
        failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if failed:
            print(
                f"{len(failed)} of {len(procs)} worker processes failed (exit codes "
                f"{', '.join(map(str, failed))}); see the log above",
                file=sys.stderr,
            )
            return EXIT_NOT_COMPLETED
        return EXIT_OK
    worker_id = new_worker_id(args.kind)
    mark_lineage(worker_id)  # what this worker starts ends with it (fetchers.lifeline)
    boot = SqlBoot(
        worker_id=worker_id,
        settings=settings.model_dump(mode="json"),
        db_url=url,
        create=True,
        ignore_version=args.ignore_version,
        version=getattr(args, "code_version", None),
        outage_s=0.0,  # started by hand (or by `fleet start`): a wrong URL fails at once
    )
    backend = boot.open_backend()
    install_uvloop()
    worker = Worker(
        backend,
        settings,
        boot.worker_id,
        kind=args.kind,
        run_id=args.run,
        idle_exit_s=args.idle_exit,
        env=WorkerEnv(limiter=boot.open_limiter()),
        host=args.host_label,
        countries=countries,
    )
    # on stderr, so also with --json and in each of --processes N: a launch's log says who
    # joined where (the URL with its password hidden) and which countries it serves
    from engine.version import short

    serves = f", serving {', '.join(countries)}" if countries else ""
    runs_of = "every run (--ignore-version)" if args.ignore_version else "runs of this version"
    print(
        f"worker {worker.worker_id} joined {boot.db.display_url}{serves} "
        f"(version {short(backend.version)}; takes {runs_of})",
        file=sys.stderr,
        flush=True,
    )
    reason = asyncio.run(run_worker(worker))
    end_own_lineage()
    boot.close()
    emit(
        args,
        {"worker_id": worker.worker_id, "exit": reason},
        f"worker {worker.worker_id} exited: {reason}",
    )
    return EXIT_OK


def worker_countries(value: str | None, quiet: bool = False) -> tuple[str, ...]:
    """``--countries`` → normal forms (``engine.countries``). A name no table knows is kept
    (a spec may name a country of its own) but said, since a typo would match nothing."""
    from engine.countries import is_known, parse_countries

    if value is None:
        return ()
    unknown = [p.strip() for p in value.split(",") if p.strip() and not is_known(p)]
    unknown = [p for p in unknown if p.lower() != "any"]
    if unknown and not quiet:
        print(
            f"--countries: {', '.join(unknown)} is no ISO 3166 country name or code; "
            "matched as written (case-insensitive)",
            file=sys.stderr,
        )
    return parse_countries(value)


def forward_sigterm(procs: list[Any]) -> None:
    """SIGTERM to the parent of ``--processes N`` stops its workers gracefully (each finishes
    its in-flight items and signs off) instead of orphaning them: passed on, then the parent
    waits for them as on Ctrl-C."""
    import signal

    def on_term(signum: int, frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def _worker_process(ns: dict[str, Any]) -> None:
    ns = dict(ns, processes=1, json=True)
    cmd_worker(argparse.Namespace(**ns))


def add_commands(sub: Any) -> None:
    from engine.cli.common import common_opts, pool_opts

    s = sub.add_parser("status", help="show runs, or one run's counts")
    common_opts(s)
    s.add_argument("run_id", nargs="?", type=int)
    s.set_defaults(func=cmd_status)

    for name, text in (
        ("stop", "stop a run: in-flight items finish, the rest stay queued"),
        ("pause", "pause a run (resume continues it)"),
        ("cancel", "cancel a run for good"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        common_opts(c)
        c.add_argument("run_id", type=int)
        c.set_defaults(func=cmd_command, command=name)

    r = sub.add_parser(
        "resume",
        help="resume a stopped, paused or failed run",
        description="Resume a run: here with a local pool, or in the "
        "coordinator that holds the DuckDB file.",
    )
    common_opts(r)
    pool_opts(r)
    r.add_argument("run_id", type=int)
    r.set_defaults(func=cmd_resume)

    e = sub.add_parser("export", help="export a table or a run to CSV or Parquet")
    common_opts(e)
    from engine.jobs import table_names

    e.add_argument(
        "--table",
        required=True,
        help=", ".join(table_names()),  # the core schema's and the kinds' own tables
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
    e.add_argument(
        "--order-by",
        metavar="COL",
        help="sort by a column (empty values last); proxies also by their history: "
        "--order-by reliability --desc lists the most reliable first",
    )
    e.add_argument("--desc", action="store_true", help="with --order-by: descending")
    e.set_defaults(func=cmd_export)

    sn = sub.add_parser(
        "snapshots",
        help="list or export a run's error snapshots (HTML, screenshots)",
        description="The first page of each distinct error kind of a scrape run (blocked, "
        "validation, invalid entity, extraction error): listed, or with --out written as "
        "NNN-<kind>.html / .png files and an index.csv.",
    )
    common_opts(sn)
    sn.add_argument("run_id", type=int)
    sn.add_argument("--out", metavar="DIR", help="write the files into this directory")
    sn.set_defaults(func=cmd_snapshots)

    w = sub.add_parser(
        "worker",
        help="run a standalone worker against PostgreSQL",
        description="Join a PostgreSQL-backed fleet: claim tasks of running "
        "runs until stopped (SIGTERM/Ctrl-C finish in-flight items).",
    )
    common_opts(w)
    w.add_argument("--concurrency", type=int)
    w.add_argument("--processes", type=int, default=1, help="worker processes (1)")
    w.add_argument("--run", type=int, help="only work on this run")
    w.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    w.add_argument("--kind", default="standalone", help=argparse.SUPPRESS)
    w.add_argument(
        "--host-label",
        help="the host name it registers under (default: this machine's); "
        "`fleet start` sets the fleet's name for the host",
    )
    w.add_argument(
        "--countries",
        metavar="LIST",
        help='claim only tasks of these countries (and tasks of none), e.g. "India,Malaysia" '
        "or IN,MY: names or ISO codes, any case (default: every country)",
    )
    w.add_argument(
        "--ignore-version",
        action="store_true",
        help="also take tasks of runs started by another code version (by default a worker "
        "leaves them alone and says why: `deploy HOST` brings a host to this version)",
    )
    w.set_defaults(func=cmd_worker)

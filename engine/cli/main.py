"""The parser, built from the commands every run shares and the subcommands each registered
kind adds (``KindInfo.cli``), and ``main``."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import EXIT_ABORTED, EXIT_USAGE, UserError
from engine.jobs.params import ParamError
from storage.errors import StorageError


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import alerts, demo, fetch, fleet, gateway, metrics, runs, schedule
    from engine.jobs import kinds

    p = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Fetchfleet engine: validate proxy lists, scrape, backfill, supervise "
        "runs and workers, export data.",
        epilog="Database: --db URL, else FETCHFLEET_DB, else POSTGRES_HOST/PORT/DB/USER/"
        "PASSWORD, else data/fetchfleet.duckdb. Exit code 0 only when the run completed.",
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for info in kinds().values():
        info.add_cli(sub)  # validate, scrape (+ its resume), backfill + report, pipeline, …
    runs.add_commands(sub)  # status, stop, pause, cancel, resume, export, snapshots, worker
    demo.add_commands(sub)
    fetch.add_commands(sub)  # fetch, doctor
    fleet.add_commands(sub)  # hosts, fleet (workers over ssh)
    schedule.add_commands(sub)  # schedule, scheduler
    metrics.add_commands(sub)  # /metrics for Prometheus
    alerts.add_commands(sub)  # alerts add/list/test/remove/recent/deliver
    gateway.add_commands(sub)  # serve-proxy
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    job: list[str] | None = None
    if "--" in argv and "schedule" in argv[: argv.index("--")]:
        # `schedule add NAME … -- JOB`: the job's own flags are not ours to parse
        cut = argv.index("--")
        argv, job = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if job is not None:
        args.job = job
    from engine.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except (UserError, ParamError, StorageError) as exc:  # ParamError names its flag
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_ABORTED

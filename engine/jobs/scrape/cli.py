"""``engine.run scrape``: the CLI of the scrape job.

    python -m engine.run scrape --spec specs/malaysia_pharmacy.toml [--country Malaysia] \\
        [--workers 2] [--concurrency 64] [--max-pages N] [--methods http,playwright] \\
        [--proxies active [--strategy adaptive]] [--json]
    python -m engine.run scrape --resume RUN_ID

Exit codes as everywhere: 0 the run completed (pages that failed or stayed blocked after the
whole cascade are counted as failed, and listed in `errors`), 1 it ended otherwise, 2 bad
input (a spec that does not parse says where), 130 aborted.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.jobs.params import add_param_flags, params_from_args
from engine.jobs.scrape.params import ScrapeParams


def add_commands(sub: Any) -> None:
    s = sub.add_parser(
        "scrape",
        help="scrape the sources of a spec through the fetcher cascade",
        description="Fetch the start URLs of a spec (TOML) and the links it follows, through "
        "the per-country fetcher cascade, extract its entities and store them (urls, "
        "entities, entity_attributes, files, fetch_logs). Resumable after any crash; a page "
        "is stored once per run, an entity once per type, country and external id.",
        epilog="The spec format is in README.md, 'Scrape specs'. Exit code 0 when the run "
        "completed, 1 otherwise, 2 for bad input.",
    )
    s.add_argument("--db", help="database URL or DuckDB path")
    s.add_argument(
        "--json", action="store_true", help="print one JSON summary at the end and nothing else"
    )
    add_param_flags(s, ScrapeParams)
    s.add_argument("--workers", type=int, help="local worker processes (default 2)")
    s.add_argument("--concurrency", type=int, help="pages in flight per worker (200)")
    s.add_argument("--max-attempts", type=int, help="tries per task after worker crashes (3)")
    s.add_argument(
        "--resume", type=int, metavar="RUN_ID", help="finish an earlier scrape run (same as resume)"
    )
    s.set_defaults(func=cmd_scrape)


def cmd_scrape(args: argparse.Namespace) -> int:
    from engine.cli.common import UserError, run_job, settings_from
    from engine.cli.runs import cmd_resume
    from engine.jobs import get_kind

    if args.resume is not None:
        if args.spec:
            raise UserError(f"--resume continues run {args.resume} with its own spec; drop --spec")
        args.run_id = args.resume
        return cmd_resume(args)
    if not args.spec:
        raise UserError("scrape needs --spec FILE (or --resume RUN_ID); see --help")
    params = params_from_args(ScrapeParams, args)
    ScrapeParams.build(params)  # a bad value: exit 2 naming its flag (ParamError)
    # Check the spec and its start URLs before a coordinator and its pool start.
    get_kind("scrape", settings_from(args)).prepare(dict(params))
    return run_job(args, "scrape", params, finish=add_scrape_stats)


def add_scrape_stats(db: Any, summary: dict[str, Any]) -> None:
    from storage.scrape import run_stats

    with db.connect() as conn:
        summary["scrape"] = run_stats(conn, summary["run_id"])


def format_scrape(stats: dict[str, Any]) -> list[str]:
    lines = [
        f"  entities: {stats['entities']:,} seen, {stats['new_entities']:,} new; "
        f"files: {stats['files']:,}"
    ]
    for country, mix in stats["methods"].items():
        won = ", ".join(f"{m} {n:,}" for m, n in sorted(mix.items(), key=lambda x: -x[1]))
        lines.append(f"  {country}: pages by method: {won}")
    if stats["blocked_reasons"]:
        lines.append(
            "  blocked: " + "; ".join(f"{r} ×{n}" for r, n in stats["blocked_reasons"].items())
        )
    return lines

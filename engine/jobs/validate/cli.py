"""``engine.run validate``: the CLI of the validate job."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from engine.cli.common import EXIT_OK, UserError, parse_duration, run_job
from engine.jobs.params import add_param_flags, params_from_args
from engine.jobs.validate.params import REVALIDATE_MINUTES, ValidateParams
from engine.settings import Settings


def add_commands(sub: Any) -> None:
    from engine.cli.common import common_opts, pool_opts

    v = sub.add_parser(
        "validate",
        help="check proxies through a judge",
        description="Check a proxy list (or stored proxies) through a judge: "
        "alive, latency, anonymity, exit IP, country.",
    )
    common_opts(v, "print one JSON summary at the end and nothing else on stdout")
    pool_opts(v, task_shape=False)  # --batch-size and --timeout are run parameters
    add_param_flags(v, ValidateParams)
    v.add_argument(
        "--revalidate",
        action="store_true",
        help="re-check stored proxies last checked more than --minutes-old ago "
        f"(default {REVALIDATE_MINUTES:g})",
    )
    v.add_argument(
        "--every",
        help="repeat on a schedule, e.g. 30m: each round revalidates "
        "proxies older than one period (Ctrl-C ends)",
    )
    v.add_argument("--rounds", type=int, help="with --every: stop after this many rounds")
    v.set_defaults(func=cmd_validate)


def validate_params(args: argparse.Namespace) -> dict[str, Any]:
    """The run parameters given by the flags, checked through the model (exit 2 naming the
    flag); what is not given is left to ``prepare`` (the settings, the model's defaults)."""
    params = params_from_args(ValidateParams, args)
    if args.revalidate:
        params.setdefault("minutes_old", REVALIDATE_MINUTES)
    if args.proxies and (args.revalidate or args.status or args.older_than_hours):
        raise UserError("--proxies imports a list; the filters select stored proxies: pick one")
    ValidateParams.build(params, Settings())  # a bad value: exit 2 naming its flag
    return params


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

"""A stand-in for an existing scraper script, run unchanged as a pipeline step.

It knows nothing of Fetchfleet: it reads the run's identity from the environment a
``ScriptStep`` gives it (FETCHFLEET_RUN_ID, FETCHFLEET_COUNTRY, FETCHFLEET_DB), prints lines
to stdout and warnings to stderr, traps SIGTERM (a stop) to say so and exit, and exits with
the code asked for. See examples/pipelines.py.

    python examples/legacy_scraper.py --lines 5 [--interval 0.2] [--exit 0]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5, help="lines to print (5)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between lines")
    parser.add_argument("--exit", type=int, default=0, help="exit code at the end (0)")
    args = parser.parse_args()

    def on_term(signum: int, frame: object) -> None:
        print("legacy scraper: got SIGTERM, saving and exiting", flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    # A script must never print a password: show the database URL without it.
    db = re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", os.environ.get("FETCHFLEET_DB", "(none)"))
    print(
        f"legacy scraper: run {os.environ.get('FETCHFLEET_RUN_ID')} "
        f"country {os.environ.get('FETCHFLEET_COUNTRY')} db {db}"
    )
    for i in range(args.lines):
        print(f"line {i}")
        if i % 2:
            print(f"warning {i}", file=sys.stderr)
        if args.interval:
            time.sleep(args.interval)
    print("legacy scraper: done")
    return args.exit


if __name__ == "__main__":
    sys.exit(main())

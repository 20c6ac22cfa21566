"""Fetchfleet's command line: ``python -m engine.run <command>``. A thin shell over the
engine API that the console uses too (the commands live in ``engine.cli`` and in each job
kind's package). Exit code 0 only when the run completed.

Kept tiny on purpose: spawned pool workers re-import this file as their ``__main__``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from engine.cli.main import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    from engine.cli.common import TEARDOWN

    _code = main()
    if TEARDOWN.skippable:
        from engine.runtime.process import exit_now

        exit_now(_code)
    sys.exit(_code)

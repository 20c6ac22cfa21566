"""`python -m sim`: run the simulated world in the foreground until Ctrl-C / SIGTERM.

Prints one JSON line with the endpoints (judge URLs, list and truth files, shard pids) so a
script or another terminal can use the world; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from sim.fleet import MIXES

DEFAULT_PROXIES = {"demo": 50, "bench": 10_000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim",
        description=(
            "Start Fetchfleet's simulated world on loopback: a proxy judge on 127.0.0.2 "
            "(httpbin /get, azenv /azenv, bare /ip) and a fleet of HTTP, HTTPS (CONNECT), SOCKS4 "
            "and SOCKS5 proxies, each on its own 127.N.x.y address, with behaviours from elite "
            "to black hole. Writes DIR/proxies.txt (the list to check, mixed formats) and "
            "DIR/truth.json (what each line really is), prints one JSON line with the "
            "endpoints, and runs until Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--proxies",
        type=int,
        metavar="N",
        help="number of proxies (default: 50 for demo, 10000 for bench)",
    )
    parser.add_argument(
        "--mix",
        choices=sorted(MIXES),
        default="demo",
        help="demo: every protocol and behaviour, auth and fakes included; bench: 40%% alive, "
        "30%% refused, 20%% black holes, 10%% flaky (default: demo)",
    )
    parser.add_argument("--seed", type=int, default=1, help="plan seed (default: 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/sim"),
        metavar="DIR",
        help="where to write proxies.txt and truth.json (default: data/sim)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        metavar="P",
        help="shard processes (default: 2 above 2000 proxies, else 1)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # internal: one shard, started by sim.world.SimWorld (spec on stdin, ready line on stdout)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        from sim.shard import main as serve_main

        return serve_main()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from sim.world import SimWorld, SimWorldError, WorldConfig

    n = args.proxies if args.proxies is not None else DEFAULT_PROXIES[args.mix]
    config = WorldConfig(
        n_proxies=n, mix=args.mix, seed=args.seed, processes=args.processes, out_dir=args.out
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        world = SimWorld(config)
        world.start()
    except (SimWorldError, ValueError) as exc:
        logging.getLogger("sim").error("%s", exc)
        return 1
    try:
        print(json.dumps(world.endpoints()), flush=True)
        while not stop.wait(1.0):
            if not world.is_running():
                logging.getLogger("sim").error("a sim shard died; stopping the world")
                return 1
        return 0
    finally:
        world.stop()


if __name__ == "__main__":
    sys.exit(main())

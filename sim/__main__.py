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
from typing import Any

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
    api = parser.add_argument_group("the backfill API (127.0.0.3)")
    api.add_argument(
        "--api", action="store_true", help="also serve the JSON API: GET /users/{id}, GET /stats"
    )
    api.add_argument(
        "--api-limit",
        metavar="N/PERIOD",
        help="server-side sliding-window limit, e.g. 3000/5m (429 + Retry-After beyond it, "
        "counted in /stats; default: none)",
    )
    api.add_argument(
        "--api-latency-ms", default="5,25", metavar="LO,HI", help="latency range (5,25)"
    )
    api.add_argument("--api-port", type=int, default=0, help="port (default: any free one)")
    api.add_argument(
        "--ids",
        type=int,
        metavar="N",
        help="write N API IDs (one a line, streamed: any size); alone, write and exit",
    )
    api.add_argument("--ids-out", type=Path, metavar="FILE", help="where (default: DIR/ids.txt)")
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
    from sim.api import write_ids
    from sim.world import SimWorld, SimWorldError, WorldConfig

    if args.ids is not None:
        ids_out = args.ids_out or args.out / "ids.txt"
        write_ids(ids_out, args.ids, args.seed)
        if not args.api and args.proxies is None:
            print(json.dumps({"ids_file": str(ids_out), "ids": args.ids}), flush=True)
            return 0
    api = None
    if args.api:
        try:
            api = _api_config(args)
        except ValueError as exc:
            logging.getLogger("sim").error("%s", exc)
            return 2
    n = args.proxies if args.proxies is not None else DEFAULT_PROXIES[args.mix]
    config = WorldConfig(
        n_proxies=n,
        mix=args.mix,
        seed=args.seed,
        processes=args.processes,
        out_dir=args.out,
        api=api,
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
        endpoints = world.endpoints()
        if args.ids is not None:
            endpoints["ids_file"] = str(args.ids_out or args.out / "ids.txt")
        print(json.dumps(endpoints), flush=True)
        while not stop.wait(1.0):
            if not world.is_running():
                logging.getLogger("sim").error("a sim shard died; stopping the world")
                return 1
        return 0
    finally:
        world.stop()


def _api_config(args: argparse.Namespace) -> Any:
    from sim.api import ApiConfig

    limit, window = None, 1.0
    if args.api_limit:
        count, _, period = args.api_limit.partition("/")
        units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
        unit = next((u for u in ("ms", "s", "m", "h") if period.endswith(u)), None)
        try:
            limit = int(count)
            window = float(period[: -len(unit)] or 1) * units[unit] if unit else float("nan")
        except (ValueError, KeyError):
            raise ValueError(
                f"--api-limit {args.api_limit!r}: write N/PERIOD, e.g. 100/1s"
            ) from None
        if not window > 0 or limit < 1:
            raise ValueError(f"--api-limit {args.api_limit!r}: write N/PERIOD, e.g. 100/1s")
    lo, _, hi = args.api_latency_ms.partition(",")
    return ApiConfig(
        limit=limit,
        window_s=window,
        latency_ms=(float(lo), float(hi or lo)),
        port=args.api_port,
        seed=args.seed,
    )


if __name__ == "__main__":
    sys.exit(main())

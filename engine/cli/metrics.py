"""``metrics``: serve the engine's metrics to a monitoring stack (Prometheus text format)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from engine.cli.common import EXIT_OK, UserError, open_db


def cmd_metrics(args: argparse.Namespace) -> int:
    from engine.metrics import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving metrics on {args.host}: anyone who reaches it sees run, host "
            "and worker names (no secrets); put it behind your monitoring network",
            file=sys.stderr,
        )
    db = open_db(args)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server, _thread, port = serve(db, args.port, args.host)
        except OSError as exc:
            raise UserError(f"--port {args.port}: cannot listen on {args.host}: {exc}") from None
        print(
            f"serving http://{args.host}:{port}/metrics (Ctrl-C ends)", file=sys.stderr, flush=True
        )
        stop.wait()
        server.shutdown()
        return EXIT_OK
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        db.dispose()


def add_commands(sub: Any) -> None:
    m = sub.add_parser(
        "metrics",
        help="serve /metrics in the Prometheus text format until Ctrl-C",
        description="Runs by status, items/s by kind, errors and blocked attempts by reason, "
        "workers per host and their heartbeat ages, queue depth, rate-limit use per key, "
        "proxies by status: computed in SQL at each scrape (cheap every 15 s).",
    )
    m.add_argument("--db", help="database URL or DuckDB path")
    m.add_argument("--port", type=int, default=9108, help="port (9108; 0: any free port)")
    m.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    m.set_defaults(func=cmd_metrics)

"""``engine.run demo``: the whole validation path offline, against the simulated world."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.db import open_database
from storage.schema import proxies


def compare_with_truth(db_url: str, truth: list[Any]) -> dict[str, Any]:
    """How the stored pool matches the sim's ground truth (flaky proxies excluded)."""
    from fetchers.proxy_parse import parse_proxy_line

    db = open_database(db_url)
    with db.connect() as conn:
        rows = {
            r[0]: r[1:]
            for r in fetch_all(
                conn,
                sa.select(proxies.c.key, proxies.c.status, proxies.c.anonymity, proxies.c.protocol),
            )
        }
    db.dispose()
    fp = fn = anon_wrong = proto_wrong = judged = 0
    for t in truth:
        if t.alive_expected is None:
            continue
        key = parse_proxy_line(t.line).key
        status, anonymity, protocol = rows.get(key, (None, None, None))
        judged += 1
        alive = status == "active"
        fp += alive and not t.alive_expected
        fn += t.alive_expected and not alive
        if alive and t.alive_expected:
            anon_wrong += anonymity != t.anonymity_expected
            proto_wrong += protocol != t.protocol
    return {
        "judged": judged,
        "false_positives": fp,
        "false_negatives": fn,
        "anonymity_wrong": anon_wrong,
        "protocol_wrong": proto_wrong,
    }


def run_demo(args: argparse.Namespace) -> int:
    from engine.run import run_job
    from sim.world import SimWorld, WorldConfig

    if not args.db:
        args.db = str(Path("data") / "demo.duckdb")
    out = Path("data") / "demo-world"
    print(f"starting the simulated world ({args.proxies} proxies on loopback)…", file=sys.stderr)
    with SimWorld(WorldConfig(n_proxies=args.proxies, mix="demo", seed=7, out_dir=out)) as world:
        print(f"judge {world.judge_url}; proxy list {world.proxies_file}", file=sys.stderr)
        behaviours = Counter(t.behaviour for t in world.truth)
        print(
            "fleet: " + ", ".join(f"{b} {n}" for b, n in sorted(behaviours.items())),
            file=sys.stderr,
        )
        json_mode = args.json
        args.json = True  # collect the summary; print it our way below
        from contextlib import redirect_stdout
        from io import StringIO

        buf = StringIO()
        params = {
            "judge_url": world.judge_url,
            "proxies_file": str(world.proxies_file),
            "timeout_s": args.timeout,
            "batch_size": args.batch_size,
        }
        with redirect_stdout(buf):
            code = run_job(args, "validate", params)
        summary = json.loads(buf.getvalue().strip().splitlines()[-1])
        from engine.run import resolve_db_url

        summary["truth"] = compare_with_truth(resolve_db_url(args.db), world.truth)
        summary["sim_cpu_s"] = round(world.cpu_seconds(), 2)
    if json_mode:
        print(json.dumps(summary, default=str))
        return code
    from engine.run import format_summary

    print(format_summary(summary))
    t = summary["truth"]
    print(
        f"  vs ground truth ({t['judged']} non-flaky proxies): {t['false_positives']} false "
        f"positives, {t['false_negatives']} false negatives, {t['anonymity_wrong']} wrong "
        f"anonymity, {t['protocol_wrong']} wrong protocol"
    )
    print(
        f"  database: {args.db}; export with `python -m engine.run export --db {args.db} "
        "--table proxies --format csv --out proxies.csv`"
    )
    return code

"""What keeping each proxy's history costs a store, at pool scale (prints a table).

    python bench/proxy_history.py [--proxies 100000] [--n 20] [--batches 50,1000,10000]
                                  [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

A pool of ``--proxies`` proxies gets a full history first (``--n`` checks and ``--n`` uses
each, written as validate and scrape runs write them: ``record_checks`` / ``record_uses`` in
batches of 10,000), then one more revalidation of the whole pool is stored in batches of
each size: the table shows the time per batch and per 1,000 proxies of that last pass (the
``record_checks`` call: upsert of the lists + refresh of the derived figures), and the time
of the ``reliability`` sort of the whole pool (the Validation page's first page). DuckDB in
a temp file; PostgreSQL in a scratch database when ``--pg`` names a server (dropped after).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import dashboard as dash
from storage import proxy_history as ph
from storage.clock import utcnow
from storage.db import Database, open_database


def seed(db: Database, proxies: int, n: int) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.insert(dash.proxies),
            [
                {
                    "key": f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8080",
                    "host": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                    "port": 8080,
                    "status": "active",
                    "created_at": utcnow(),
                }
                for i in range(proxies)
            ],
        )
    ids = list(range(1, proxies + 1))
    t0 = utcnow()
    for run in range(1, n + 1):
        for lo in range(0, proxies, 10_000):
            chunk = ids[lo : lo + 10_000]
            at = [t0 + timedelta(minutes=run)] * len(chunk)
            oks = [(i + run) % 4 != 0 for i in chunk]
            ms = [float(20 + (i * run) % 500) for i in chunk]
            with db.begin() as conn:
                ph.record_checks(conn, run, chunk, oks, ms, at, n)
                ph.record_uses(conn, list(zip(chunk, oks, ms, at, strict=True)), n)


def measure(db: Database, proxies: int, n: int, batch: int, run: int) -> tuple[float, float]:
    """(ms per batch, ms per 1,000 proxies) of storing one revalidation of the pool."""
    ids = list(range(1, proxies + 1))
    at = utcnow()
    started = time.perf_counter()
    batches = 0
    for lo in range(0, proxies, batch):
        chunk = ids[lo : lo + batch]
        with db.begin() as conn:
            ph.record_checks(conn, run, chunk, [True] * len(chunk), [50.0] * len(chunk),
                             [at] * len(chunk), n)  # fmt: skip
        batches += 1
    total = (time.perf_counter() - started) * 1000
    return total / batches, total / proxies * 1000


def sort_ms(db: Database) -> float:
    started = time.perf_counter()
    with db.connect() as conn:
        dash.pool_page(conn, dash.PoolFilter(), "reliability", True, 0, 50)
    return (time.perf_counter() - started) * 1000


def bench(label: str, url: str, args: argparse.Namespace) -> list[str]:
    db = open_database(url)
    try:
        t = time.perf_counter()
        seed(db, args.proxies, args.n)
        rows = [f"| {label} | seed ({args.n} checks + {args.n} uses each) | "
                f"{time.perf_counter() - t:.1f} s | |"]  # fmt: skip
        for i, size in enumerate(int(b) for b in args.batches.split(",")):
            per_batch, per_k = measure(db, args.proxies, args.n, size, 1000 + i)
            rows.append(f"| {label} | batch {size:,} | {per_batch:.1f} ms | {per_k:.1f} ms |")
        rows.append(f"| {label} | sort {args.proxies:,} by reliability | {sort_ms(db):.1f} ms | |")
        return rows
    finally:
        db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proxies", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batches", default="50,1000,10000")
    ap.add_argument("--pg", help="a PostgreSQL server URL (a scratch database is made there)")
    args = ap.parse_args()
    print(f"{args.proxies:,} proxies, N = {args.n}")
    print("| database | what | per batch | per 1,000 proxies |\n|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for row in bench("DuckDB", f"duckdb:///{tmp}/h.duckdb", args):
            print(row, flush=True)
    if args.pg:
        name = f"ff_bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            for row in bench("PostgreSQL", args.pg.rsplit("/", 1)[0] + "/" + name, args):
                print(row, flush=True)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()

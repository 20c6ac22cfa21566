"""The metrics endpoint's cost per scrape over big logs (prints a table).

    python bench/metrics.py [--rows 1000000] [--repeat 5] [--pg postgresql://…]

Fills a temporary DuckDB file (``console.testing.seed_history`` and ``seed_scrape_history``:
``--rows`` proxy checks and ``--rows`` fetch-log rows spread over 24 h) and, with ``--pg``, a
fresh PostgreSQL schema (the same row counts through ``generate_series``, plus ``--rows``
backfill items), then times one whole collection (every query ``/metrics`` runs) ``--repeat``
times. The yardstick is the scrape interval: Prometheus' default is 15 s, and the cost is
the share of it one scrape takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INTERVAL_S = 15.0


def time_collect(db: object, repeat: int) -> list[float]:
    from prometheus_client import generate_latest

    from engine.metrics import registry_for

    registry = registry_for(db)  # type: ignore[arg-type]
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        generate_latest(registry)
        out.append(time.perf_counter() - t)
    return out


def duckdb_case(rows: int, repeat: int) -> list[float]:
    from console.testing import seed_history, seed_scrape_history
    from engine.cli.common import open_database
    from engine.jobs import components

    with tempfile.TemporaryDirectory() as d:
        db = open_database(f"duckdb:///{d}/m.duckdb", components=components())
        try:
            seed_history(db, proxies=rows // 10, checks_per_run=rows // 10, runs=10, errors=10_000)
            seed_scrape_history(db, runs=10, pages_per_run=10_000, entities=1_000, fetch_logs=rows)
            return time_collect(db, repeat)
        finally:
            db.dispose()


def pg_case(url: str, rows: int, repeat: int) -> list[float]:
    import sqlalchemy as sa

    from engine.cli.common import open_database
    from engine.jobs import components

    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()
    db = open_database(url, components=components())
    try:
        with db.begin() as conn:
            x = conn.execute
            x(
                sa.text("""INSERT INTO runs (kind, status, params, total_items, total_tasks,
                coordinator, created_at, updated_at) SELECT k, 'completed', '{}', 0, 0, 'b',
                now(), now() FROM unnest(ARRAY['validate','scrape','backfill']) k""")
            )
            x(
                sa.text(f"""INSERT INTO proxy_checks (run_id, proxy_id, checked_at, outcome, alive)
                SELECT 1, g, now() - (g % 86400) * INTERVAL '1 second', 'alive', true
                FROM generate_series(1, {rows}) g""")
            )
            x(
                sa.text(f"""INSERT INTO fetch_logs (run_id, url, method, status, bytes, ms,
                blocked_reason, created_at)
                SELECT 2, 'http://s/' || g, (ARRAY['http','playwright','tor'])[1 + g % 3], 200,
                1000, 50, CASE WHEN g % 10 = 0 THEN 'challenge' END,
                now() - (g % 86400) * INTERVAL '1 second' FROM generate_series(1, {rows}) g""")
            )
            x(
                sa.text(f"""INSERT INTO backfill_items (run_id, item_id, status, outcome,
                attempts, fetched_at) SELECT 3, 'i' || g, 'ok', 'ok', 1,
                now() - (g % 86400) * INTERVAL '1 second' FROM generate_series(1, {rows}) g""")
            )
            x(
                sa.text(f"""INSERT INTO errors (run_id, error_type, message, created_at)
                SELECT 2, 'timeout', 'x', now() - (g % 86400) * INTERVAL '1 second'
                FROM generate_series(1, {rows // 10}) g""")
            )
        with db.begin() as conn:  # as autovacuum would have: the planner needs the stats
            conn.execute(sa.text("ANALYZE"))
        return time_collect(db, repeat)
    finally:
        db.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pg", help="a PostgreSQL URL whose public schema may be dropped")
    args = ap.parse_args()
    cases = [("duckdb", duckdb_case(args.rows, args.repeat))]
    if args.pg:
        cases.append(("postgresql", pg_case(args.pg, args.rows, args.repeat)))
    print(f"\n/metrics collection over {args.rows:,}-row logs ({args.repeat} scrapes)\n")
    print(f"{'database':<12} {'median s':>9} {'worst s':>8} {'share of a 15 s interval':>26}")
    for name, times in cases:
        med = statistics.median(times)
        print(f"{name:<12} {med:>9.3f} {max(times):>8.3f} {med / INTERVAL_S:>25.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

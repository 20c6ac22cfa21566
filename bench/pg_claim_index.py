"""The claim's cost against a big queue, with and without a partial index (bench/RESULTS.md).

    python bench/pg_claim_index.py [TASKS=200000] [DONE_FRACTION=0.5]

Creates its own database (fetchfleet_bench_idx) with one running run of TASKS tasks, the
first DONE_FRACTION of them done, drops the two partial indexes schema step 11 creates
(``(run_id, seq) WHERE status = 'queued'`` and ``(lease_until) WHERE status = 'leased'``),
times ``storage.queue.claim`` (7 tasks, rolled back) and the watchdog's ``expired_leases``
(median of 30), prints the claim's plan, then adds them back and measures again. Drops the database at the end.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sqlalchemy as sa

from storage import queue as q
from storage import runs
from storage.db import open_database

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/"
admin = sa.create_engine(URL + "postgres", isolation_level="AUTOCOMMIT")
with admin.connect() as c:
    c.execute(sa.text("DROP DATABASE IF EXISTS fetchfleet_bench_idx WITH (FORCE)"))
    c.execute(sa.text("CREATE DATABASE fetchfleet_bench_idx"))
db = open_database(URL + "fetchfleet_bench_idx")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
DONE = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
with db.begin() as conn:
    rid = runs.create_run(conn, "backfill", {}, "x")
    conn.execute(
        sa.text(
            "INSERT INTO tasks (run_id, seq, status, items, n_items, max_attempts, created_at) "
            "SELECT :r, g, CASE WHEN g < :d THEN 'done' ELSE 'queued' END, '[\"a\"]', 50, 3, now() "
            "FROM generate_series(0, :n - 1) g"
        ),
        {"r": rid, "n": N, "d": int(N * DONE)},
    )
    runs.start_run(conn, rid)
with db.begin() as conn:  # "before": without the indexes schema step 11 creates
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_tasks_queued"))
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_tasks_leased"))
    conn.execute(sa.text("ANALYZE tasks"))


def claim_ms(reps=30):
    out = []
    for i in range(reps):
        with db.begin() as conn:
            t = time.perf_counter()
            q.claim(conn, f"w{i}", 7, 30.0)
            out.append((time.perf_counter() - t) * 1000)
            conn.rollback()
    return statistics.median(out)


def watchdog_ms(reps=30):
    out = []
    for _ in range(reps):
        with db.begin() as conn:
            t = time.perf_counter()
            q.expired_leases(conn)
            out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def plan(sql):
    with db.begin() as conn:
        return "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS) " + sql)))


CLAIM_SELECT = (
    "SELECT t.id FROM tasks t JOIN runs r ON r.id = t.run_id WHERE r.status = 'running' "
    "AND t.status = 'queued' AND (t.available_at IS NULL OR t.available_at <= now()) "
    "ORDER BY t.run_id, t.seq LIMIT 7 FOR UPDATE OF t SKIP LOCKED"
)
print(f"tasks {N:,}, done {DONE:.0%}")
print(f"before: claim {claim_ms():.2f} ms, watchdog {watchdog_ms():.2f} ms")
print(plan(CLAIM_SELECT))
with db.begin() as conn:
    conn.execute(
        sa.text("CREATE INDEX ix_tasks_queued ON tasks (run_id, seq) WHERE status = 'queued'")
    )
    conn.execute(
        sa.text("CREATE INDEX ix_tasks_leased ON tasks (lease_until) WHERE status = 'leased'")
    )
    conn.execute(sa.text("ANALYZE tasks"))
print(f"after:  claim {claim_ms():.2f} ms, watchdog {watchdog_ms():.2f} ms")
print(plan(CLAIM_SELECT))
db.dispose()
with admin.connect() as c:
    c.execute(sa.text("DROP DATABASE IF EXISTS fetchfleet_bench_idx WITH (FORCE)"))

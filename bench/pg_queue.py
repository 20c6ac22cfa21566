"""PostgreSQL as the shared queue: what one database serves to 1, 4, 16, 64 workers.

    python bench/pg_queue.py [--db postgresql://postgres@127.0.0.1:5432/postgres]
                             [--workers 1,4,16,64] [--kinds validate,backfill,scrape]
                             [--items 100000] [--pages 6000] [--processes 4] [--idle-s 3]
                             [--out bench/out/pg_queue.json] [--keep-db]

Each configuration is one run of a kind with a fixed item count, planned into tasks of 50
(the default batch size), worked by N workers: the real ``engine.runtime.worker.Worker`` loop
(claim, heartbeat every 3 s, flush every 0.5 s, complete, unregister) over the real
``engine.queue.sql.SqlQueue`` on PostgreSQL, storing through the kind's own ``store`` /
``store_batch``. Only the executor is simulated: it answers at once with a result of the
kind's real shape, so the database is the bottleneck:

* **validate**: one ``proxy_checks`` row per proxy (and the proxy's columns folded back);
* **backfill**: one ``backfill_items`` row per ID, with a 600-byte JSON body;
* **scrape**: one page per item (a catalog page of the sim shops: 20 entities of 6 attributes,
  one fetch attempt, no links), stored as ``urls`` + ``entities`` + attributes + ``fetch_logs``.

The N workers live in up to ``--processes`` processes (one asyncio loop each, one database
engine per worker with ONE pooled connection: 64 workers x the 2-3 connections a deployed
worker may hold would pass PostgreSQL's default ``max_connections`` of 100). Before the run
starts they sit idle for ``--idle-s`` (polling for work every 0.2 s, as deployed workers do):
that phase is measured too.

Measured per configuration, from the run's start to its last task done: items/s, task claims/s,
result rows/s (all tables the kind writes); **round trips per item**, counted in the workers
with SQLAlchemy event hooks (statements, plus BEGIN and COMMIT — psycopg 3 sends each on its own
— plus the pool's pre-ping ``SELECT 1`` per checkout, plus each COPY of a staged batch); and
**CPU ms per item** of the database's backends serving the workers (/proc of the pids in
``pg_stat_activity``) and of the worker processes. The bench creates its own database
(``fetchfleet_bench_pgq``) and drops it at the end. Other people's jobs share the machine: the
load average before and after each configuration is printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backfill import loadavg  # noqa: E402
from bench.validate import code_state  # noqa: E402

BENCH_DB = "fetchfleet_bench_pgq"
TICK = os.sysconf("SC_CLK_TCK")
BATCH = 50
# shared counters, one block per worker process
(STMT, BEGIN, COMMIT, CHECKOUT, COPY, CLAIMS, EMPTY, CLAIMED, BEATS, SUBMITS, REGISTERED) = range(
    11
)
SLOTS = 11


# --------------------------------------------------------------------------- worker side


def _page(item: Any) -> dict[str, Any]:
    from storage.scrape_rows import PageResult

    entities = [
        (
            f"p{item.id}-{k}",
            f"{item.id * 31 + k:016x}",
            [
                ("id", f"p{item.id}-{k}", "str"),
                ("name", f"Product {item.id}-{k}", "str"),
                ("price", f"{10 + k}.99", "float"),
                ("currency", "MYR", "str"),
                ("sku", f"SKU-{item.id:08d}-{k}", "str"),
                ("category", "vitamins", "str"),
            ],
            None,
        )
        for k in range(20)
    ]
    now = datetime.now(UTC).replace(tzinfo=None)
    page = PageResult(
        url_id=item.id, url=item.url, depth=item.depth, country=item.country, status="done",
        method="http", http_status=200, bytes=24_000, fetched_at=now, entities=entities,  # type: ignore[arg-type]
        attempts=[("http", None, 200, 24_000, 12.5, None, None)],
    )  # fmt: skip
    return {"page": page.to_wire()}


BODY = json.dumps({"id": "x", "name": "n" * 200, "tags": ["a"] * 40, "note": "z" * 200})


class SimExecutor:
    """Answers at once with a result of the kind's real shape."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def execute(self, item: Any) -> tuple[bool, str, dict[str, Any]]:
        now = datetime.now(UTC).replace(tzinfo=None)
        if self.kind == "validate":
            alive = item.id % 5 < 2
            return alive, "alive" if alive else "refused", {
                "checked_at": now, "protocol": "http" if alive else None,
                "latency_ms": 123.4 if alive else None, "anonymity": "elite" if alive else None,
                "exit_ip": "127.0.0.9" if alive else None, "country": "MY" if alive else None,
                "error": None if alive else "connection refused",
            }  # fmt: skip
        if self.kind == "backfill":
            return True, "ok", {
                "http_status": 200, "body": BODY, "error": None, "attempts": 1,
                "fetched_at": now, "elapsed_ms": 12.5,
            }  # fmt: skip
        return True, "done", _page(item)

    def error_data(self, item: Any, error: str) -> dict[str, Any]:
        return {"error": error}

    async def aclose(self) -> None:
        return None


def _patch_kinds() -> None:
    from engine.jobs.backfill.kind import BackfillJob
    from engine.jobs.scrape.kind import ScrapeJob
    from engine.jobs.validate.kind import ValidateJob

    for cls in (ValidateJob, BackfillJob, ScrapeJob):

        async def open_executor(self: Any, params: dict[str, Any], env: Any) -> Any:
            return SimExecutor(self.name)

        cls.open_executor = open_executor  # type: ignore[method-assign]


def _count_copies(counters: Any, base: int) -> None:
    """Each staged batch on PostgreSQL is a COPY on the raw driver connection, which
    SQLAlchemy's events do not see: counted here."""
    import storage.bulk as bulk

    real = bulk._copied

    def counted(*a: Any, **kw: Any) -> Any:
        counters[base + COPY] += 1
        return real(*a, **kw)

    bulk._copied = counted  # type: ignore[assignment]


def _database(url: str, counters: Any, base: int) -> Any:
    """A worker's own engine, as ``storage.db.open_database`` builds it for PostgreSQL but
    with one pooled connection, its round trips counted."""
    import sqlalchemy as sa

    from storage.db import Database

    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=0)

    def bump(i: int) -> Any:
        def hook(*_a: Any, **_kw: Any) -> None:
            counters[base + i] += 1

        return hook

    sa.event.listen(engine, "before_cursor_execute", bump(STMT))
    sa.event.listen(engine, "begin", bump(BEGIN))
    sa.event.listen(engine, "commit", bump(COMMIT))
    sa.event.listen(engine, "checkout", bump(CHECKOUT))
    return Database(engine=engine, url=url)


def worker_process(
    url: str, settings: dict[str, Any], ids: list[str], counters: Any, base: int, stop: Any
) -> None:
    """Run ``ids`` workers in one asyncio loop until ``stop`` is set."""
    import logging

    from engine.queue.sql import SqlQueue
    from engine.runtime.worker import Worker
    from engine.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    _patch_kinds()
    _count_copies(counters, base)
    conf = Settings(**settings)

    class CountingQueue(SqlQueue):
        def register(self, *a: Any) -> None:
            super().register(*a)
            counters[base + REGISTERED] += 1

        def claim(self, *a: Any, **kw: Any) -> Any:
            reply = super().claim(*a, **kw)
            counters[base + CLAIMS] += 1
            counters[base + CLAIMED] += len(reply.tasks)
            counters[base + EMPTY] += not reply.tasks
            return reply

        def heartbeat(self, *a: Any) -> Any:
            counters[base + BEATS] += 1
            return super().heartbeat(*a)

        def submit(self, *a: Any) -> None:
            counters[base + SUBMITS] += 1
            super().submit(*a)

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=3 * len(ids) + 2)
        )
        workers = [
            Worker(CountingQueue(_database(url, counters, base), conf), conf, wid, kind="bench")
            for wid in ids
        ]
        runs = [asyncio.create_task(w.run()) for w in workers]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for w in workers:
            w.request_exit()
        await asyncio.gather(*runs, return_exceptions=True)

    asyncio.run(main())


# --------------------------------------------------------------------------- coordinator side


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _admin_url(url: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    from storage.db import normalize_url

    return make_url(normalize_url(url)).set(database=dbname).render_as_string(hide_password=False)


def create_bench_db(url: str) -> str:
    import sqlalchemy as sa

    admin = sa.create_engine(_admin_url(url, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {BENCH_DB}"))
    admin.dispose()
    return _admin_url(url, BENCH_DB)


def drop_bench_db(url: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(_admin_url(url, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)"))
    admin.dispose()


SPEC = """
name = "bench"
entity_type = "product"
id_field = "id"
[[sources]]
country = "Malaysia"
start_urls = ["http://127.0.0.4:8401/catalog?page=1"]
[follow]
css = ["a.next"]
max_depth = 0
[[extract]]
match = "/catalog"
list = "li.product"
[extract.fields]
id = { attr = "data-id" }
"""


def plan_run(db: Any, kind: str, n: int, settings: Any) -> tuple[int, int]:
    """A queued run of ``kind`` with ``n`` items in tasks of ``BATCH``: (run id, tasks)."""
    from storage import queue as q
    from storage import runs

    with db.begin() as conn:
        params: dict[str, Any] = {"batch_size": BATCH}
        if kind == "scrape":
            params |= {"spec_text": SPEC, "entity_type": "product", "max_pages": None}
        run_id = runs.create_run(conn, kind, params, "bench")
        refs = _refs(conn, kind, run_id, n, settings)
        batches = [refs[i : i + BATCH] for i in range(0, len(refs), BATCH)]
        q.add_tasks(conn, run_id, batches, 0, 3)
        runs.add_planned(conn, run_id, len(refs), len(batches))
    return run_id, len(batches)


def _refs(conn: Any, kind: str, run_id: int, n: int, settings: Any) -> list[Any]:
    if kind == "backfill":
        return [f"id-{run_id}-{i:07d}" for i in range(n)]
    if kind == "scrape":
        from storage.scrape import register_urls

        urls = [(f"http://127.0.0.4:8401/p/{run_id}/{i}", 0, None, "Malaysia") for i in range(n)]
        return register_urls(conn, run_id, urls, None)
    from fetchers.proxy_parse import ProxySpec
    from storage.proxies import upsert_proxies
    from storage.secrets import SecretBox

    box = SecretBox.load(settings.secret_key, settings.secret_key_file)
    specs = [
        ProxySpec("http", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 8080) for i in range(n)
    ]
    return upsert_proxies(conn, specs, box, source="bench")


def stored_rows(db: Any, kind: str, run_id: int) -> dict[str, int]:
    """Result rows the run wrote, per table."""
    import sqlalchemy as sa

    queries = {
        "validate": {"proxy_checks": "SELECT count(*) FROM proxy_checks WHERE run_id = :r"},
        "backfill": {"backfill_items": "SELECT count(*) FROM backfill_items WHERE run_id = :r"},
        "scrape": {
            "urls": "SELECT count(*) FROM urls WHERE run_id = :r AND status = 'done'",
            "entities": "SELECT count(*) FROM entities WHERE first_run_id = :r",
            "attributes": "SELECT count(*) FROM entity_attributes a JOIN entities e "
            "ON e.id = a.entity_id WHERE e.first_run_id = :r",
            "fetch_logs": "SELECT count(*) FROM fetch_logs WHERE run_id = :r",
        },
    }[kind]
    with db.connect() as conn:
        return {
            t: int(conn.execute(sa.text(s), {"r": run_id}).scalar() or 0)
            for t, s in queries.items()
        }


@dataclass
class Row:
    kind: str
    workers: int
    items: int
    tasks: int
    seconds: float
    items_per_s: float
    claims_per_s: float  # tasks claimed per second
    claim_calls_per_s: float  # claim round trips (transactions), empty ones included
    rows_per_s: float  # result rows of every table the kind writes
    round_trips_per_item: float
    statements_per_item: float
    transactions_per_item: float
    pg_cpu_ms_per_item: float  # the backends serving the workers
    worker_cpu_ms_per_item: float
    pg_cpu_busy: float  # PG backends' CPU seconds per wall second (cores)
    idle_pg_cpu: float  # cores the backends burn while N idle workers poll
    idle_round_trips_per_s: float
    connections: int
    load_before: float
    load_after: float
    stored: dict[str, int]


def _snapshot(counters: Any, procs: list[Any], pg_pids: list[int]) -> dict[str, Any]:
    n = len(procs)
    sums = [sum(counters[p * SLOTS + i] for p in range(n)) for i in range(SLOTS)]
    return {
        "t": time.monotonic(),
        "c": sums,
        "pg": sum(_cpu_s(p) for p in pg_pids),
        "w": sum(_cpu_s(p.pid) for p in procs),
    }


def _trips(c: list[int]) -> int:
    # each COPY: the COPY statement and its data + end, two round trips
    return c[STMT] + c[BEGIN] + c[COMMIT] + c[CHECKOUT] + 2 * c[COPY]


def run_config(
    url: str,
    db: Any,
    kind: str,
    n_workers: int,
    items: int,
    args: argparse.Namespace,
    settings: Any,
) -> Row:
    import sqlalchemy as sa

    load_before = loadavg()
    run_id, n_tasks = plan_run(db, kind, items, settings)
    ctx = mp.get_context("spawn")
    n_procs = min(n_workers, args.processes)
    counters = ctx.Array("q", SLOTS * n_procs, lock=False)
    stop = ctx.Event()
    ids = [f"bench-{kind}-{n_workers}-{i}" for i in range(n_workers)]
    procs = [
        ctx.Process(
            target=worker_process,
            args=(
                url,
                settings.model_dump(mode="json"),
                ids[p::n_procs],
                counters,
                p * SLOTS,
                stop,
            ),
            daemon=True,
        )
        for p in range(n_procs)
    ]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + args.timeout
        while sum(counters[p * SLOTS + REGISTERED] for p in range(n_procs)) < n_workers:
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError(f"{kind} x{n_workers}: workers did not all register")
            time.sleep(0.1)
        time.sleep(1.0)  # every worker in its polling loop
        with db.connect() as conn:
            pids = [
                int(r[0])
                for r in conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    )
                )
            ]
        idle0 = _snapshot(counters, procs, pids)
        time.sleep(args.idle_s)
        idle1 = _snapshot(counters, procs, pids)
        idle_wall = idle1["t"] - idle0["t"]
        with db.begin() as conn:
            from storage import runs

            runs.start_run(conn, run_id)
        s0 = _snapshot(counters, procs, pids)
        done_sql = sa.text("SELECT count(*) FROM tasks WHERE run_id = :r AND status = 'done'")
        while True:
            with db.connect() as conn:
                if int(conn.execute(done_sql, {"r": run_id}).scalar() or 0) >= n_tasks:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} x{n_workers}: not done within {args.timeout} s")
            time.sleep(0.05)
        s1 = _snapshot(counters, procs, pids)
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    stored = stored_rows(db, kind, run_id)
    wall = s1["t"] - s0["t"]
    c = [b - a for a, b in zip(s0["c"], s1["c"], strict=True)]
    ic = [b - a for a, b in zip(idle0["c"], idle1["c"], strict=True)]
    rows = sum(stored.values())  # a page's urls row is updated, not inserted: still a write
    return Row(
        kind=kind,
        workers=n_workers,
        items=items,
        tasks=n_tasks,
        seconds=round(wall, 2),
        items_per_s=round(items / wall, 1),
        claims_per_s=round(c[CLAIMED] / wall, 1),
        claim_calls_per_s=round(c[CLAIMS] / wall, 1),
        rows_per_s=round(rows / wall, 1),
        round_trips_per_item=round(_trips(c) / items, 3),
        statements_per_item=round(c[STMT] / items, 3),
        transactions_per_item=round(c[COMMIT] / items, 3),
        pg_cpu_ms_per_item=round((s1["pg"] - s0["pg"]) * 1000 / items, 3),
        worker_cpu_ms_per_item=round((s1["w"] - s0["w"]) * 1000 / items, 3),
        pg_cpu_busy=round((s1["pg"] - s0["pg"]) / wall, 2),
        idle_pg_cpu=round((idle1["pg"] - idle0["pg"]) / idle_wall, 3),
        idle_round_trips_per_s=round(_trips(ic) / idle_wall, 1),
        connections=len(pids),
        load_before=load_before,
        load_after=loadavg(),
        stored=stored,
    )


def table(rows: list[Row]) -> str:
    head = (
        "| kind | workers | items | s | items/s | task claims/s | claim calls/s | result rows/s "
        "| round trips/item | statements/item | PG CPU ms/item | worker CPU ms/item "
        "| PG cores busy | idle: PG cores, round trips/s | load before/after |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    lines = [
        f"| {r.kind} | {r.workers} | {r.items:,} | {r.seconds} | {r.items_per_s:,.0f} "
        f"| {r.claims_per_s:,.0f} | {r.claim_calls_per_s:,.0f} | {r.rows_per_s:,.0f} "
        f"| {r.round_trips_per_item:.2f} | {r.statements_per_item:.2f} "
        f"| {r.pg_cpu_ms_per_item:.3f} | {r.worker_cpu_ms_per_item:.3f} | {r.pg_cpu_busy:.2f} "
        f"| {r.idle_pg_cpu:.3f}, {r.idle_round_trips_per_s:,.0f} "
        f"| {r.load_before:.1f} / {r.load_after:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--db", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--workers", default="1,4,16,64")
    ap.add_argument("--kinds", default="validate,backfill,scrape")
    ap.add_argument("--items", type=int, default=100_000, help="per validate/backfill run")
    ap.add_argument("--pages", type=int, default=6_000, help="per scrape run")
    ap.add_argument("--processes", type=int, default=4, help="worker processes at most")
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=180.0, help="per configuration")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "pg_queue.json"))
    ap.add_argument("--keep-db", action="store_true")
    args = ap.parse_args()

    from cryptography.fernet import Fernet

    from engine.settings import Settings
    from storage.db import open_database

    settings = Settings(secret_key=Fernet.generate_key().decode(), batch_size=BATCH)
    url = create_bench_db(args.db)
    db = open_database(url)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    rows: list[Row] = []
    try:
        for kind in args.kinds.split(","):
            items = args.pages if kind == "scrape" else args.items
            for n in (int(x) for x in args.workers.split(",")):
                row = run_config(url, db, kind, n, items, args, settings)
                print(table([row]).splitlines()[-1], flush=True)
                rows.append(row)
    finally:
        db.dispose()
        if not args.keep_db:
            drop_bench_db(args.db)
    print()
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"started": started, "code": code_state(), "cpus": os.cpu_count(),
             "rows": [asdict(r) for r in rows]},
            indent=1,
        )
    )  # fmt: skip


if __name__ == "__main__":
    random.seed(1)
    main()

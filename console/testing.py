"""Helpers for the console's tests and its benchmark: drive pages with Streamlit's AppTest
and fill a DuckDB database with synthetic fleet history in bulk SQL.

Not used by the console itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from storage.clock import utcnow
from storage.db import Database
from storage.proxy_history import backfill_checks

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
# page -> its file relative to app.py (None: the Home page, app.py's default)
FLEET_PAGES: dict[str, str | None] = {
    "Home": None,
    "Workers": "pages/workers.py",
    "Runs & errors": "pages/runs.py",
    "Schedules": "pages/schedules.py",
    "Alerts": "pages/alerts.py",
    "Gateway": "pages/gateway.py",
    "Data & export": "pages/data.py",
    "Settings": "pages/settings.py",
}


def pages() -> dict[str, str | None]:
    """Every page the console shows: the fleet's and each registered kind's."""
    from engine.jobs import kinds

    jobs = {i.page.title: i.page.path for i in kinds().values() if i.page is not None}
    return {**FLEET_PAGES, **jobs}


PAGES = pages()

COUNTRIES = ["US", "DE", "FR", "NL", "GB", "RU", "IN", "BR", "CN", "JP", "SG", "MY", "AR", "CA"]
OUTCOMES = ["alive", "timeout", "refused", "bad_response", "alive", "alive", "unreachable"]


def use_fresh_database(tmp_path: Path, monkeypatch: Any, workers: int = 0) -> str:
    """Point the console at a new DuckDB file and data directory (pytest's monkeypatch);
    returns the URL. Release the console afterwards with ``resources.shutdown_all()``."""
    url = f"duckdb:///{tmp_path / 'console.duckdb'}"
    monkeypatch.setenv("FETCHFLEET_DB", url)
    monkeypatch.setenv("FETCHFLEET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FETCHFLEET_SECRET_KEY_FILE", str(tmp_path / "data" / "secret.key"))
    monkeypatch.setenv("FETCHFLEET_WORKERS", str(workers))
    for name in ("FETCHFLEET_SECRET_KEY", "FETCHFLEET_JUDGE_URL", "POSTGRES_HOST"):
        monkeypatch.delenv(name, raising=False)
    return url


def run_page(page: str | None = None, timeout: float = 60) -> Any:
    """An AppTest of the console showing ``page`` (a path like pages/runs.py, or Home)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=timeout).run()
    if page is not None:
        at.switch_page(page).run()
    return at


def _list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _insert_runs(
    conn: sa.Connection, kind: str, params: str, runs: int, items: int, now: Any
) -> None:
    """``runs`` completed runs of ``kind``, one an hour up to ``now``, 50 items a task."""
    conn.execute(
        sa.text(
            f"""INSERT INTO runs (kind, status, params, total_items, total_tasks, coordinator,
                created_at, started_at, finished_at, updated_at)
            SELECT :kind, 'completed', :params, {items}, {-(-items // 50)}, 'bench:1',
                   CAST(:now AS TIMESTAMP) - INTERVAL '1 hour' * ({runs} - i),
                   CAST(:now AS TIMESTAMP) - INTERVAL '1 hour' * ({runs} - i),
                   CAST(:now AS TIMESTAMP) - INTERVAL '1 hour' * ({runs} - i)
                       + INTERVAL '50 minute',
                   CAST(:now AS TIMESTAMP)
            FROM range({runs}) t(i)"""
        ),
        {"kind": kind, "params": params, "now": now},
    )


def seed_history(
    db: Database,
    proxies: int = 1_000,
    checks_per_run: int | None = None,
    runs: int = 10,
    errors: int = 1_000,
    workers: int = 4,
) -> dict[str, int]:
    """Synthetic history in bulk ``INSERT … SELECT … FROM range(n)`` (DuckDB only).

    ``runs`` completed validate runs, each checking ``checks_per_run`` proxies (default: all
    of them, so rows = runs × proxies) spread over the last 24 hours with a share in the last
    hour; the pool's state; tasks of 50 items; ``errors`` error-log rows; live workers.
    """
    if not db.is_duckdb:
        raise ValueError("seed_history writes DuckDB SQL (range(n)); use a DuckDB database")
    per_run = proxies if checks_per_run is None else min(checks_per_run, proxies)
    now = utcnow()
    p = {"now": now}
    countries, outcomes = _list(COUNTRIES), _list(OUTCOMES)
    with db.begin() as conn:
        x = conn.execute
        _insert_runs(conn, "validate", '{"judge_url": "http://judge/get"}', runs, per_run, now)
        x(
            sa.text(
                f"""INSERT INTO proxies (key, scheme, protocol, host, port, status, anonymity,
                    exit_ip, country, latency_ms, latency_ewma_ms, success_count, failure_count,
                    last_outcome, last_checked, source, created_at)
                SELECT 'socks5://10.' || (i // 65536) || '.' || ((i // 256) % 256) || '.'
                           || (i % 256) || ':' || (1024 + i % 60000),
                       ['http', 'https', 'socks4', 'socks5'][1 + (i % 4)::INT],
                       ['http', 'https', 'socks4', 'socks5'][1 + (i % 4)::INT],
                       '10.' || (i // 65536) || '.' || ((i // 256) % 256) || '.' || (i % 256),
                       1024 + i % 60000,
                       CASE WHEN i % 3 = 0 THEN 'inactive' ELSE 'active' END,
                       CASE WHEN i % 3 = 0 THEN NULL
                            ELSE ['elite', 'anonymous', 'transparent'][1 + (i % 7 % 3)::INT] END,
                       CASE WHEN i % 3 = 0 THEN NULL ELSE '10.0.0.' || (i % 250) END,
                       {countries}[1 + (hash(i) % {len(COUNTRIES)})::INT],
                       CASE WHEN i % 3 = 0 THEN NULL ELSE 20 + (hash(i) % 3000) END,
                       CASE WHEN i % 3 = 0 THEN NULL ELSE 20 + (hash(i) % 2500) END,
                       {runs} - (i % 3 = 0)::INT * {runs}, (i % 3 = 0)::INT * {runs},
                       CASE WHEN i % 3 = 0 THEN 'timeout' ELSE 'alive' END,
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 second' * (i % 86400),
                       'bench.txt', CAST(:now AS TIMESTAMP) - INTERVAL '1 day'
                FROM range({proxies}) t(i)"""
            ),
            p,
        )
        x(
            sa.text(
                f"""INSERT INTO proxy_checks (run_id, proxy_id, task_id, worker_id, checked_at,
                    outcome, alive, protocol, latency_ms, anonymity, exit_ip, country, error)
                SELECT r.id, i + 1, NULL, 'w-' || (i % {max(workers, 1)}),
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 second' * ((i * 7 + r.id) % 86400),
                       {outcomes}[1 + (hash(i + r.id) % {len(OUTCOMES)})::INT],
                       {outcomes}[1 + (hash(i + r.id) % {len(OUTCOMES)})::INT] = 'alive',
                       ['http', 'https', 'socks4', 'socks5'][1 + (i % 4)::INT],
                       20 + hash(i * 31 + r.id) % 3000, NULL, NULL,
                       {countries}[1 + (hash(i) % {len(COUNTRIES)})::INT],
                       CASE WHEN hash(i + r.id) % 3 = 0 THEN 'TimeoutError: no answer in 5s' END
                FROM runs r, range({per_run}) t(i)
                WHERE r.kind = 'validate'"""
            ),
            p,
        )
        backfill_checks(conn)  # each proxy's history, as schema step 12 seeds it
        x(
            sa.text(
                f"""INSERT INTO tasks (run_id, seq, status, items, n_items, attempts,
                    max_attempts, created_at, updated_at)
                SELECT r.id, i, 'done', '[]', 50, 1 + (i % 20 = 0)::INT, 3,
                       r.created_at, r.finished_at
                FROM runs r, range({-(-per_run // 50)}) t(i)"""
            )
        )
        x(
            sa.text(
                f"""INSERT INTO errors (run_id, task_id, worker_id, item_key, error_type, message,
                    created_at)
                SELECT 1 + i % {runs}, NULL, 'w-' || (i % {max(workers, 1)}), 'line ' || i,
                       ['bad_input', 'task_failed'][1 + (i % 2)::INT],
                       'synthetic error ' || i,
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 second' * ((i * 13) % 86400)
                FROM range({errors}) t(i)"""
            ),
            p,
        )
        x(
            sa.text(
                f"""INSERT INTO workers (id, host, pid, kind, status, started_at, heartbeat_at,
                    tasks_held, items_done, items_failed)
                SELECT 'w-' || i, 'bench-host', 1000 + i, 'remote', 'idle',
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 day', CAST(:now AS TIMESTAMP),
                       NULL, {per_run * runs} // {max(workers, 1)}, 0
                FROM range({workers}) t(i)"""
            ),
            p,
        )
    return {"proxies": proxies, "proxy_checks": per_run * runs, "runs": runs, "errors": errors}


SCRAPE_METHODS = ["http", "http", "http", "playwright", "selenium", "tor", "api"]
PAGE_STATUSES = ["done"] * 8 + ["blocked", "failed"]
FETCH_ERRORS = ["NULL"] * 7 + ["'blocked'", "'timeout'", "'server_error'"]
BLOCK_REASONS = ["cf-challenge", "captcha", "access-denied", "empty-body"]


def seed_scrape_history(
    db: Database,
    runs: int = 3,
    pages_per_run: int = 100,
    entities: int = 500,
    attributes: int = 5,
    fetch_logs: int = 1_000,
) -> dict[str, int]:
    """Synthetic scrape runs in bulk ``INSERT … SELECT … FROM range(n)`` (DuckDB only):
    ``runs`` completed scrape runs with ``pages_per_run`` pages each (mostly done, some
    blocked or failed, their winning methods mixed per country), ``entities`` entities with
    ``attributes`` attributes each (spread over the runs), and ``fetch_logs`` fetch attempts
    spread over the runs and the last 24 hours (blocked ones with a reason)."""
    if not db.is_duckdb:
        raise ValueError("seed_scrape_history writes DuckDB SQL (range(n)); use a DuckDB database")
    now = utcnow()
    p = {"now": now}
    countries = _list(COUNTRIES[:6])
    methods, statuses = _list(SCRAPE_METHODS), _list(PAGE_STATUSES)
    reasons = _list(BLOCK_REASONS)
    errs = "[" + ", ".join(FETCH_ERRORS) + "]"
    nc, nm = 6, len(SCRAPE_METHODS)
    with db.begin() as conn:
        x = conn.execute
        _insert_runs(
            conn, "scrape", '{"spec_name": "bench", "countries": []}', runs, pages_per_run, now
        )
        ids = [
            int(r[0])
            for r in conn.execute(
                sa.text("SELECT id FROM runs WHERE kind = 'scrape' ORDER BY id")
            ).fetchall()
        ][-runs:]
        first, last = ids[0], ids[-1]
        x(
            sa.text(
                f"""INSERT INTO urls (run_id, url, country, depth, status, method, http_status,
                    bytes, entities, error_type, fetched_at, created_at)
                SELECT r.id, 'https://shop-' || (i % {nc}) || '.example/catalog?page=' || i,
                       {countries}[1 + (i % {nc})::INT], i // {nc},
                       {statuses}[1 + (hash(i + r.id) % {len(PAGE_STATUSES)})::INT],
                       {methods}[1 + (hash(i * 7 + r.id) % {nm})::INT],
                       200, 20000 + hash(i) % 30000, 20, NULL,
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 second' * ((i * 11 + r.id) % 86400),
                       r.created_at
                FROM runs r, range({pages_per_run}) t(i)
                WHERE r.id BETWEEN {first} AND {last}"""
            ),
            p,
        )
        x(
            sa.text(
                """UPDATE urls SET error_type = status, error = status || ' page'
                WHERE status <> 'done' AND run_id BETWEEN :first AND :last"""
            ),
            {"first": first, "last": last},
        )
        x(
            sa.text(
                f"""INSERT INTO entities (entity_type, country, external_id, content_hash,
                    source_url, first_run_id, last_run_id, first_seen, last_seen)
                SELECT 'product', {countries}[1 + ((i // {runs}) % {nc})::INT],
                       'P-' || lpad(i::VARCHAR, 7, '0'),
                       md5(i::VARCHAR), 'https://shop-' || (i % {nc}) || '.example/catalog',
                       CASE WHEN i % 2 = 0 THEN {first} + (i % {runs}) ELSE {first} END,
                       {first} + (i % {runs}),
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 day',
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 second' * (i % 3600)
                FROM range({entities}) t(i)"""
            ),
            p,
        )
        names = _list(["id", "name", "price", "currency", "sku", "category", "brand"][:attributes])
        types = _list(["str", "str", "float", "str", "str", "str", "str"][:attributes])
        x(
            sa.text(
                f"""INSERT INTO entity_attributes (entity_id, name, value, value_type)
                SELECT e.id, {names}[1 + a::INT],
                       CASE a WHEN 0 THEN e.external_id
                              WHEN 2 THEN ((hash(e.id) % 100000) / 100.0)::VARCHAR
                              ELSE {names}[1 + a::INT] || ' ' || e.id END,
                       {types}[1 + a::INT]
                FROM entities e, range({attributes}) t(a)
                WHERE e.last_run_id BETWEEN {first} AND {last}"""
            ),
        )
        x(
            sa.text(
                f"""INSERT INTO fetch_logs (run_id, task_id, url, method, proxy, status, bytes, ms,
                    error_type, blocked_reason, country, created_at)
                SELECT {first} + (i % {runs}), i // 50,
                       'https://shop-' || (i % {nc}) || '.example/catalog?page=' || (i // {runs}),
                       {methods}[1 + (hash(i) % {nm})::INT], NULL,
                       CASE WHEN hash(i * 3) % 10 < 7 THEN 200 WHEN hash(i * 3) % 10 = 7 THEN 403
                            ELSE 503 END,
                       20000 + hash(i) % 30000, 30 + hash(i * 13) % 3000,
                       {errs}[1 + (hash(i * 3) % 10)::INT],
                       CASE WHEN hash(i * 3) % 10 = 7
                            THEN {reasons}[1 + (hash(i * 5) % {len(BLOCK_REASONS)})::INT] END,
                       {countries}[1 + (i % {nc})::INT],
                       CAST(:now AS TIMESTAMP) - INTERVAL '1 second' * ((i * 7) % 86400)
                FROM range({fetch_logs}) t(i)"""
            ),
            p,
        )
    return {
        "scrape_runs": runs,
        "urls": runs * pages_per_run,
        "entities": entities,
        "entity_attributes": entities * attributes,
        "fetch_logs": fetch_logs,
    }

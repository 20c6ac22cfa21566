"""storage.dashboard: the console's SQL aggregates, on DuckDB and PostgreSQL alike."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage import dashboard as dash
from storage import proxies as proxy_store
from storage import queue as q
from storage import runs as run_store
from storage.clock import utcnow
from storage.db import Database
from storage.schema import errors, workers
from storage.secrets import SecretBox


@dataclass
class Spec:
    key: str
    scheme: str | None
    host: str
    port: int
    username: str | None = None
    password: str | None = None


def seed(db: Database, tmp_path: Path, n: int = 12) -> dict[str, int]:
    """n proxies, one validate run over all of them: 2/3 alive, spread over protocols."""
    now = utcnow()
    box = SecretBox.load(None, tmp_path / "k")
    specs = [
        Spec(f"{p}://u@10.0.0.{i}:80{i:02d}", p, f"10.0.0.{i}", 8000 + i, "u", "s3cret")
        for i, p in zip(range(n), ["http", "socks5", "socks4"] * n, strict=False)
    ]
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(conn, specs, box, "t")
        run_id = run_store.create_run(conn, "validate", {"judge_url": "x"}, "t")
        q.add_tasks(conn, run_id, [ids[:6], ids[6:]], 0, 3)
        run_store.add_planned(conn, run_id, n, 2)
        run_store.start_run(conn, run_id)
        rows = []
        for k, pid in enumerate(ids):
            alive = k % 3 != 2
            rows.append(
                (
                    run_id,
                    pid,
                    1,
                    "w1" if k % 2 else "w2",
                    now - timedelta(seconds=k * 5),
                    "alive" if alive else "timeout",
                    alive,
                    specs[k].scheme,
                    40.0 + 60 * k if alive else None,
                    "elite" if alive else None,
                    specs[k].host if alive else None,
                    "DE" if k % 2 else "FR",
                    None if alive else "TimeoutError: no answer in 2s",
                )
            )
        proxy_store.store_checks(conn, rows)
        conn.execute(
            sa.insert(errors),
            [
                {
                    "run_id": run_id,
                    "item_key": f"line {i}",
                    "error_type": "bad_input",
                    "message": f"bad port {i}",
                    "created_at": now,
                }
                for i in range(4)
            ],
        )
        conn.execute(
            sa.text("UPDATE tasks SET attempts = 3, status = 'done' WHERE run_id = :r AND seq = 0"),
            {"r": run_id},
        )
        q.register_worker(conn, "w1", "hostA", 11, "local")
        q.touch_worker(conn, "w1", "busy", [2], done=5, failed=1)
        q.register_worker(conn, "w2", "hostB", 12, "remote")
        q.end_worker(conn, "w2", "exited", "asked to exit")
    return {"run_id": run_id, "n": n, "alive": sum(1 for k in range(n) if k % 3 != 2)}


def test_empty_database_gives_empty_answers(db: Database) -> None:
    with db.connect() as conn:
        assert dash.runs_by_status(conn) == {}
        assert dash.run_stats(conn) == []
        assert dash.throughput(conn, utcnow() - timedelta(hours=1)) == []
        assert dash.items_since(conn, utcnow() - timedelta(hours=1)) == 0
        assert dash.errors_since(conn, utcnow() - timedelta(hours=1)) == 0
        assert dash.worker_stats(conn) == []
        assert dash.workers_alive(conn, 10) == 0
        assert dash.pool_count(conn, dash.PoolFilter()) == 0
        assert dash.pool_page(conn, dash.PoolFilter())[1] == []
        assert dash.latency_histogram(conn) == []
        assert dash.alive_by(conn, "country") == []
        assert dash.table_count(conn, "proxies") == 0


def test_runs_tasks_errors_and_outcomes(db: Database, tmp_path: Path) -> None:
    s = seed(db, tmp_path)
    with db.connect() as conn:
        assert dash.runs_by_status(conn) == {"running": 1}
        (run,) = dash.run_stats(conn)
        assert (run.id, run.total, run.done, run.ok) == (s["run_id"], s["n"], s["n"], s["alive"])
        assert run.failed == s["n"] - s["alive"] and run.duration_s >= 0
        assert dash.run_stats(conn, kind="backfill") == []
        tasks = dash.task_stats(conn, s["run_id"])
        assert tasks.states == {"done": 1, "queued": 1}
        assert (tasks.retried_tasks, tasks.retries) == (1, 2)
        (bad,) = dash.error_groups(conn, s["run_id"], examples=2)
        assert (bad.name, bad.count, len(bad.examples)) == ("bad_input", 4, 2)
        assert bad.examples[0] == ("line 0", "bad port 0")
        groups = {g.name: g for g in dash.outcome_groups(conn, "validate", s["run_id"])}
        assert groups["alive"].count == s["alive"] and groups["alive"].examples == []
        key, message = groups["timeout"].examples[0]
        assert key.startswith(("http://", "socks")) and "TimeoutError" in message
        assert "s3cret" not in key
        hours = dash.errors_per_hour(conn, utcnow() - timedelta(hours=2))
        assert sum(n for _, t, n in hours if t == "bad_input") == 4
        outcomes = dash.outcomes_per_hour(conn, utcnow() - timedelta(hours=2))
        assert sum(n for _, _, n in outcomes) == s["n"]


def test_throughput_and_workers(db: Database, tmp_path: Path) -> None:
    s = seed(db, tmp_path)
    now = utcnow()
    with db.connect() as conn:
        per_minute = dash.throughput(conn, now - timedelta(hours=1), "minute")
        assert sum(n for _, n in per_minute) == s["n"]
        assert all(m.second == 0 and m.microsecond == 0 for m, _ in per_minute)
        per_second = dash.throughput(conn, now - timedelta(hours=1), "second", s["run_id"])
        assert sum(n for _, n in per_second) == s["n"] and len(per_second) == s["n"]
        assert dash.items_since(conn, now - timedelta(seconds=12)) == 3  # 0, 5 and 10 s ago
        with pytest.raises(ValueError):
            dash.throughput(conn, now, "fortnight")
        stats = {w.id: w for w in dash.worker_stats(conn, recent_s=3600)}
        assert set(stats) == {"w1", "w2"}
        w1 = stats["w1"]
        assert (w1.host, w1.pid, w1.status, w1.tasks_held) == ("hostA", 11, "busy", "2")
        assert (w1.items_done, w1.items_failed) == (5, 1) and w1.alive
        assert w1.heartbeat_age_s is not None and 0 <= w1.heartbeat_age_s < 60
        assert w1.items_per_s == pytest.approx(s["n"] // 2 / 3600, abs=0.01)
        assert not stats["w2"].alive and stats["w2"].exit_reason == "asked to exit"
        assert dash.workers_alive(conn, 60) == 1
    with db.begin() as conn:  # a worker silent for an hour is not alive, nor listed
        conn.execute(
            sa.update(workers)
            .where(workers.c.id == "w1")
            .values(heartbeat_at=utcnow() - timedelta(hours=2), status="dead")
        )
    with db.connect() as conn:
        assert dash.workers_alive(conn, 60) == 0
        assert [w.id for w in dash.worker_stats(conn, within_s=600)] == ["w2"]


def test_pool_filters_sorting_pages_and_charts(db: Database, tmp_path: Path) -> None:
    s = seed(db, tmp_path)
    with db.connect() as conn:
        everything = dash.PoolFilter()
        assert dash.pool_count(conn, everything) == s["n"]
        assert dash.pool_by_status(conn) == {"active": s["alive"], "inactive": s["n"] - s["alive"]}
        assert dash.pool_values(conn, "country") == ["DE", "FR"]
        with pytest.raises(ValueError):
            dash.pool_values(conn, "password_enc")
        cols, rows = dash.pool_page(conn, everything, "latency", False, 0, 5)
        assert "password_enc" not in cols and len(rows) == 5
        lat = [r[cols.index("latency_ms")] for r in rows]
        assert lat == sorted(lat)
        cols, rows = dash.pool_page(conn, everything, "latency", True, 0, 100)
        lat = [r[cols.index("latency_ms")] for r in rows]
        assert lat[: s["alive"]] == sorted(lat[: s["alive"]], reverse=True)
        assert all(v is None for v in lat[s["alive"] :])  # NULLs last both ways
        _, page2 = dash.pool_page(conn, everything, "id", False, 5, 5)
        assert [r[0] for r in page2] == sorted(r[0] for r in page2) and len(page2) == 5
        de = dash.PoolFilter(status="active", country="DE")
        assert dash.pool_count(conn, de) == sum(1 for k in range(s["n"]) if k % 3 != 2 and k % 2)
        assert de.pairs() == {"status": "active", "country": "DE"}
        # user input is a bound parameter: a quote is just a value that matches nothing
        evil = dash.PoolFilter(country="DE' OR '1'='1")
        assert dash.pool_count(conn, evil) == 0
        with pytest.raises(ValueError):
            dash.pool_page(conn, everything, "password_enc; DROP TABLE proxies")
        hist = dash.latency_histogram(conn, width_ms=100, buckets=4)
        assert sum(n for _, n in hist) == s["alive"]
        assert [b for b, _ in hist] == sorted(b for b, _ in hist) and hist[-1][0] <= 300
        by_proto = dict(dash.alive_by(conn, "protocol"))
        assert sum(by_proto.values()) == s["alive"] and set(by_proto) <= {
            "http",
            "socks4",
            "socks5",
        }
        by_country = dict(dash.alive_by(conn, "country"))
        top = dash.alive_by(conn, "country", limit=1)
        assert len(top) == 1 and top[0][1] == max(by_country.values())
        assert by_country[top[0][0]] == top[0][1]


def test_table_preview_never_shows_secrets(db: Database, tmp_path: Path) -> None:
    s = seed(db, tmp_path)
    with db.connect() as conn:
        cols, rows = dash.table_preview(conn, "proxies", None, limit=3)
        assert "password_enc" not in cols and len(rows) == 3
        assert dash.table_count(conn, "proxies") == s["n"]
        assert dash.table_count(conn, "proxy_checks", s["run_id"]) == s["n"]
        assert dash.table_count(conn, "proxies", s["run_id"]) == s["n"]
        assert dash.table_count(conn, "runs", s["run_id"]) == 1
        with pytest.raises(ValueError):
            dash.table_preview(conn, "workers", s["run_id"])
        with pytest.raises(ValueError):
            dash.table_preview(conn, "schema_version", None)

"""One storage contract, run on DuckDB and on PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from engine.jobs import item_logs
from storage import proxies as proxy_store
from storage import queue, runs
from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.db import Database, open_database, resolve_db_url
from storage.item_logs import outcome_counts
from storage.migrations import LATEST, current_version
from storage.secrets import SecretBox


@dataclass(frozen=True)
class Spec:
    key: str
    scheme: str | None
    host: str
    port: int
    username: str | None = None
    password: str | None = None


def box(tmp_path: Path) -> SecretBox:
    return SecretBox.load(None, tmp_path / "secret.key")


_BOX = SecretBox(Fernet(Fernet.generate_key()))


def test_schema_version_recorded_and_migrate_is_idempotent(db: Database) -> None:
    from storage.migrations import migrate

    assert migrate(db) == LATEST
    with db.connect() as conn:
        assert current_version(conn) == LATEST


def test_proxy_import_dedupes_and_encrypts_passwords(db: Database, tmp_path: Path) -> None:
    b = box(tmp_path)
    specs = [
        Spec("http://1.2.3.4:80", "http", "1.2.3.4", 80),
        Spec("socks5://u@5.6.7.8:1080", "socks5", "5.6.7.8", 1080, "u", "s3cret"),
    ]
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(conn, specs, b, "test")
        again = proxy_store.upsert_proxies(conn, specs[::-1], b, "test")
    assert len(set(ids)) == 2 and again == ids[::-1]
    with db.connect() as conn:
        stored = fetch_all(conn, sa.text("SELECT password_enc, status FROM proxies ORDER BY id"))
        loaded = proxy_store.load_for_check(conn, 1, ids, b)
    assert all(r[1] == "untested" for r in stored)
    assert "s3cret" not in repr(stored)
    assert {p.password for p in loaded} == {None, "s3cret"}


def _run_with_tasks(db: Database, n_items: int, batch: int) -> tuple[int, list[int]]:
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(
            conn,
            [
                Spec(f"http://10.0.{i // 250}.{i % 250}:80", "http", "10.0.0.1", 80)
                for i in range(n_items)
            ],
            _BOX,
            "t",
        )
        run_id = runs.create_run(conn, "validate", {"x": 1}, "test")
        batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
        queue.add_tasks(conn, run_id, batches, 0, max_attempts=2)
        runs.add_planned(conn, run_id, len(ids), len(batches))
        runs.start_run(conn, run_id)
    return run_id, ids


def _check_row(run_id: int, pid: int, task_id: int, alive: bool) -> tuple:
    return (
        run_id,
        pid,
        task_id,
        "w1",
        utcnow(),
        "alive" if alive else "refused",
        alive,
        "http",
        12.5 if alive else None,
        "elite" if alive else None,
        "127.1.0.1" if alive else None,
        None,
        None if alive else "refused",
    )


def test_claim_lease_complete_and_exactly_once_results(db: Database) -> None:
    run_id, _ids = _run_with_tasks(db, 10, 4)
    with db.begin() as conn:
        claimed = queue.claim(conn, "w1", 2, 30)
        other = queue.claim(conn, "w2", 5, 30)
    assert [t.seq for t in claimed] == [0, 1] and [t.seq for t in other] == [2]
    assert claimed[0].kind == "validate" and claimed[0].params == {"x": 1}
    t0 = claimed[0]
    rows = [_check_row(run_id, pid, t0.id, i % 2 == 0) for i, pid in enumerate(t0.refs)]
    with db.begin() as conn:
        assert proxy_store.store_checks(conn, rows) == 4
        # the same task executed again (after a lost lease) stores nothing twice
        assert proxy_store.store_checks(conn, rows + rows) == 0
        queue.complete(conn, [t0.id])
    with db.connect() as conn:
        counts = outcome_counts(conn, item_logs()["validate"], run_id)
        pool = fetch_all(
            conn,
            sa.text(
                "SELECT success_count + failure_count FROM proxies WHERE id IN ("
                + ",".join(map(str, t0.refs))
                + ")"
            ),
        )
        assert proxy_store.load_for_check(conn, run_id, t0.refs, _BOX) == []
    assert counts == {"alive": 2, "refused": 2}
    assert all(r[0] == 1 for r in pool)


def test_heartbeat_release_fail_and_settle(db: Database) -> None:
    run_id, _ = _run_with_tasks(db, 6, 3)
    with db.begin() as conn:
        a, b = queue.claim(conn, "w1", 2, 30)
        assert queue.heartbeat(conn, "w1", [a.id, b.id], 30) == {a.id: "running", b.id: "running"}
        assert queue.heartbeat(conn, "w2", [a.id], 30) == {a.id: "lost"}
        queue.release(conn, "w1", [a.id])
        queue.fail(conn, [b.id], "boom", backoff_seconds=0)
    with db.begin() as conn:
        counts = queue.task_counts(conn, run_id)
        assert counts == {"queued": 2}
        again = queue.claim(conn, "w1", 5, 30)
        assert {t.id for t in again} == {a.id, b.id}
        attempts = {t.id: t.attempts for t in again}
        assert attempts == {a.id: 1, b.id: 2}
        queue.fail(conn, [b.id], "boom again", backoff_seconds=0)  # out of attempts
        queue.complete(conn, [a.id])
        assert runs.settle(conn) == [(run_id, "failed")]
        run = runs.get_run(conn, run_id)
    assert run is not None and run.status == "failed" and "boom again" in (run.error or "")


def test_expired_lease_is_found(db: Database) -> None:
    _run_with_tasks(db, 2, 2)
    with db.begin() as conn:
        (t,) = queue.claim(conn, "w1", 1, -1)  # lease already expired
        assert queue.expired_leases(conn) == [(t.id, "w1")]


def test_commands_stop_resume_cancel(db: Database) -> None:
    run_id, _ = _run_with_tasks(db, 4, 2)
    with db.begin() as conn:
        assert runs.apply_command(conn, run_id, "stop", "test") == "stopping"
        assert queue.claim(conn, "w1", 5, 30) == []  # nothing handed out while stopping
        assert runs.settle(conn) == [(run_id, "stopped")]
        with pytest.raises(ValueError, match="is stopped"):
            runs.apply_command(conn, run_id, "pause", "test")
        assert runs.apply_command(conn, run_id, "resume", "test") == "running"
        assert len(queue.claim(conn, "w1", 5, 30)) == 2
        assert runs.apply_command(conn, run_id, "cancel", "test") == "cancelled"


def test_postgres_claims_do_not_overlap(pg_url: str) -> None:
    """Two connections claiming at once get disjoint tasks (FOR UPDATE SKIP LOCKED)."""
    db = open_database(pg_url)
    _run_id, _ = _run_with_tasks(db, 40, 2)
    seen: list[int] = []
    with db.engine.connect() as c1, db.engine.connect() as c2:
        t1 = c1.begin()
        first = queue.claim(c1, "w1", 5, 30)  # rows locked, transaction open
        t2 = c2.begin()
        second = queue.claim(c2, "w2", 5, 30)  # skips the locked rows instead of waiting
        t2.commit()
        t1.commit()
        seen = [t.id for t in first] + [t.id for t in second]
    assert len(seen) == len(set(seen)) == 10
    db.dispose()


def test_second_process_gets_a_clear_lock_message(duckdb_url: str) -> None:
    import subprocess
    import sys

    db = open_database(duckdb_url)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from storage.db import open_database\n"
            "from storage.errors import DatabaseLockedError\n"
            f"try: open_database({duckdb_url!r})\n"
            "except DatabaseLockedError as e: print(e.pid, e); sys.exit(3)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    db.dispose()
    import os

    assert out.returncode == 3, out.stderr
    assert out.stdout.startswith(f"{os.getpid()} ")
    assert "DuckDB lets one process" in out.stdout


def test_db_url_resolution_order() -> None:
    assert resolve_db_url("x.duckdb", {}) == "duckdb:///x.duckdb"
    assert (
        resolve_db_url(None, {"FETCHFLEET_DB": "postgres://u@h/d"}) == "postgresql+psycopg://u@h/d"
    )
    env = {
        "POSTGRES_HOST": "db",
        "POSTGRES_USER": "ff",
        "POSTGRES_PASSWORD": "p@ss",
        "POSTGRES_DB": "fleet",
    }
    assert resolve_db_url(None, env) == "postgresql+psycopg://ff:p%40ss@db:5432/fleet"
    assert resolve_db_url(None, {}) == "duckdb:///data/fetchfleet.duckdb"


def test_proxy_filters_select_by_status_type_age_and_limit(db: Database) -> None:
    from datetime import timedelta

    specs = [
        Spec(f"{s}://10.0.0.{i}:80", s, f"10.0.0.{i}", 80)
        for i, s in enumerate(["socks5", "socks5", "http", "socks5"])
    ]
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(conn, specs, _BOX, "t")
        old = utcnow() - timedelta(hours=30)
        conn.execute(
            sa.text("UPDATE proxies SET status = 'active', last_checked = :t WHERE id = :i"),
            {"t": old, "i": ids[1]},
        )
        conn.execute(
            sa.text("UPDATE proxies SET status = 'active', last_checked = :t WHERE id = :i"),
            {"t": utcnow(), "i": ids[3]},
        )
    F = proxy_store.ProxyFilter
    with db.connect() as conn:
        assert proxy_store.select_ids(conn, F(status="untested", protocol="socks5")) == [ids[0]]
        assert set(proxy_store.select_ids(conn, F(older_than_hours=24))) == {ids[0], ids[1], ids[2]}
        assert proxy_store.select_ids(conn, F(minutes_old=60)) == [ids[1]]
        assert proxy_store.select_ids(conn, F(protocol="socks5", limit=2)) == [ids[0], ids[1]]


def test_one_watchdog_at_a_time(db_url: str) -> None:
    """Consoles and CLIs on one PostgreSQL take the watchdog's turn one at a time."""
    db = open_database(db_url)
    try:
        with db.begin() as first:
            assert queue.watchdog_turn(first)
            if db.dialect == "postgresql":
                with db.begin() as second:
                    assert not queue.watchdog_turn(second)
        with db.begin() as later:  # the turn ends with its transaction
            assert queue.watchdog_turn(later)
    finally:
        db.dispose()

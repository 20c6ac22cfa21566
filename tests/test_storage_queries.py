"""The named queries the engine calls instead of writing SQL, on DuckDB and on PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from storage import error_log, queue, runs
from storage import pipelines as pipeline_store
from storage import proxies as proxy_store
from storage import scrape as scrape_store
from storage.clock import utcnow
from storage.db import Database, open_database
from storage.scrape_rows import PageResult
from storage.secrets import SecretBox

_BOX = SecretBox(Fernet(Fernet.generate_key()))


@dataclass(frozen=True)
class Spec:
    key: str
    scheme: str | None
    host: str
    port: int
    username: str | None = None
    password: str | None = None


def _error(run_id: int, key: str, etype: str = error_log.BAD_INPUT) -> dict:
    return {
        "run_id": run_id,
        "item_key": key,
        "error_type": etype,
        "message": f"{key} is wrong",
        "created_at": utcnow(),
    }


def test_bad_input_lists_the_first_lines_and_counts_them_all(db: Database) -> None:
    with db.begin() as conn:
        error_log.add_errors(conn, [])  # nothing to write: no statement
        error_log.add_errors(
            conn,
            [
                _error(1, "line 3"),
                _error(1, "line 7"),
                _error(1, "http://x", "timeout"),  # not an input line
                _error(2, "line 1"),  # another run
                _error(1, "line 9"),
            ],
        )
    with db.connect() as conn:
        assert error_log.bad_input(conn, 1, 2) == (
            [("line 3", "line 3 is wrong"), ("line 7", "line 7 is wrong")],
            3,
        )
        assert error_log.bad_input(conn, 3, 5) == ([], 0)


def test_run_pool_snapshot_is_fastest_first_with_passwords_encrypted(db: Database) -> None:
    specs = [
        Spec("http://10.0.0.1:80", "http", "10.0.0.1", 80),
        Spec("socks5://u@10.0.0.2:1080", "socks5", "10.0.0.2", 1080, "u", "s3cret"),
        Spec("http://10.0.0.3:80", "http", "10.0.0.3", 80),
        Spec("http://10.0.0.4:80", "http", "10.0.0.4", 80),
    ]
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(conn, specs, _BOX, "t")
        for pid, status, latency in [
            (ids[0], "active", 90.0),
            (ids[1], "active", 20.0),
            (ids[2], "active", None),  # never measured: last
            (ids[3], "inactive", 1.0),
        ]:
            conn.execute(
                sa.text("UPDATE proxies SET status = :s, latency_ms = :l WHERE id = :i"),
                {"s": status, "l": latency, "i": pid},
            )
    with db.begin() as conn:
        assert proxy_store.snapshot_run_pool(conn, 7, "active", 10) == 3
        assert proxy_store.snapshot_run_pool(conn, 8, "active", 2) == 2
        conn.execute(sa.text("UPDATE proxies SET status = 'inactive'"))  # a snapshot: kept
    with db.connect() as conn:
        rows = proxy_store.read_run_pool(conn, 7)
        first_two = proxy_store.read_run_pool(conn, 8)
        states = proxy_store.pool_states(conn)
    assert [r[2] for r in rows] == ["10.0.0.2", "10.0.0.1", "10.0.0.3"]
    assert [r[2] for r in first_two] == ["10.0.0.2", "10.0.0.1"]
    assert rows[0][4] == "u" and rows[0][5] and "s3cret" not in repr(rows)
    assert _BOX.decrypt(rows[0][5]) == "s3cret"
    assert states["http://10.0.0.4:80"][0] == "inactive"
    assert {k: v[0] for k, v in states.items()} == {
        "http://10.0.0.1:80": "inactive",
        "socks5://u@10.0.0.2:1080": "inactive",
        "http://10.0.0.3:80": "inactive",
        "http://10.0.0.4:80": "inactive",
    }


def _run(db: Database, kind: str = "validate") -> int:
    with db.begin() as conn:
        return runs.create_run(conn, kind, {"x": 1}, "test")


def test_leased_tasks_last_seq_and_planned_tasks(db: Database) -> None:
    run_id = _run(db)
    with db.begin() as conn:
        assert queue.last_seq(conn, run_id) is None
        assert runs.planned_tasks(conn, run_id) == 0
        assert runs.planned_tasks(conn, run_id + 99) == 0
        queue.add_tasks(conn, run_id, [[1, 2], [3], [4]], 0, 3)
        runs.add_planned(conn, run_id, 4, 3)
        runs.start_run(conn, run_id)
    with db.begin() as conn:
        assert queue.last_seq(conn, run_id) == 2
        assert runs.planned_tasks(conn, run_id) == 3
        assert queue.leased_tasks(conn, run_id) == []
        (t,) = queue.claim(conn, "w1", 1, 30)
        assert queue.leased_tasks(conn, run_id) == [(t.id, "w1")]


def test_a_gone_worker_counts_as_a_lost_lease_a_restarted_coordinator_does_not(
    db: Database,
) -> None:
    """``requeue(lost=True)`` (fleet stop found the worker's processes gone) counts toward
    the cap on lost leases; a coordinator's own restart never does; resuming with failed
    tasks gives both counts back."""
    run_id = _run(db)
    with db.begin() as conn:
        queue.add_tasks(conn, run_id, [[1]], 0, 3)
        runs.start_run(conn, run_id)

    def take_and_lose(lost: bool) -> tuple[str, int, str]:
        with db.begin() as conn:
            (t,) = queue.claim(conn, "w1", 1, 30)
            queue.requeue(conn, [t.id], "gone", lost=lost, max_lost_leases=2)
            row = conn.execute(
                sa.text(f"SELECT status, attempts, last_error FROM tasks WHERE id = {t.id}")
            ).one()
        return row[0], row[1], row[2]

    assert take_and_lose(False) == ("queued", 0, "gone")
    assert take_and_lose(False) == ("queued", 0, "gone")  # ours, however often
    assert take_and_lose(True) == ("queued", 0, "gone")
    status, attempts, why = take_and_lose(True)
    assert (status, attempts) == ("failed", 0) and "2 times" in why
    with db.begin() as conn:
        assert queue.requeue_failed(conn, run_id) == 1
    assert take_and_lose(True) == ("queued", 0, "gone")  # a fresh count


def test_reopen_sets_only_a_completed_run_running(db: Database) -> None:
    run_id = _run(db)
    with db.begin() as conn:
        runs.start_run(conn, run_id)
        assert not runs.reopen(conn, run_id)  # running: untouched
        runs.set_status(conn, run_id, "failed", "boom")
        assert not runs.reopen(conn, run_id)
        runs.set_status(conn, run_id, "completed")
        assert runs.reopen(conn, run_id)
        run = runs.get_run(conn, run_id)
    assert run is not None and run.status == "running"
    assert run.finished_at is None and run.error is None


def test_settle_leaves_runs_planned_without_tasks_to_their_process(db: Database) -> None:
    """A run that planned items but no tasks (a pipeline's steps) is not the queue's to
    settle, whatever its kind is called; a queue run that planned nothing settles at once."""
    outside = _run(db, "some-plugin")
    stopping = _run(db, "another")
    empty = _run(db, "validate")
    with db.begin() as conn:
        runs.add_planned(conn, outside, 3, 0)
        runs.add_planned(conn, stopping, 2, 0)
        for run_id in (outside, stopping, empty):
            runs.start_run(conn, run_id)
        runs.apply_command(conn, stopping, "stop", "test")
        assert runs.settle(conn) == [(empty, "completed")]
        assert runs.get_status(conn, outside) == "running"
        assert runs.get_status(conn, stopping) == "stopping"


def test_pipeline_run_lock_is_one_session_at_a_time(pg_url: str) -> None:
    db = open_database(pg_url)
    try:
        a, b = db.engine.connect(), db.engine.connect()
        try:
            assert pipeline_store.try_lock_run(a, 7)
            assert not pipeline_store.try_lock_run(b, 7)
            assert pipeline_store.try_lock_run(b, 8)  # another run
            pipeline_store.unlock_run(a, 7)
            assert pipeline_store.try_lock_run(b, 7)
        finally:
            a.close()
            b.close()
    finally:
        db.dispose()


def _page(url_id: int, url: str, links: list[str], depth: int = 0) -> PageResult:
    return PageResult(url_id, url, depth, "Malaysia", "done", method="http", links=links)


@pytest.mark.parametrize("max_pages", [None, 3])
def test_store_pages_registers_links_and_plans_no_task(db: Database, max_pages: int | None) -> None:
    run_id = _run(db, "scrape")
    ctx = scrape_store.StoreContext(run_id, "product", max_pages, max_depth=1)
    with db.begin() as conn:
        (root,) = scrape_store.register_urls(
            conn, run_id, [("http://s/", 0, None, "Malaysia")], max_pages
        )
        links = ["http://s/a", "http://s/b", "http://s/a", "http://s/c"]
        stored = scrape_store.store_pages(
            conn, ctx, [(None, None, _page(root, "http://s/", links))]
        )
    want = 2 if max_pages == 3 else 3  # the root counts towards max_pages
    assert stored.pages == 1 and len(stored.new_urls) == want
    with db.begin() as conn:
        assert queue.task_counts(conn, run_id) == {}  # storage registers, it does not plan
        items = scrape_store.load_urls(conn, run_id, stored.new_urls)
        by_id = {i.id: i for i in items}
        urls = [by_id[i].url for i in stored.new_urls]  # new_urls keeps the links' order
        assert urls == ["http://s/a", "http://s/b", "http://s/c"][:want]
        assert all(i.depth == 1 for i in items)
        # the same page again (a re-run task) stores nothing and registers nothing
        again = scrape_store.store_pages(conn, ctx, [(None, None, _page(root, "http://s/", links))])
        assert (again.pages, again.new_urls) == (0, [])
        # a page at max_depth brings no links
        deep = by_id[stored.new_urls[0]]
        leaf = scrape_store.store_pages(
            conn, ctx, [(None, None, _page(deep.id, deep.url, ["http://s/z"], depth=1))]
        )
        assert (leaf.pages, leaf.new_urls) == (1, [])

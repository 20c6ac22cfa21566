"""One poison result (data its kind cannot store) never blocks or drops a flush, whatever
the kind: the others are stored, the poison one is stored as a failed item with its error,
the tasks complete and the run settles. And a flush the database fails (a restart, a
deadlock) keeps what it held for the next one.

The end-to-end case (a scrape of pages full of hostile links) is in ``test_scrape.py``;
the worker's own flush loop is in ``test_worker_memory.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.api import submit_run
from engine.jobs.base import WorkerEnv
from engine.model import ItemResult, ResultBatch, TaskWork
from engine.queue.pipe import Op, PipeQueue, PipeServer
from engine.queue.sql import SqlQueue
from engine.settings import Settings
from storage import runs
from storage.bulk import fetch_all
from storage.db import Database, open_database
from storage.scrape import entity_rows
from storage.scrape_rows import Entity, PageResult

N = 6  # items per run: two tasks of three
POISON = 4  # the item (by position) whose result cannot be stored


def settings(tmp_path: Path) -> Settings:
    return Settings(batch_size=3, data_dir=tmp_path, retry_backoff_s=0.1)


def rows(db: Database, sql: str) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return [tuple(r) for r in fetch_all(conn, sa.text(sql))]


# --- one run of each kind, claimed, with one poison result among good ones ------------------


@dataclass
class Case:
    """A run (of one kind) whose two tasks ``w1`` claimed. For each kind, ``KINDS`` says
    how to start one, every item's result as its worker hands it over (the ``POISON``th one
    unstorable), and what must be stored then."""

    run_id: int
    tasks: list[TaskWork]
    sql: SqlQueue  # what claimed them

    @property
    def task_ids(self) -> list[int]:
        return [t.id for t in self.tasks]

    @property
    def completions(self) -> list[tuple[int, str]]:
        return [(t.id, t.lease) for t in self.tasks]

    @property
    def items(self) -> list[Any]:
        return [i for t in self.tasks for i in t.items]


def start_scrape(db: Database, s: Settings, tmp_path: Path, sql: SqlQueue | None = None) -> Case:
    urls = ", ".join(f'"http://127.0.0.1:9/p{i}"' for i in range(N))
    spec = f"""
name = "poison"
country = "Malaysia"
entity_type = "product"
start_urls = [{urls}]
[[extract]]
[extract.fields]
id = ".id"
"""
    params = {"spec_text": spec, "files_dir": str(tmp_path / "files")}
    return claimed(sql or SqlQueue(db, s), submit_run(db, s, "scrape", params, "test"))


def scrape_results(case: Case) -> list[ItemResult | ResultBatch]:
    """Pages as a worker hands them over (one columnar batch); the poison one is what an
    executor that raised used to hand over: no page at all."""
    batch = ResultBatch.empty(case.run_id, ("page",))
    for task in case.tasks:
        for item in task.items:
            page = PageResult(item.id, item.url, 0, "Malaysia", "done", method="http")
            page.entities.append(Entity(f"P{item.id}", "h", [("id", f"P{item.id}", "str")]))
            wire = None if item is case.items[POISON] else page.to_wire()
            batch.add(task.id, item.id, True, "done", {"page": wire}, "w1", task.lease)
    return [batch]


def check_scrape(db: Database, case: Case, error: str) -> None:
    poison = case.items[POISON]
    got = rows(
        db, f"SELECT id, status, error_type FROM urls WHERE run_id = {case.run_id} ORDER BY id"
    )
    assert got == [
        (i.id, "failed", "unstorable_result") if i is poison else (i.id, "done", None)
        for i in case.items
    ]
    with db.connect() as conn:
        stored = {e["external_id"] for e in entity_rows(conn, "product")}
    assert stored == {f"P{i.id}" for i in case.items if i is not poison}
    [(key, message)] = rows(db, "SELECT item_key, message FROM errors")
    assert key == poison.url and error in message


def start_backfill(db: Database, s: Settings, tmp_path: Path) -> Case:
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"id-{i}\n" for i in range(N)))
    params = {
        "ids_file": str(ids),
        "url_template": "http://127.0.0.1:9/users/{id}",
        "rate_limit": "10/1s",
    }
    return claimed(SqlQueue(db, s), submit_run(db, s, "backfill", params, "test"))


def backfill_results(case: Case) -> list[ItemResult | ResultBatch]:
    """One ItemResult per ID; the poison one's attempts is not a number."""
    return [
        ItemResult(
            case.run_id,
            task.id,
            item,
            True,
            "ok",
            {
                "http_status": 200,
                "body": "{}",
                "attempts": "many" if item == case.items[POISON] else 1,
            },
            "w1",
            task.lease,
        )
        for task in case.tasks
        for item in task.items
    ]


def check_backfill(db: Database, case: Case, error: str) -> None:
    got = rows(db, "SELECT item_id, status, outcome FROM backfill_items ORDER BY item_id")
    poison = case.items[POISON]
    assert got == sorted(
        (i, "failed", "error") if i == poison else (i, "ok", "ok") for i in case.items
    )
    [(key, etype, message)] = rows(db, "SELECT item_key, error_type, message FROM errors")
    assert (key, etype) == (poison, "unstorable_result") and error in message


KINDS = {
    "scrape": (start_scrape, scrape_results, check_scrape, "TypeError"),
    "backfill": (start_backfill, backfill_results, check_backfill, "ValueError"),
}


def claimed(sql: SqlQueue, run_id: int) -> Case:
    reply = sql.claim("w1", 10)
    assert len(reply.tasks) == 2 and sum(len(t.items) for t in reply.tasks) == N
    return Case(run_id, reply.tasks, sql)


def run_status(db: Database, run_id: int) -> str | None:
    with db.begin() as conn:
        runs.settle(conn)
        return runs.get_status(conn, run_id)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_poison_result_is_stored_as_failed_and_the_rest_as_usual(
    db: Database, tmp_path: Path, kind: str
) -> None:
    start, results, check, error = KINDS[kind]
    s = settings(tmp_path)
    case = start(db, s, tmp_path)
    sql = case.sql

    assert sql.store(results(case), case.completions) == N  # N - 1 stored, 1 as failed
    check(db, case, error)
    assert rows(db, "SELECT DISTINCT status FROM tasks") == [("done",)]
    assert run_status(db, case.run_id) == "completed"

    # handed over again (a re-run task): nothing is stored twice, the poison is not retried
    assert sql.store(results(case), case.completions) == 0
    check(db, case, error)


def test_an_executor_that_raised_hands_over_a_failed_page(db: Database, tmp_path: Path) -> None:
    """What a worker hands over when ``execute`` raised is in the kind's shape (a failed
    page), so it is stored, counted and logged like any failed page, never a poison."""
    import asyncio

    from engine.jobs import get_kind
    from engine.runtime.worker import error_result_data

    s = settings(tmp_path)
    case = start_scrape(db, s, tmp_path)
    with db.connect() as conn:
        params = runs.get_run(conn, case.run_id).params
    executor = asyncio.run(get_kind("scrape", s).open_executor(params, WorkerEnv.local()))
    batch = ResultBatch.empty(case.run_id, ("page",))
    for task in case.tasks:
        for item in task.items:
            data = error_result_data(executor, item, RuntimeError("boom"))
            batch.add(task.id, item.id, False, "error", data, "w1", task.lease)
    asyncio.run(executor.aclose())

    assert case.sql.store([batch], case.completions) == N
    assert rows(db, "SELECT DISTINCT status, error_type, error FROM urls") == [
        ("failed", "error", "RuntimeError: boom")
    ]
    assert rows(db, "SELECT error_type, count(*) FROM errors GROUP BY 1") == [("error", N)]
    assert run_status(db, case.run_id) == "completed"


# --- the coordinator's flush (DuckDB) --------------------------------------------------------


class FailingStore(SqlQueue):
    """A SqlQueue whose next ``fails`` stores fail the way a database restart does."""

    fails = 0

    def store(self, results: list[ItemResult | ResultBatch], complete: Any = ()) -> int:
        if self.fails:
            self.fails -= 1
            raise sa.exc.OperationalError("INSERT", {}, ConnectionError("server closed"))
        return super().store(results, complete)


def test_the_coordinators_flush_loses_nothing_to_a_failure_or_a_poison(
    duckdb_url: str, tmp_path: Path
) -> None:
    """Two workers hand over through the coordinator: one the results of its two tasks (a
    poison one among them) and their completions, the other a release. The first
    flush with something in it fails (the database); the next ones store all of it: nothing
    was dropped with the failed flush, and the poison result cost nobody's results but its
    own."""
    db = open_database(duckdb_url)
    try:
        s = settings(tmp_path)
        sql = FailingStore(db, s)
        case = start_scrape(db, s, tmp_path, sql)
        other = submit_run(db, s, "scrape", {"spec_text": HELD_SPEC, "files_dir": "x"}, "t")
        [held] = sql.claim("w2", 1, other).tasks
        sql.fails = 1
        server = PipeServer(sql, mp.get_context("spawn"), limits_path="", flush_s=0.05)
        [batch] = scrape_results(case)
        first, second = case.tasks
        cut = len(first.items)  # the poison (item 4) is the second worker's
        sends = [
            ("w1", Op.SUBMIT, ([batch.part(0, cut)],)),
            ("w1", Op.COMPLETE, ({first.id: first.lease},)),
            ("w1", Op.SUBMIT, ([batch.part(cut, N)],)),
            ("w1", Op.COMPLETE, ({second.id: second.lease},)),
            ("w2", Op.RELEASE, ({held.id: held.lease},)),
        ]
        clients = {w: PipeQueue(server.boot(w, s, "WARNING").channel) for w in ("w1", "w2")}
        for i, (worker, op, args) in enumerate(sends):
            clients[worker].channel.send((i, op.value, args))

        def settled() -> bool:
            queued = rows(db, f"SELECT status, attempts FROM tasks WHERE id = {held.id}")
            return run_status(db, case.run_id) == "completed" and queued == [("queued", 0)]

        failed, stop = 0, threading.Event()
        deadline = time.monotonic() + 30
        while not settled():  # the coordinator's service loop: serve, flush, log a failure
            assert time.monotonic() < deadline, "the flushes never stored everything"
            try:
                server.serve_until(time.monotonic() + 0.2, stop)
            except sa.exc.OperationalError:
                failed += 1
        assert failed == 1 and sql.fails == 0
        check_scrape(db, case, "TypeError")
    finally:
        db.dispose()


HELD_SPEC = """
name = "held"
country = "Malaysia"
entity_type = "product"
start_urls = ["http://127.0.0.1:9/held"]
[[extract]]
[extract.fields]
id = ".id"
"""

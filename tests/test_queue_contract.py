"""The queue contract (``engine.queue.base.QueueBackend``), one suite for every backend:

* ``memory``: the in-memory fake, with a fake clock;
* ``sql-duckdb`` / ``sql-postgresql``: ``SqlQueue`` on each database;
* ``pipe``: ``PipeQueue`` clients talking to a ``PipeServer`` (over ``SqlQueue`` on DuckDB)
  through real multiprocessing queues, the server on a thread of this process.

A ``Harness`` gives each case the supervisor's side of its backend: runs and tasks, run
statuses, the watchdog's lease check, and a way to wait for one-way messages to be applied.
Tasks carry backfill item ids as references (the backfill kind loads and stores them), so the
database backends store real results.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.model import ItemResult, ResultBatch
from engine.queue import backend_class, pool_backend
from engine.queue.base import (
    Directive,
    QueueBackend,
    Reply,
    WorkerAction,
    directive_for,
    leases_of,
)
from engine.queue.memory import MemoryQueue
from engine.queue.pipe import PipeQueue, PipeServer
from engine.queue.sql import SqlQueue
from engine.settings import Settings
from storage import queue as q
from storage import runs
from storage.bulk import fetch_all
from storage.db import Database, open_database
from storage.schema import backfill_items, tasks

KIND = "backfill"
A, B = "worker-a", "worker-b"
WAIT_S = 10.0  # generous bound for anything that waits on real time


@dataclass(frozen=True)
class TaskState:
    status: str
    attempts: int
    worker_id: str | None
    last_error: str | None


class Harness(ABC):
    """The supervisor's side of one backend, plus the backend each worker talks to."""

    @abstractmethod
    def queue(self, worker_id: str) -> QueueBackend: ...

    @abstractmethod
    def new_run(
        self,
        batches: list[list[str]],
        max_attempts: int = 3,
        countries: list[str | None] | None = None,
    ) -> tuple[int, list[int]]:
        """A running run with one task per batch (of ``countries``' entry, when given):
        (run id, task ids in order)."""

    @abstractmethod
    def set_run_status(self, run_id: int, status: str) -> None: ...

    @abstractmethod
    def task(self, task_id: int) -> TaskState: ...

    @abstractmethod
    def lease_until(self, task_id: int) -> Any: ...

    @abstractmethod
    def stored(self, run_id: int) -> list[str]:
        """Item refs with a stored result, one entry per stored row, sorted."""

    @abstractmethod
    def request_exit(self, worker_id: str) -> None: ...

    @abstractmethod
    def expire(self) -> list[tuple[int, str]]:
        """Let the current leases run out, then run the watchdog's lease check."""

    def tick(self) -> None:  # noqa: B027 — optional
        """Let a little time pass (the clock the backend stamps leases with)."""

    def sync(self) -> None:  # noqa: B027 — optional
        """Wait until every one-way message sent so far is applied."""

    def close(self) -> None:
        return None


class MemoryHarness(Harness):
    def __init__(self, lease_s: float, backoff_s: float, max_lost: int = 5) -> None:
        self.now = 1000.0
        self.mq = MemoryQueue(
            lease_s=lease_s,
            retry_backoff_s=backoff_s,
            clock=lambda: self.now,
            max_lost_leases=max_lost,
        )

    def queue(self, worker_id: str) -> QueueBackend:
        return self.mq

    def new_run(
        self,
        batches: list[list[str]],
        max_attempts: int = 3,
        countries: list[str | None] | None = None,
    ) -> tuple[int, list[int]]:
        run_id = self.mq.add_run(KIND, {})
        return run_id, self.mq.add_tasks(run_id, batches, max_attempts, countries)

    def set_run_status(self, run_id: int, status: str) -> None:
        self.mq.set_run_status(run_id, status)

    def task(self, task_id: int) -> TaskState:
        t = self.mq.tasks[task_id]
        return TaskState(t.status, t.attempts, t.worker_id, t.last_error)

    def lease_until(self, task_id: int) -> Any:
        return self.mq.tasks[task_id].lease_until

    def stored(self, run_id: int) -> list[str]:
        return sorted(ref for r, ref in self.mq.results if r == run_id)

    def request_exit(self, worker_id: str) -> None:
        self.mq.request_exit(worker_id)

    def expire(self) -> list[tuple[int, str]]:
        self.now += self.mq.lease_s + 1
        return self.mq.requeue_expired()

    def tick(self) -> None:
        self.now += 1.0


class SqlHarness(Harness):
    def __init__(self, url: str, lease_s: float, backoff_s: float, max_lost: int = 5) -> None:
        self.settings = Settings(
            lease_s=lease_s, retry_backoff_s=backoff_s, max_lost_leases=max_lost
        )
        self.db: Database = open_database(url)
        self.sql = SqlQueue(self.db, self.settings)

    def queue(self, worker_id: str) -> QueueBackend:
        return self.sql

    def new_run(
        self,
        batches: list[list[str]],
        max_attempts: int = 3,
        countries: list[str | None] | None = None,
    ) -> tuple[int, list[int]]:
        with self.db.begin() as conn:
            run_id = runs.create_run(conn, KIND, {}, "contract-test")
            q.add_tasks(conn, run_id, batches, 0, max_attempts, countries)
            runs.start_run(conn, run_id)
            ids = fetch_all(
                conn, sa.select(tasks.c.id).where(tasks.c.run_id == run_id).order_by(tasks.c.seq)
            )
        return run_id, [int(r[0]) for r in ids]

    def set_run_status(self, run_id: int, status: str) -> None:
        with self.db.begin() as conn:
            runs.set_status(conn, run_id, status)

    def _row(self, task_id: int) -> Any:
        with self.db.connect() as conn:
            return fetch_all(conn, sa.select(tasks).where(tasks.c.id == task_id))[0]

    def task(self, task_id: int) -> TaskState:
        r = self._row(task_id)
        return TaskState(r.status, r.attempts, r.worker_id, r.last_error)

    def lease_until(self, task_id: int) -> Any:
        return self._row(task_id).lease_until

    def stored(self, run_id: int) -> list[str]:
        with self.db.connect() as conn:
            rows = fetch_all(
                conn,
                sa.select(backfill_items.c.item_id).where(backfill_items.c.run_id == run_id),
            )
        return sorted(r[0] for r in rows)

    def request_exit(self, worker_id: str) -> None:
        self.sql.request_exit(worker_id)

    def expire(self) -> list[tuple[int, str]]:
        # A lease of a fraction of a second (``lease_s``) runs out on the database clock.
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with self.db.begin() as conn:
                expired = q.requeue_expired(
                    conn, self.settings.retry_backoff_s, self.settings.max_lost_leases
                )
            if expired:
                return expired
            time.sleep(0.05)
        raise AssertionError(f"no lease expired within {WAIT_S}s")

    def tick(self) -> None:
        time.sleep(0.01)  # the database clock has microseconds: any step will do

    def close(self) -> None:
        self.db.dispose()


class PipeHarness(SqlHarness):
    """Clients and server in this process, over real multiprocessing queues."""

    def __init__(self, url: str, lease_s: float, backoff_s: float, max_lost: int = 5) -> None:
        import multiprocessing as mp

        super().__init__(url, lease_s, backoff_s, max_lost)
        self.ctx = mp.get_context("spawn")
        self.server = PipeServer(self.sql, self.ctx, limits_path="unused", flush_s=3600)
        self.clients: dict[str, PipeQueue] = {}
        self.stop = threading.Event()
        self.flush_wanted = threading.Event()
        self.flushed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            self.server.serve_until(time.monotonic() + 0.02, self.stop)
            if self.flush_wanted.is_set():
                self.flush_wanted.clear()
                self.server.flush()
                self.flushed.set()

    def queue(self, worker_id: str) -> QueueBackend:
        if worker_id not in self.clients:
            boot = self.server.boot(worker_id, self.settings, "WARNING")
            self.clients[worker_id] = PipeQueue(boot.channel, timeout_s=WAIT_S)
        return self.clients[worker_id]

    def request_exit(self, worker_id: str) -> None:
        self.server.request_exit(worker_id)

    def sync(self) -> None:
        # The server reads every ready channel before it answers a round trip: once this one
        # is answered, everything sent before it (by any client) is buffered; then a flush.
        self.queue("sync").heartbeat("sync", {}, "idle", 0, 0)
        self.flushed.clear()
        self.flush_wanted.set()
        assert self.flushed.wait(WAIT_S), "the pipe server did not flush"

    def close(self) -> None:
        self.stop.set()
        self.server.wake()
        self.thread.join(WAIT_S)
        super().close()


BACKENDS = ["memory", "sql-duckdb", "sql-postgresql", "pipe"]
Make = Callable[..., Harness]


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    """A factory of harnesses of one backend: ``make(lease_s=…, backoff_s=…)``."""
    made: list[Harness] = []
    name = request.param
    url = (
        request.getfixturevalue("pg_url")
        if name == "sql-postgresql"
        else f"duckdb:///{tmp_path / 'q.duckdb'}"
    )

    def build(lease_s: float = 60.0, backoff_s: float = 0.0, max_lost: int = 5) -> Harness:
        assert not made, "one harness per test (one database file)"
        if name == "memory":
            h: Harness = MemoryHarness(lease_s, backoff_s, max_lost)
        elif name == "pipe":
            h = PipeHarness(url, lease_s, backoff_s, max_lost)
        else:
            h = SqlHarness(url, lease_s, backoff_s, max_lost)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def result(run_id: int, task_id: int, ref: str, lease: str, worker_id: str = A) -> ItemResult:
    return ItemResult(run_id, task_id, ref, True, "ok", {"http_status": 200}, worker_id, lease)


def leases(reply: Reply) -> dict[int, str]:
    return leases_of(reply.tasks)


def register(h: Harness, *workers: str, countries: tuple[str, ...] = ()) -> None:
    for w in workers:
        h.queue(w).register(w, "host", 1, "local", countries)


# --- claim --------------------------------------------------------------------------------------


def test_claim_leases_at_most_max_tasks_in_order_and_counts_an_attempt(make: Make) -> None:
    h = make()
    run_id, ids = h.new_run([["a", "b"], ["c"], ["d"]])
    register(h, A, B)
    reply = h.queue(A).claim(A, 2)
    assert reply.worker_action is None and reply.directives == {}
    assert [t.id for t in reply.tasks] == ids[:2]
    first = reply.tasks[0]
    assert (first.run_id, first.kind, first.items, first.attempts) == (run_id, KIND, ["a", "b"], 1)
    for t in ids[:2]:
        assert h.task(t) == TaskState("leased", 1, A, None)
    assert h.task(ids[2]).status == "queued"
    # leased tasks are not claimed twice; the rest goes to the next claim
    assert [t.id for t in h.queue(B).claim(B, 5).tasks] == [ids[2]]
    assert h.queue(B).claim(B, 5).tasks == []


def test_claim_takes_only_tasks_of_running_runs(make: Make) -> None:
    h = make()
    paused, [p] = h.new_run([["a"]])
    other, [o] = h.new_run([["b"]])
    register(h, A)
    h.set_run_status(paused, "paused")
    h.set_run_status(other, "completed")
    assert h.queue(A).claim(A, 5).tasks == []
    h.set_run_status(paused, "running")
    assert [t.id for t in h.queue(A).claim(A, 5).tasks] == [p]
    assert h.task(o).status == "queued"


def test_claim_of_one_run(make: Make) -> None:
    h = make()
    _, [t1] = h.new_run([["a"]])
    run2, [t2] = h.new_run([["b"]])
    register(h, A)
    assert [t.id for t in h.queue(A).claim(A, 5, run_id=run2).tasks] == [t2]
    assert h.task(t1).status == "queued"


# --- countries ------------------------------------------------------------------------------------


def test_a_worker_with_countries_claims_only_tasks_of_no_country_or_of_its_own(make: Make) -> None:
    h = make()
    _, [none, ind, ar, my, ar2] = h.new_run(
        [["a"], ["b"], ["c"], ["d"], ["e"]], countries=[None, "IN", "AR", "MY", "AR"]
    )
    register(h, A, countries=("IN", "MY"))
    register(h, B)
    got = h.queue(A).claim(A, 10, countries=("IN", "MY")).tasks
    assert [t.id for t in got] == [none, ind, my]  # in order, AR skipped
    assert h.task(ar).status == h.task(ar2).status == "queued"
    assert h.queue(A).claim(A, 10, countries=("IN", "MY")).tasks == []  # AR waits for others
    assert [t.id for t in h.queue(B).claim(B, 10).tasks] == [ar, ar2]  # no countries: any


def test_a_task_handed_back_still_goes_only_to_a_worker_of_its_country(make: Make) -> None:
    h = make(lease_s=0.3, backoff_s=0.0)
    run_id, [t] = h.new_run([["a"]], countries=["AR"])
    register(h, A, countries=("AR",))
    register(h, B, countries=("IN",))
    lease = leases(h.queue(A).claim(A, 1, countries=("AR",)))
    assert list(lease) == [t]
    assert h.expire() == [(t, A)]
    assert h.queue(B).claim(B, 5, countries=("IN",)).tasks == []
    assert h.queue(B).claim(B, 5, run_id=run_id, countries=("IN",)).tasks == []
    h.queue(A).release(A, lease)  # not A's any more: changes nothing
    h.sync()
    assert [x.id for x in h.queue(A).claim(A, 1, run_id=run_id, countries=("AR",)).tasks] == [t]
    assert h.task(t).worker_id == A


# --- lease and heartbeat --------------------------------------------------------------------------


def test_heartbeat_extends_held_leases_and_says_continue(make: Make) -> None:
    h = make()
    _, [t] = h.new_run([["a"]])
    register(h, A)
    lease = leases(h.queue(A).claim(A, 1))
    before = h.lease_until(t)
    h.tick()
    reply = h.queue(A).heartbeat(A, lease, "busy", 3, 1)
    assert reply.directives == {t: Directive.CONTINUE}
    assert reply.worker_action is None and reply.tasks == []
    assert h.lease_until(t) > before
    assert h.task(t).status == "leased"


@pytest.mark.parametrize("status", ["paused", "stopping"])
def test_heartbeat_says_release_when_the_run_is_paused_or_stopping(make: Make, status: str) -> None:
    h = make()
    run_id, [t] = h.new_run([["a"]])
    register(h, A)
    lease = leases(h.queue(A).claim(A, 1))
    h.set_run_status(run_id, status)
    assert h.queue(A).heartbeat(A, lease, "busy", 0, 0).directives == {t: Directive.RELEASE}


def test_heartbeat_says_abandon_when_the_lease_is_lost_or_the_run_over(make: Make) -> None:
    h = make(lease_s=0.3)
    run_id, [t1, t2] = h.new_run([["a"], ["b"]])
    register(h, A, B)
    first = leases(h.queue(A).claim(A, 1))
    assert list(first) == [t1]
    assert h.expire() == [(t1, A)]
    assert [x.id for x in h.queue(B).claim(B, 1).tasks] == [t1]  # now B holds it
    assert h.queue(A).heartbeat(A, first, "busy", 0, 0).directives == {t1: Directive.ABANDON}
    assert h.task(t1).worker_id == B  # A's heartbeat took nothing from B
    second = leases(h.queue(A).claim(A, 1))
    assert list(second) == [t2]
    h.set_run_status(run_id, "completed")
    assert h.queue(A).heartbeat(A, second, "busy", 0, 0).directives == {t2: Directive.ABANDON}


def test_directives_by_run_status() -> None:
    assert directive_for("running") is Directive.CONTINUE
    for s in ("paused", "stopping", "stopped", "cancelled"):
        assert directive_for(s) is Directive.RELEASE
    for s in ("completed", "failed", "lost"):
        assert directive_for(s) is Directive.ABANDON


# --- release, complete, fail ------------------------------------------------------------------------


def test_release_hands_tasks_back_without_burning_an_attempt(make: Make) -> None:
    h = make()
    _, [t] = h.new_run([["a"]])
    register(h, A, B)
    lease = leases(h.queue(A).claim(A, 1))
    h.queue(B).release(B, lease)  # not B's (even with A's token): left alone
    h.sync()
    assert h.task(t).status == "leased"
    h.queue(A).release(A, lease)
    h.sync()
    assert h.task(t) == TaskState("queued", 0, None, None)
    again = h.queue(B).claim(B, 1).tasks
    assert [(x.id, x.attempts) for x in again] == [(t, 1)]


def test_complete_marks_tasks_done_and_stores_results(make: Make) -> None:
    h = make()
    run_id, [t] = h.new_run([["a", "b"]])
    register(h, A)
    lease = leases(h.queue(A).claim(A, 1))
    h.queue(A).submit(A, [result(run_id, t, "a", lease[t]), result(run_id, t, "b", lease[t])])
    h.queue(A).complete(A, lease)
    h.sync()
    assert h.task(t).status == "done"
    assert h.stored(run_id) == ["a", "b"]
    assert h.queue(A).claim(A, 1).tasks == []


def test_fail_backs_off_then_fails_after_max_attempts_with_the_last_error(make: Make) -> None:
    h = make(backoff_s=0.0)
    _, [t] = h.new_run([["a"]], max_attempts=2)
    register(h, A)
    reply = h.queue(A).claim(A, 1)
    assert [x.attempts for x in reply.tasks] == [1]
    h.queue(A).fail(A, leases(reply), "boom 1")
    h.sync()
    assert h.task(t) == TaskState("queued", 1, None, "boom 1")
    reply = h.queue(A).claim(A, 1)
    assert [x.attempts for x in reply.tasks] == [2]
    h.queue(B).fail(B, leases(reply), "not B's")  # a worker that does not hold it: nothing
    h.queue(A).fail(A, leases(reply), "boom 2")
    h.sync()
    assert h.task(t) == TaskState("failed", 2, None, "boom 2")
    assert h.queue(A).claim(A, 1).tasks == []


def test_a_failed_task_waits_for_its_backoff(make: Make) -> None:
    h = make(backoff_s=3600.0)
    _, [t] = h.new_run([["a"]])
    register(h, A)
    h.queue(A).fail(A, leases(h.queue(A).claim(A, 1)), "boom")
    h.sync()
    assert h.task(t) == TaskState("queued", 1, None, "boom")
    assert h.queue(A).claim(A, 1).tasks == []  # not before an hour from now


# --- at-least-once delivery, exactly-once storage ----------------------------------------------------


def test_expired_leases_are_requeued_by_the_watchdog_without_an_attempt(make: Make) -> None:
    """A lost lease says its worker went silent (partitioned, stopped), not that the task
    failed: it costs no attempt (up to the cap on lost leases: the next test)."""
    h = make(lease_s=0.3, backoff_s=0.0)
    _, [t] = h.new_run([["a"]], max_attempts=1)
    register(h, A, B)
    h.queue(A).claim(A, 1)
    assert h.expire() == [(t, A)]
    state = h.task(t)
    assert (state.status, state.attempts, state.worker_id) == ("queued", 0, None)
    assert "lease expired" in (state.last_error or "")
    assert [(x.id, x.attempts) for x in h.queue(B).claim(B, 1).tasks] == [(t, 1)]
    assert h.expire() == [(t, B)]  # again: still not failed, with one attempt allowed
    assert h.task(t).status == "queued"


def test_a_task_that_loses_every_holder_fails_at_the_cap_with_why(make: Make) -> None:
    """A task that wedges or kills every worker that takes it (a poison page) must not come
    back for ever: after ``max_lost_leases`` lost leases it fails, saying why, while its
    attempts stay unused; its neighbour is untouched."""
    h = make(lease_s=0.3, backoff_s=0.0, max_lost=3)
    _, [t, other] = h.new_run([["a"], ["b"]], max_attempts=1)
    register(h, A, B)
    for n, w in enumerate((A, B, A), start=1):
        assert [x.id for x in h.queue(w).claim(w, 1).tasks] == [t]
        assert h.expire() == [(t, w)]
        state = h.task(t)
        if n < 3:
            assert (state.status, state.attempts) == ("queued", 0)
            assert "lease expired" in (state.last_error or "")
    state = h.task(t)
    assert (state.status, state.attempts, state.worker_id) == ("failed", 0, None)
    assert "died or went silent while holding it 3 times" in (state.last_error or "")
    assert "resume RUN_ID" in (state.last_error or "")
    assert [x.id for x in h.queue(B).claim(B, 5).tasks] == [other]  # the other one goes on
    assert h.task(other).status == "leased"


def test_a_worker_whose_lease_expired_is_fenced_off(make: Make) -> None:
    """A (partitioned, SIGSTOPped, slower than its lease) comes back after its task went to
    B: what A hands over is not stored, its completion completes nothing, and its next
    heartbeat tells it the task is lost. Only B's execution counts."""
    h = make(lease_s=0.3, backoff_s=0.0)
    run_id, [t] = h.new_run([["a", "b"]])
    register(h, A, B)
    a = leases(h.queue(A).claim(A, 1))
    h.expire()
    reply = h.queue(B).claim(B, 1)
    assert [x.items for x in reply.tasks] == [["a", "b"]]
    b = leases(reply)
    h.queue(A).submit(A, [result(run_id, t, r, a[t], A) for r in ("a", "b")])
    h.queue(A).complete(A, a)
    h.sync()
    assert h.stored(run_id) == []  # nothing of A's stale lease
    assert (h.task(t).status, h.task(t).worker_id) == ("leased", B)
    assert h.queue(A).heartbeat(A, a, "busy", 0, 0).directives == {t: Directive.ABANDON}
    assert h.queue(B).heartbeat(B, b, "busy", 0, 0).directives == {t: Directive.CONTINUE}
    h.queue(B).submit(B, [result(run_id, t, r, b[t], B) for r in ("a", "b")])
    h.queue(B).complete(B, b)
    h.sync()
    assert h.stored(run_id) == ["a", "b"]
    assert h.task(t).status == "done"


def test_a_worker_that_claims_its_lost_task_again_is_fenced_off_its_old_lease(
    make: Make,
) -> None:
    """A cut host's link comes back and its worker claims the re-queued task again before a
    heartbeat tells it the first lease is lost. Whatever it still sends under the old lease
    — results (one by one or in columns), a completion, a failure, a release, a heartbeat —
    changes nothing; the new lease works as any."""
    h = make(lease_s=0.3, backoff_s=0.0)
    run_id, [t] = h.new_run([["a", "b"]])
    register(h, A)
    old = leases(h.queue(A).claim(A, 1))
    assert h.expire() == [(t, A)]
    new = leases(h.queue(A).claim(A, 1))
    assert list(new) == [t] and new != old
    batch = ResultBatch.empty(run_id, ("http_status",))
    batch.add(t, "b", True, "ok", {"http_status": 200}, A, old[t])
    h.queue(A).submit(A, [result(run_id, t, "a", old[t]), batch])
    h.queue(A).complete(A, old)
    h.queue(A).fail(A, old, "the old execution's failure")
    h.queue(A).release(A, old)
    h.sync()
    assert h.stored(run_id) == []
    assert h.task(t) == TaskState("leased", 1, A, "lease expired (worker worker-a went silent)")
    assert h.queue(A).heartbeat(A, old, "busy", 0, 0).directives == {t: Directive.ABANDON}
    assert h.queue(A).heartbeat(A, new, "busy", 0, 0).directives == {t: Directive.CONTINUE}
    h.queue(A).submit(A, [result(run_id, t, r, new[t]) for r in ("a", "b")])
    h.queue(A).complete(A, new)
    h.sync()
    assert h.stored(run_id) == ["a", "b"]
    assert h.task(t).status == "done"


def test_results_are_stored_once_when_a_task_runs_twice(make: Make) -> None:
    h = make(lease_s=0.3)
    run_id, [t] = h.new_run([["a", "b", "c"]])
    register(h, A, B)
    reply = h.queue(A).claim(A, 1)
    assert reply.tasks[0].items == ["a", "b", "c"]
    a = leases(reply)
    h.queue(A).submit(A, [result(run_id, t, "a", a[t])])  # A got one item out
    h.sync()
    h.expire()  # A went silent: the task runs again elsewhere
    again = h.queue(B).claim(B, 1)
    assert [x.items for x in again.tasks] == [["b", "c"]]  # what is stored is not redone
    b = leases(again)
    # B finishes; A was only slow, and hands over everything as well, in columns
    h.queue(B).submit(B, [result(run_id, t, r, b[t], B) for r in ("b", "c")])
    h.queue(B).complete(B, b)
    batch = ResultBatch.empty(run_id, ("http_status",))
    for ref in ("a", "b", "c"):
        batch.add(t, ref, True, "ok", {"http_status": 200}, A, a[t])
    h.queue(A).submit(A, [batch])
    h.queue(A).complete(A, a)
    h.sync()
    assert h.stored(run_id) == ["a", "b", "c"]
    assert h.task(t).status == "done"


def test_a_task_whose_items_are_all_stored_is_completed_by_the_claim(make: Make) -> None:
    h = make()
    run_id, [t] = h.new_run([["a"]])
    register(h, A)
    lease = leases(h.queue(A).claim(A, 1))
    h.queue(A).submit(A, [result(run_id, t, "a", lease[t])])
    h.queue(A).fail(A, lease, "crashed after handing over")
    h.sync()
    assert h.queue(A).claim(A, 1).tasks == []
    assert h.task(t).status == "done"


# --- workers ------------------------------------------------------------------------------------------


def test_a_worker_asked_to_exit_hears_it_on_claim_and_heartbeat(make: Make) -> None:
    h = make()
    _, [t1, t2] = h.new_run([["a"], ["b"]])
    register(h, A, B)
    lease = leases(h.queue(A).claim(A, 1))
    h.request_exit(A)
    reply = h.queue(A).heartbeat(A, lease, "busy", 0, 0)
    assert reply.worker_action is WorkerAction.EXIT
    assert reply.directives == {t1: Directive.CONTINUE}  # it finishes what is in flight
    claimed = h.queue(A).claim(A, 5)
    assert (claimed.worker_action, claimed.tasks) == (WorkerAction.EXIT, [])
    assert h.task(t2).status == "queued"
    assert h.queue(B).heartbeat(B, {}, "idle", 0, 0).worker_action is None  # others go on


def test_unregister_releases_what_the_worker_still_holds(make: Make) -> None:
    h = make()
    _, [t1, t2] = h.new_run([["a"], ["b"]])
    register(h, A)
    lease = leases(h.queue(A).claim(A, 2))
    h.queue(A).complete(A, {t1: lease[t1]})
    h.queue(A).unregister(A, "stopped")
    h.sync()
    assert h.task(t1).status == "done"
    assert h.task(t2) == TaskState("queued", 0, None, None)


# --- how a deployment picks its backends -----------------------------------------------------------


def test_backends_by_name_and_by_database(tmp_path: Path) -> None:
    assert backend_class("memory") is MemoryQueue
    assert backend_class("sql") is SqlQueue
    assert backend_class("pipe") is PipeQueue
    with pytest.raises(ValueError, match="no queue backend"):
        backend_class("redis")
    db = open_database(f"duckdb:///{tmp_path / 'x.duckdb'}")
    try:
        assert pool_backend(db) == "pipe"
    finally:
        db.dispose()

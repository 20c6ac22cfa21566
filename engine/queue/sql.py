"""The queue backend that talks to the database directly, and the boot of workers that use it.

Every call is one transaction through ``storage.queue`` (no SQL here). On PostgreSQL every
process of the fleet uses it; on DuckDB only the coordinator does (its pool goes through
``engine.queue.pipe``).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from engine.jobs import get_kind
from engine.jobs.base import JobKind
from engine.model import ItemResult, ResultBatch, TaskWork, item_ref
from engine.queue.base import EXIT, QueueBackend, Reply, WorkerAction, directive_for
from engine.queue.boot import BootFactory, WorkerBoot
from engine.ratelimit.base import MemoryLimiter, RateLimiter
from engine.settings import Settings
from storage import queue as q
from storage.db import Database, open_database

log = logging.getLogger(__name__)


class SqlQueue(QueueBackend):
    """Queue operations on one database; thread-safe (each call is one transaction)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self._kinds: dict[str, JobKind] = {}
        self._run_meta: dict[int, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._exit_requested: set[str] = set()

    def kind(self, name: str) -> JobKind:
        with self._lock:
            if name not in self._kinds:
                self._kinds[name] = get_kind(name, self.settings)
            return self._kinds[name]

    def kind_of_run(self, conn: sa.Connection, run_id: int) -> JobKind:
        if run_id not in self._run_meta:
            self._run_meta[run_id] = q.run_kind_params(conn, run_id)
        return self.kind(self._run_meta[run_id][0])

    def request_exit(self, worker_id: str) -> None:
        """The next claim or heartbeat of ``worker_id`` through this object says EXIT."""
        self._exit_requested.add(worker_id)

    def _worker_action(self, conn: sa.Connection, worker_id: str) -> WorkerAction | None:
        if worker_id in self._exit_requested:
            return WorkerAction.EXIT
        actions = [a for _, a in q.pending_worker_commands(conn, worker_id)]
        return WorkerAction.EXIT if {"stop", "cancel"} & set(actions) else None

    # --- QueueBackend ------------------------------------------------------------------

    def register(self, worker_id: str, host: str, pid: int, kind: str) -> None:
        with self.db.begin() as conn:
            q.register_worker(conn, worker_id, host, pid, kind)

    def claim(self, worker_id: str, max_tasks: int, run_id: int | None = None) -> Reply:
        # Operator commands for a worker arrive with its heartbeats, not here: a claim is on
        # the hot path and must stay a single statement plus the item lookups.
        if worker_id in self._exit_requested:
            return EXIT
        out: list[TaskWork] = []
        with self.db.begin() as conn:
            claimed = q.claim(
                conn, worker_id, max_tasks, self.settings.lease_s, run_id, self._run_meta
            )
            finished: list[int] = []
            loaded = self._load_items(conn, claimed)
            for task in claimed:
                items = [
                    loaded[task.run_id][ref] for ref in task.refs if ref in loaded[task.run_id]
                ]
                if not items:  # everything already stored by an earlier attempt
                    finished.append(task.id)
                    continue
                out.append(
                    TaskWork(
                        id=task.id,
                        run_id=task.run_id,
                        kind=task.kind,
                        params=task.params,
                        items=items,
                        attempts=task.attempts,
                    )
                )
            q.complete(conn, finished)
        return Reply(tasks=out)

    def _load_items(
        self, conn: sa.Connection, claimed: list[q.ClaimedTask]
    ) -> dict[int, dict[Any, Any]]:
        """Items of all claimed tasks, one lookup per run: run id → item ref → item."""
        by_run: dict[int, list[Any]] = defaultdict(list)
        for task in claimed:
            by_run[task.run_id].extend(task.refs)
        out: dict[int, dict[Any, Any]] = {}
        for run_id, refs in by_run.items():
            kind = self.kind(self._run_meta[run_id][0])
            out[run_id] = {item_ref(i): i for i in kind.load_items(conn, run_id, refs)}
        return out

    def heartbeat(
        self, worker_id: str, task_ids: list[int], status: str, done: int, failed: int
    ) -> Reply:
        with self.db.begin() as conn:
            statuses = q.heartbeat(conn, worker_id, task_ids, self.settings.lease_s)
            q.touch_worker(conn, worker_id, status, task_ids, done, failed)
            action = self._worker_action(conn, worker_id)
        return Reply(
            directives={t: directive_for(s) for t, s in statuses.items()}, worker_action=action
        )

    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None:
        self.store(results)

    def store(
        self, results: list[ItemResult | ResultBatch], complete: list[int] | None = None
    ) -> int:
        """Store results (and mark tasks done) in one transaction; returns new results.

        Columnar batches of one run are merged and stored with one ``store_batch`` call."""
        if not results and not complete:
            return 0
        new = 0
        by_run: dict[int, list[ItemResult]] = defaultdict(list)
        batches: dict[int, ResultBatch] = {}
        task_set = set(complete or ())
        for r in results:
            if isinstance(r, ResultBatch):
                task_set.update(r.task_ids)
                merged = batches.get(r.run_id)
                if merged is None:
                    merged = batches[r.run_id] = ResultBatch.empty(r.run_id, tuple(r.columns))
                merged.extend(r)
            else:
                task_set.add(r.task_id)
                by_run[r.run_id].append(r)
        with self.db.begin() as conn:
            # Two executions of one task (a lease that expired under a slow worker)
            # serialise here, so each item counts as new exactly once.
            q.lock_tasks(conn, sorted(task_set))
            for run_id, items in by_run.items():
                new += self.kind_of_run(conn, run_id).store(conn, items)
            for run_id, batch in batches.items():
                new += self.kind_of_run(conn, run_id).store_batch(conn, batch)
            q.complete(conn, complete or [])
        return new

    def complete(self, worker_id: str, task_ids: list[int]) -> None:
        self.store([], task_ids)

    def release(self, worker_id: str, task_ids: list[int]) -> None:
        with self.db.begin() as conn:
            q.release(conn, worker_id, task_ids)

    def fail(self, worker_id: str, task_ids: list[int], error: str) -> None:
        with self.db.begin() as conn:
            q.fail(conn, task_ids, error, self.settings.retry_backoff_s, worker_id=worker_id)
            q.record_task_errors(conn, task_ids, worker_id, "task_failed", error)

    def unregister(self, worker_id: str, reason: str) -> None:
        with self.db.begin() as conn:
            q.release(conn, worker_id, q.tasks_of_worker(conn, worker_id))
            q.end_worker(conn, worker_id, "exited", reason)


def database_limiter(db: Database) -> RateLimiter:
    """A worker connected to ``db``: on PostgreSQL it shares rate limits with the whole fleet
    through the database; otherwise it is alone (DuckDB allows one process) and a
    ``MemoryLimiter`` is exact."""
    if db.dialect == "postgresql":
        from engine.ratelimit.postgres import PgLimiter

        return PgLimiter(db)
    return MemoryLimiter()


@dataclass(kw_only=True)
class SqlBoot(WorkerBoot):
    """A worker that connects to the database itself (PostgreSQL): a pool worker of a
    PostgreSQL coordinator, or a standalone ``engine.run worker``."""

    db_url: str
    create: bool = False  # create/migrate the schema (a standalone worker may be first)
    _db: Database | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def factory(cls, db_url: str) -> BootFactory:
        """A pool's ``BootFactory`` for workers of ``db_url``."""

        def boot(worker_id: str, settings: Settings, log_level: str) -> SqlBoot:
            return cls(
                worker_id=worker_id,
                settings=settings.model_dump(mode="json"),
                log_level=log_level,
                db_url=db_url,
            )

        return boot

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = open_database(self.db_url, create=self.create)
        return self._db

    def open_backend(self) -> SqlQueue:
        return SqlQueue(self.db, self.load_settings())

    def open_limiter(self) -> RateLimiter:
        return database_limiter(self.db)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None

"""The queue backend that talks to the database directly, and the boot of workers that use it.

Every call is one transaction through ``storage.queue`` (no SQL here). On PostgreSQL every
process of the fleet uses it; on DuckDB only the coordinator does (its pool goes through
``engine.queue.pipe``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from engine.jobs import get_kind
from engine.jobs.base import JobKind, unstorable_row
from engine.model import ItemResult, ResultBatch, TaskWork, item_ref
from engine.queue.base import EXIT, Leases, QueueBackend, Reply, WorkerAction, directive_for
from engine.queue.boot import BootFactory, WorkerBoot
from engine.ratelimit.base import MemoryLimiter, RateLimiter
from engine.settings import Settings
from engine.version import is_dirty, short
from storage import proxies as proxy_store
from storage import queue as q
from storage import runs
from storage.clock import utcnow
from storage.db import Database, open_database
from storage.error_log import add_errors
from storage.errors import is_transient

log = logging.getLogger(__name__)


REFUSALS_EVERY_S = 5.0  # how often an idle worker looks for runs of another version
BOOT_OUTAGE_S = 600.0  # how long a starting worker waits for a database that does not answer


class SqlQueue(QueueBackend):
    """Queue operations on one database; thread-safe (each call is one transaction).

    ``version``: the code version of the workers it serves (``engine.version``), recorded
    when they register. With ``check_version`` their claims take only tasks of runs created
    by that version (or by none); a run they leave alone is reported once per worker: a
    warning in this process's log and a note on the run, which the CLI following it prints
    (``storage.runs.add_note``). Without a version (tests, ``--ignore-version``) every run
    is served.
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        version: str | None = None,
        check_version: bool = True,
    ) -> None:
        self.db = db
        self.settings = settings
        self.version = version
        self._claim_version = version if check_version else None
        self._hosts: dict[str, str] = {}  # worker id → the host it registered under
        self._refused: dict[str, set[int]] = defaultdict(set)  # runs reported per worker
        self._refusals_at: dict[str, float] = {}  # worker → when it last looked
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

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def request_exit(self, worker_id: str) -> None:
        """The next claim or heartbeat of ``worker_id`` through this object says EXIT."""
        self._exit_requested.add(worker_id)

    def _worker_action(self, conn: sa.Connection, worker_id: str) -> WorkerAction | None:
        if worker_id in self._exit_requested:
            return WorkerAction.EXIT
        actions = [a for _, a in q.pending_worker_commands(conn, worker_id)]
        return WorkerAction.EXIT if {"stop", "cancel"} & set(actions) else None

    # --- QueueBackend ------------------------------------------------------------------

    def register(
        self, worker_id: str, host: str, pid: int, kind: str, countries: Sequence[str] = ()
    ) -> None:
        self._hosts[worker_id] = host
        with self.db.begin() as conn:
            q.register_worker(
                conn, worker_id, host, pid, kind, countries=countries, code_version=self.version
            )

    def claim(
        self,
        worker_id: str,
        max_tasks: int,
        run_id: int | None = None,
        countries: Sequence[str] = (),
    ) -> Reply:
        # Operator commands for a worker arrive with its heartbeats, not here: a claim is on
        # the hot path and must stay a single statement plus the item lookups.
        if worker_id in self._exit_requested:
            return EXIT
        out: list[TaskWork] = []
        with self.db.begin() as conn:
            claimed = q.claim(
                conn,
                worker_id,
                max_tasks,
                self.settings.lease_s,
                run_id,
                self._run_meta,
                countries=countries,
                version=self._claim_version,
            )
            finished: dict[int, str] = {}
            loaded = self._load_items(conn, claimed)
            for task in claimed:
                items = [
                    loaded[task.run_id][ref] for ref in task.refs if ref in loaded[task.run_id]
                ]
                if not items:  # everything already stored by an earlier attempt
                    finished[task.id] = task.lease_token
                    continue
                out.append(
                    TaskWork(
                        id=task.id,
                        run_id=task.run_id,
                        kind=task.kind,
                        params=task.params,
                        items=items,
                        attempts=task.attempts,
                        lease=task.lease_token,
                    )
                )
            q.complete_leases(conn, finished.items())
        if len(claimed) < max_tasks:
            self._report_refusals(worker_id, run_id)
        return Reply(tasks=out)

    def _report_refusals(self, worker_id: str, run_id: int | None) -> None:
        """Runs of another version that this worker leaves alone: said once per run, in
        this process's log and as a note on the run. Looked for at most every
        ``REFUSALS_EVERY_S`` per worker, and only when a claim came back short."""
        mine = self._claim_version
        now = time.monotonic()
        if mine is None or now - self._refusals_at.get(worker_id, -1e9) < REFUSALS_EVERY_S:
            return
        self._refusals_at[worker_id] = now
        with self.db.begin() as conn:
            for rid, theirs in q.refused_runs(conn, mine, run_id):
                if rid in self._refused[worker_id]:
                    continue
                self._refused[worker_id].add(rid)
                line = version_refusal(rid, theirs, mine, worker_id, self._hosts.get(worker_id))
                log.warning("%s", line)
                runs.add_note(conn, rid, line)

    def proxy_pool(self, worker_id: str, run_id: int) -> list[tuple[Any, ...]]:
        with self.db.connect() as conn:
            return proxy_store.read_run_pool(conn, run_id)

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
        self, worker_id: str, leases: Leases, status: str, done: int, failed: int
    ) -> Reply:
        task_ids = list(leases)
        with self.db.begin() as conn:
            statuses = q.heartbeat(conn, worker_id, task_ids, self.settings.lease_s, leases)
            q.touch_worker(conn, worker_id, status, task_ids, done, failed)
            action = self._worker_action(conn, worker_id)
        return Reply(
            directives={t: directive_for(s) for t, s in statuses.items()}, worker_action=action
        )

    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None:
        self.store(results)

    def store(
        self,
        results: list[ItemResult | ResultBatch],
        complete: Sequence[tuple[int, str]] = (),
    ) -> int:
        """Store results (and mark tasks done) in one transaction; returns new results.

        Columnar batches of one run are merged and stored with one ``store_batch`` call.
        One poison result (data its kind cannot store) never blocks the others: when the
        transaction fails for a reason that does not pass (``storage.errors.is_transient``),
        the results are stored again part by part, halving the parts that fail, until each
        poison result stands alone; those are stored as failed items (``store_failed``) and
        the rest as usual, then the tasks are completed. A transient failure is raised: the
        caller keeps the results and tries again later (stored ones are not stored twice).

        ``complete`` is the (task id, lease token) pairs whose tasks are done. Results (each
        fenced by its own ``lease``) and completions of a lease that is no longer the task's
        (it expired; the task may be someone else's now, or its worker's again under a new
        claim) are dropped: the task runs again where it is held now, and only that
        execution counts."""
        if not results and not complete:
            return 0
        parts = _by_run(results)
        done = list(complete)
        try:
            with self.db.begin() as conn:
                new = self._store_parts(conn, parts, [t for t, _ in done])
                q.complete_leases(conn, done)
            return new
        except Exception as exc:
            if not results or is_transient(exc):
                raise
            n = sum(len(part) for _, part in parts)
            log.warning("storing %d result(s) failed (%s); isolating the bad ones", n, exc)
        new = sum(self._isolate(run_id, part) for run_id, part in parts)
        if done:
            with self.db.begin() as conn:
                q.complete_leases(conn, done)
        return new

    def _fenced(
        self, conn: sa.Connection, parts: list[tuple[int, _Part]]
    ) -> list[tuple[int, _Part]]:
        """The results fetched under their task's current lease (rows locked by now)."""
        tasks = {t for _, part in parts for t in _task_ids(part)}
        now = q.current_leases(conn, sorted(tasks))
        out: list[tuple[int, _Part]] = []
        dropped: set[int] = set()

        def holds(task_id: int, lease: str) -> bool:
            return bool(lease) and now.get(task_id) == lease

        for run_id, part in parts:
            if isinstance(part, ResultBatch):
                pairs = zip(part.task_ids, part.leases, strict=True)
                keep = [i for i, (t, lease) in enumerate(pairs) if holds(t, lease)]
            else:
                keep = [i for i, r in enumerate(part) if holds(r.task_id, r.lease)]
            if len(keep) == len(part):
                out.append((run_id, part))
                continue
            kept_set = set(keep)
            dropped.update(t for i, t in enumerate(_task_list(part)) if i not in kept_set)
            if keep:
                out.append((run_id, part.keep(keep) if isinstance(part, ResultBatch)
                            else [part[i] for i in keep]))  # fmt: skip
        if dropped:
            log.info("dropped results of lost leases (tasks %s): they run where held now",
                     sorted(dropped)[:20])  # fmt: skip
        return out

    def _store_parts(
        self, conn: sa.Connection, parts: list[tuple[int, _Part]], also_lock: list[int]
    ) -> int:
        # Two executions of one task (a lease that expired under a slow worker)
        # serialise here, so each item counts as new exactly once.
        tasks = {t for _, part in parts for t in _task_ids(part)} | set(also_lock)
        q.lock_tasks(conn, sorted(tasks))
        new = 0
        for run_id, part in self._fenced(conn, parts):
            kind = self.kind_of_run(conn, run_id)
            new += (
                kind.store_batch(conn, part)
                if isinstance(part, ResultBatch)
                else kind.store(conn, part)
            )
        return new

    def _isolate(self, run_id: int, part: _Part) -> int:
        """Store ``part`` of one run in transactions of its own, halving what fails until
        the poison results stand alone (at most ~2 log2(n) transactions per poison one)."""
        new = 0
        todo = [part]
        while todo:
            one = todo.pop()
            try:
                with self.db.begin() as conn:
                    new += self._store_parts(conn, [(run_id, one)], [])
                continue
            except Exception as exc:
                if is_transient(exc):
                    raise
                if len(one) > 1:
                    half = len(one) // 2
                    todo += [_slice(one, half, len(one)), _slice(one, 0, half)]
                    continue
                error = f"{type(exc).__name__}: {exc}"
            new += self._store_poison(run_id, one, error)
        return new

    def _store_poison(self, run_id: int, part: _Part, error: str) -> int:
        """A result its kind cannot store: stored as a failed item with the error, or,
        should even that fail, only logged in ``errors`` (its task still completes)."""
        results = part.to_results() if isinstance(part, ResultBatch) else part
        error = f"its result could not be stored: {error}"
        log.error("run %s, item %s: %s", run_id, results[0].ref, error)
        try:
            with self.db.begin() as conn:
                return self.kind_of_run(conn, run_id).store_failed(conn, results, error)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("run %s: the failed result could not be stored either", run_id)
        with self.db.begin() as conn:
            add_errors(conn, [unstorable_row(r, error, utcnow()) for r in results])
        return 0

    def complete(self, worker_id: str, leases: Leases) -> None:
        self.store([], list(leases.items()))

    def release(self, worker_id: str, leases: Leases) -> None:
        with self.db.begin() as conn:
            q.release(conn, worker_id, list(leases), leases)

    def fail(self, worker_id: str, leases: Leases, error: str) -> None:
        task_ids = list(leases)
        with self.db.begin() as conn:
            q.fail(conn, task_ids, error, self.settings.retry_backoff_s, worker_id, leases)
            q.record_task_errors(conn, task_ids, worker_id, "task_failed", error)

    def unregister(self, worker_id: str, reason: str) -> None:
        with self.db.begin() as conn:
            q.release(conn, worker_id, q.tasks_of_worker(conn, worker_id))
            q.end_worker(conn, worker_id, "exited", reason)


_Part = list[ItemResult] | ResultBatch  # results of one run, stored together


def _by_run(results: list[ItemResult | ResultBatch]) -> list[tuple[int, _Part]]:
    """Results grouped by run: columnar batches of one run merged into one, items listed."""
    items: dict[int, list[ItemResult]] = defaultdict(list)
    batches: dict[int, ResultBatch] = {}
    for r in results:
        if isinstance(r, ResultBatch):
            merged = batches.get(r.run_id)
            if merged is None:
                merged = batches[r.run_id] = ResultBatch.empty(r.run_id, tuple(r.columns))
            merged.extend(r)
        else:
            items[r.run_id].append(r)
    return [*items.items(), *batches.items()]


def _task_ids(part: _Part) -> set[int]:
    return set(part.task_ids) if isinstance(part, ResultBatch) else {r.task_id for r in part}


def _task_list(part: _Part) -> list[int]:
    return part.task_ids if isinstance(part, ResultBatch) else [r.task_id for r in part]


def _slice(part: _Part, start: int, stop: int) -> _Part:
    return part.part(start, stop) if isinstance(part, ResultBatch) else part[start:stop]


def version_refusal(run_id: int, theirs: str, mine: str, worker_id: str, host: str | None) -> str:
    """Why a worker leaves a run's tasks alone, and what to do about it."""
    where = host or "HOST"
    line = (
        f"run {run_id} was started by version {short(theirs)}, worker {worker_id} runs "
        f"{short(mine)}: it does not take the run's tasks; deploy the same version "
        f"(`deploy {where}`), then restart the worker (`fleet start {where}`)"
    )
    if is_dirty(theirs) or is_dirty(mine):
        line += (
            "; a -dirty version runs uncommitted changes, which deploy does not ship: "
            "commit them first"
        )
    return line


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
    # The code version it claims for (``SqlQueue``): a pool worker gets its coordinator's,
    # a standalone worker computes its own (``engine.version.code_version``).
    version: str | None = None
    ignore_version: bool = False  # ``worker --ignore-version``: serve every run
    # How long opening the database waits for a server that does not answer: a pool worker
    # (its coordinator has the database open) waits out a restart; a standalone worker
    # started by hand says so at once, where a wrong address is likelier than an outage.
    outage_s: float = BOOT_OUTAGE_S
    _db: Database | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def factory(cls, db_url: str, version: str | None = None) -> BootFactory:
        """A pool's ``BootFactory`` for workers of ``db_url`` running ``version``."""

        def boot(worker_id: str, settings: Settings, log_level: str) -> SqlBoot:
            return cls(
                worker_id=worker_id,
                settings=settings.model_dump(mode="json"),
                log_level=log_level,
                db_url=db_url,
                version=version,
            )

        return boot

    @property
    def db(self) -> Database:
        if self._db is None:
            # A worker cut off mid-transaction must not keep its task rows locked (the
            # watchdog's re-queue would wait on them until TCP gives up, for minutes): the
            # server ends such a session after a lease.
            lease_s = self.load_settings().lease_s
            # A worker that starts while the database is away (restarting) waits it out
            # as a running one does, instead of dying and being replaced in a loop.
            self._db = open_database(
                self.db_url,
                create=self.create,
                idle_in_transaction_s=lease_s,
                outage_s=self.outage_s,
            )
        return self._db

    def open_backend(self) -> SqlQueue:
        from engine.version import code_version

        version = self.version or code_version()
        return SqlQueue(
            self.db, self.load_settings(), version, check_version=not self.ignore_version
        )

    def open_limiter(self) -> RateLimiter:
        return database_limiter(self.db)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None

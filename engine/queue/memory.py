"""``MemoryQueue``: the whole queue contract in a few dicts, for tests of code that talks to a
``QueueBackend`` (a worker loop, a new kind) without a database or processes.

Time is ``clock()`` (injectable: a test moves it instead of sleeping). Items are their own
references, and results are kept in ``results`` by (run, item ref), stored once. The
supervisor's side — runs, tasks, commands, the watchdog — is plain methods here, where the
real deployments use ``storage`` (``add_run``/``add_tasks`` ≈ planning, ``set_run_status`` ≈
an operator command, ``requeue_expired`` ≈ the coordinator's watchdog).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.model import ItemResult, ResultBatch, TaskWork
from engine.queue.base import EXIT, Leases, QueueBackend, Reply, WorkerAction, directive_for
from storage.queue import DEFAULT_MAX_LOST_LEASES, lost_too_often


@dataclass(slots=True)
class MemoryTask:
    id: int
    run_id: int
    seq: int
    refs: list[Any]
    max_attempts: int
    country: str | None = None  # only a worker serving it claims the task; None: any
    status: str = "queued"  # queued, leased, done, failed
    attempts: int = 0
    worker_id: str | None = None
    lease_token: str | None = None  # one per claim: fences a holder whose lease expired
    lease_until: float = 0.0
    available_at: float = 0.0
    last_error: str | None = None
    lost_leases: int = 0  # holders lost (died, silent): failed at max_lost_leases


class MemoryQueue(QueueBackend):
    def __init__(
        self,
        lease_s: float = 30.0,
        retry_backoff_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> None:
        self.lease_s = lease_s
        self.retry_backoff_s = retry_backoff_s
        self.max_lost_leases = max_lost_leases
        self.clock = clock
        self.runs: dict[int, tuple[str, dict[str, Any], str]] = {}  # id → kind, params, status
        self.tasks: dict[int, MemoryTask] = {}
        self.results: dict[tuple[int, Any], ItemResult] = {}
        self.workers: dict[str, str] = {}  # id → status
        self.countries: dict[str, tuple[str, ...]] = {}  # id → the countries it serves
        self._exit: set[str] = set()
        self._tokens = itertools.count(1)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # --- the supervisor's side -----------------------------------------------------------

    def add_run(self, kind: str = "memory", params: dict[str, Any] | None = None) -> int:
        run_id = next(self._ids)
        self.runs[run_id] = (kind, params or {}, "running")
        return run_id

    def add_tasks(
        self,
        run_id: int,
        batches: Sequence[Sequence[Any]],
        max_attempts: int = 3,
        countries: Sequence[str | None] | None = None,
    ) -> list[int]:
        """One queued task per batch of item references (of ``countries``' entry, one per
        batch, when given); returns their ids."""
        with self._lock:
            start = sum(1 for t in self.tasks.values() if t.run_id == run_id)
            ids = [next(self._ids) for _ in batches]
            of = list(countries) if countries is not None else [None] * len(batches)
            for i, (task_id, refs, country) in enumerate(zip(ids, batches, of, strict=True)):
                self.tasks[task_id] = MemoryTask(
                    task_id, run_id, start + i, list(refs), max_attempts, country
                )
            return ids

    def set_run_status(self, run_id: int, status: str) -> None:
        kind, params, _ = self.runs[run_id]
        self.runs[run_id] = (kind, params, status)

    def request_exit(self, worker_id: str) -> None:
        self._exit.add(worker_id)

    def requeue_expired(self) -> list[tuple[int, str]]:
        """The watchdog: a lease past its time goes back to the queue, without counting an
        attempt (its worker went silent; the token fences it off), or fails once the task
        has lost ``max_lost_leases`` holders (``storage.queue.requeue_expired``)."""
        with self._lock:
            now = self.clock()
            expired = [
                t for t in self.tasks.values() if t.status == "leased" and t.lease_until < now
            ]
            out = [(t.id, t.worker_id or "") for t in expired]
            for t in expired:
                t.lost_leases += 1
                capped = t.lost_leases >= self.max_lost_leases
                t.last_error = (
                    lost_too_often(self.max_lost_leases)
                    if capped
                    else f"lease expired (worker {t.worker_id} went silent)"
                )
                t.status = "failed" if capped else "queued"
                t.worker_id, t.lease_token = None, None
                t.attempts = max(0, t.attempts - 1)
                t.available_at = now + self.retry_backoff_s
            return out

    def _fail(self, t: MemoryTask, error: str) -> None:
        t.status = "failed" if t.attempts >= t.max_attempts else "queued"
        t.available_at = self.clock() + self.retry_backoff_s * 2 ** max(t.attempts - 1, 0)
        t.worker_id, t.lease_token, t.last_error = None, None, error[:2000]

    def _holds(self, worker_id: str, task_id: int, lease: str) -> bool:
        t = self.tasks.get(task_id)
        return (
            t is not None
            and t.status == "leased"
            and t.worker_id == worker_id
            and bool(lease)
            and t.lease_token == lease
        )

    def _held(self, worker_id: str, leases: Leases) -> list[MemoryTask]:
        return [self.tasks[i] for i, lease in leases.items() if self._holds(worker_id, i, lease)]

    # --- QueueBackend ----------------------------------------------------------------------

    def register(
        self, worker_id: str, host: str, pid: int, kind: str, countries: Sequence[str] = ()
    ) -> None:
        self.workers[worker_id] = "starting"
        self.countries[worker_id] = tuple(sorted(set(countries)))

    def claim(
        self,
        worker_id: str,
        max_tasks: int,
        run_id: int | None = None,
        countries: Sequence[str] = (),
    ) -> Reply:
        if worker_id in self._exit:
            return EXIT
        serves = set(countries)
        with self._lock:
            now = self.clock()
            ready = sorted(
                (
                    t
                    for t in self.tasks.values()
                    if t.status == "queued"
                    and self.runs[t.run_id][2] == "running"
                    and t.available_at <= now
                    and run_id in (None, t.run_id)
                    and (not serves or t.country is None or t.country in serves)
                ),
                key=lambda t: (t.run_id, t.seq),
            )[:max_tasks]
            out = []
            token = f"m{next(self._tokens)}"
            for t in ready:
                t.status, t.worker_id, t.lease_until = "leased", worker_id, now + self.lease_s
                t.lease_token = token
                t.attempts += 1
                items = [r for r in t.refs if (t.run_id, r) not in self.results]
                if not items:  # everything already stored by an earlier attempt
                    t.status, t.worker_id, t.lease_token = "done", None, None
                    continue
                kind, params, _ = self.runs[t.run_id]
                out.append(TaskWork(t.id, t.run_id, kind, params, items, t.attempts, token))
            return Reply(tasks=out)

    def heartbeat(
        self, worker_id: str, leases: Leases, status: str, done: int, failed: int
    ) -> Reply:
        with self._lock:
            self.workers[worker_id] = status
            directives = {i: directive_for("lost") for i in leases}
            for t in self._held(worker_id, leases):
                t.lease_until = self.clock() + self.lease_s
                directives[t.id] = directive_for(self.runs[t.run_id][2])
        action = WorkerAction.EXIT if worker_id in self._exit else None
        return Reply(directives=directives, worker_action=action)

    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None:
        with self._lock:
            for r in results:
                for one in r.to_results() if isinstance(r, ResultBatch) else (r,):
                    if self._holds(one.worker_id, one.task_id, one.lease):  # else: a lost lease's
                        self.results.setdefault((one.run_id, one.ref), one)

    def complete(self, worker_id: str, leases: Leases) -> None:
        with self._lock:
            for t in self._held(worker_id, leases):
                t.status, t.worker_id, t.lease_token = "done", None, None

    def release(self, worker_id: str, leases: Leases) -> None:
        with self._lock:
            for t in self._held(worker_id, leases):
                t.status, t.worker_id, t.attempts = "queued", None, t.attempts - 1
                t.lease_token = None

    def fail(self, worker_id: str, leases: Leases, error: str) -> None:
        with self._lock:
            for t in self._held(worker_id, leases):
                self._fail(t, error)

    def unregister(self, worker_id: str, reason: str) -> None:
        held = {
            t.id: t.lease_token
            for t in self.tasks.values()
            if t.worker_id == worker_id and t.lease_token is not None
        }
        self.release(worker_id, held)
        self.workers[worker_id] = "exited"

"""The queue contract every worker talks to, whatever the deployment.

Three backends implement it (``engine.queue`` picks one from the database):

* ``SqlQueue``: the database itself — PostgreSQL for every process, or DuckDB inside the
  coordinator;
* ``PipeQueue``: a pool worker's proxy to its coordinator over a pipe of its own, served by
  ``PipeServer`` there, because only the coordinator may open DuckDB;
* ``MemoryQueue``: an in-memory fake with an injectable clock, for tests.

The worker loop is the same code for all of them. Calls are blocking; the worker runs them in
a thread so its event loop keeps executing items. ``tests/test_queue_contract.py`` runs one
suite against every backend: a new backend passes it or is not a backend.

Delivery is at-least-once: a task whose lease expired runs again, possibly while its first
worker is still busy with it. Storage is exactly-once: results are keyed by (run, item ref)
and a result already stored is never stored again, so the second execution adds nothing.

**Leases.** Every claim gives each task a lease token (``TaskWork.lease``). The worker acts
on a task only through that token: it tags every result with it (``ItemResult.lease``) and
passes ``Leases`` (task id → token) to ``heartbeat``, ``complete``, ``release`` and
``fail``. A backend acts only on tasks still leased under the given token, so an execution
whose lease was lost is fenced off even when the same worker has claimed the task again
meanwhile (a cut host whose link comes back before its heartbeat hears of the loss).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.model import ItemResult, ResultBatch, TaskWork


class Directive(Enum):
    """What a worker does with a task it holds, by its run's status (see ``heartbeat``)."""

    CONTINUE = "continue"  # the run is running: keep going
    RELEASE = "release"  # run paused / stopping: finish in-flight items, hand the rest back
    ABANDON = "abandon"  # lease lost or run over: stop working on it, hand nothing back


def directive_for(run_status: str) -> Directive:
    """The directive for a held task whose run has ``run_status`` (``lost``: not held)."""
    if run_status == "running":
        return Directive.CONTINUE
    if run_status in ("paused", "stopping", "stopped", "cancelled"):
        return Directive.RELEASE
    return Directive.ABANDON


class WorkerAction(Enum):
    """What a worker as a whole is told to do besides its tasks."""

    EXIT = "exit"  # finish in-flight items, hand held tasks back, unregister, end


@dataclass(frozen=True, slots=True)
class Reply:
    """A backend's answer to ``claim`` and ``heartbeat``."""

    tasks: list[TaskWork] = field(default_factory=list)
    directives: dict[int, Directive] = field(default_factory=dict)
    worker_action: WorkerAction | None = None


EXIT = Reply(worker_action=WorkerAction.EXIT)

Leases = Mapping[int, str]  # task id → the lease token of the claim that gave it


def leases_of(tasks: Iterable[TaskWork]) -> dict[int, str]:
    """The leases of claimed tasks, as ``heartbeat``/``complete``/``release``/``fail`` take."""
    return {t.id: t.lease for t in tasks}


FLUSH_BACKOFF_MAX_S = 5.0


def flush_delay(flush_s: float, failures: int) -> float:
    """The wait before the next hand-over of buffered results (a worker's, a coordinator's):
    ``flush_s``, doubled per failure in a row (a database restarting, a deadlock), up to
    ``FLUSH_BACKOFF_MAX_S``."""
    return min(flush_s * 2 ** min(failures, 16), max(flush_s, FLUSH_BACKOFF_MAX_S))


class QueueBackend(ABC):
    """The worker side of the task queue. Every method is one atomic step (one transaction
    or one message) and may be called from any thread of the worker."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a call that raised ``exc`` may succeed unchanged later (the database
        restarting, the coordinator busy): the worker retries those with backoff and a log
        line, and never counts them as a task's failure. Backends refine it."""
        return isinstance(exc, ConnectionError | TimeoutError)

    @abstractmethod
    def register(
        self, worker_id: str, host: str, pid: int, kind: str, countries: Sequence[str] = ()
    ) -> None:
        """Announce a worker before its first claim: it is listed (status ``starting``) with
        its host, pid, kind (``local``, ``standalone``…) and the countries it serves (normal
        forms, ``engine.countries``; empty: any), which it passes to each ``claim``.
        Registering an id again starts its record afresh."""

    @abstractmethod
    def claim(
        self,
        worker_id: str,
        max_tasks: int,
        run_id: int | None = None,
        countries: Sequence[str] = (),
    ) -> Reply:
        """Lease up to ``max_tasks`` queued tasks to ``worker_id``; none when asked to exit.

        Only tasks of runs whose status is ``running`` (and of ``run_id``, when given) whose
        backoff has passed (``available_at``) are taken, in (run, sequence) order. With
        ``countries`` (normal forms), only tasks of no country or of one of them: a task
        planned for a country is claimed only by a worker that serves it. Each claim
        counts as an attempt (``attempts + 1``) and holds a lease for the deployment's
        ``lease_s``, which heartbeats extend. A returned ``TaskWork`` carries the items still
        to do: items whose result is already stored (an earlier attempt) are left out, and a
        task with nothing left is completed at once and not returned. The reply's
        ``worker_action`` is ``EXIT`` when the worker was asked to exit: it gets no task."""

    @abstractmethod
    def heartbeat(
        self, worker_id: str, leases: Leases, status: str, done: int, failed: int
    ) -> Reply:
        """Extend the ``leases`` (task id → token) that ``worker_id`` still holds and
        record the worker's liveness (``status`` idle/busy, items done/failed since the
        last heartbeat, added to its counters).

        The reply has one ``Directive`` per task id: ``directive_for`` its run's status for
        a task still held under the given token; ``ABANDON`` for one whose lease was lost
        (expired and re-queued, or claimed again, by another worker or this one) — it is not
        extended. ``worker_action`` is
        ``EXIT`` when the worker was asked to exit (by its coordinator or a stop command)."""

    @abstractmethod
    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None:
        """Hand over results; they are stored exactly once per (run, item ref): a result for
        an item already stored is dropped, and so is one whose ``lease`` is no longer its
        task's (its execution was fenced off). May be buffered (``PipeQueue``), but results
        are always stored before a ``complete`` that the same worker sent after them."""

    @abstractmethod
    def complete(self, worker_id: str, leases: Leases) -> None:
        """Every item of these tasks has its result handed over under these leases: the
        tasks still leased under them are ``done``; the others are left alone (a lost
        lease completes nothing)."""

    @abstractmethod
    def release(self, worker_id: str, leases: Leases) -> None:
        """Hand held tasks back untouched (a graceful stop, a paused run): they are queued
        again at once and the claim does not count as an attempt. Tasks that this worker
        no longer holds under these leases are left alone."""

    @abstractmethod
    def fail(self, worker_id: str, leases: Leases, error: str) -> None:
        """A failed attempt at tasks this worker holds under ``leases`` (``error`` is the
        task's last error and recorded): each goes back to the queue, claimable after
        ``retry_backoff_s * 2 ** (attempts - 1)``, or becomes ``failed`` once it has had
        ``max_attempts`` attempts."""

    def proxy_pool(self, worker_id: str, run_id: int) -> list[tuple[Any, ...]]:
        """The proxy pool a run routes through, as its coordinator copied it into the
        database when it planned the run (``storage.proxies.snapshot_run_pool``): rows of
        (protocol, scheme, host, port, username, password as a Fernet token), never a plain
        password. Read once per run and process, when its executor opens."""
        raise NotImplementedError(f"{type(self).__name__} keeps no proxy pools")

    @abstractmethod
    def unregister(self, worker_id: str, reason: str) -> None:
        """The worker ends (``reason`` is shown): tasks it still holds are released as by
        ``release`` and its record is marked exited."""

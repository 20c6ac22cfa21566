"""The run-kind interfaces: what makes ``validate``, ``scrape``, ``backfill`` and pipelines differ.

A kind says how to plan items into tasks (coordinator), how to turn stored item references
into executable items and how to store results (wherever results are written: the
coordinator with DuckDB, each worker with PostgreSQL), and how to execute one item (inside a
worker's asyncio loop). Everything else — leases, retries, commands, the pool — is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from engine.jobs.params import Params
from engine.model import ItemResult, ResultBatch
from engine.settings import Settings

if TYPE_CHECKING:  # not at run time: pool workers import kinds and never touch SQL
    import sqlalchemy as sa

    from engine.ratelimit.base import RateLimiter
    from storage.db import Database
    from storage.item_logs import ItemLog


@dataclass(frozen=True, slots=True)
class WorkerEnv:
    """What a worker process provides to the executors it opens: resources shared by every
    run in the process and chosen by its deployment, which a kind cannot see.

    ``limiter``: the rate limiter shared with every process of the deployment (the pool's
    mmap'd file with DuckDB, the database with PostgreSQL, in memory for a process alone).
    ``proxy_pool``: set by the worker for the run whose executor it opens: reads that run's
    proxy pool through the worker's queue backend (``QueueBackend.proxy_pool``), wherever
    the worker runs; None for an executor opened outside a worker.
    """

    limiter: RateLimiter
    proxy_pool: Callable[[], Awaitable[list[tuple[Any, ...]]]] | None = None

    @classmethod
    def local(cls) -> WorkerEnv:
        """A process alone (tests, one-off executors): limits held in memory."""
        from engine.ratelimit.base import MemoryLimiter

        return cls(limiter=MemoryLimiter())


@dataclass(frozen=True, slots=True)
class CountryBatch:
    """A batch of item references that ``plan`` yields for one country (any form: it is
    normalised with ``engine.countries.normal_country``)."""

    refs: Sequence[Any]
    country: str | None


def batch_countries(
    batches: Sequence[Sequence[Any] | CountryBatch], default: str | None
) -> tuple[list[Sequence[Any]], list[str | None]]:
    """What ``plan`` yielded → (item references per task, country per task, normal form):
    a plain batch gets ``default`` (``JobKind.task_country``)."""
    from engine.countries import normal_country

    refs: list[Sequence[Any]] = []
    countries: list[str | None] = []
    for b in batches:
        if isinstance(b, CountryBatch):
            refs.append(b.refs)
            countries.append(normal_country(b.country))
        else:
            refs.append(b)
            countries.append(default)
    return refs, countries


class Executor(ABC):
    """Per worker process and run: holds clients (a checker, a browser) across items."""

    @abstractmethod
    async def execute(self, item: Any) -> tuple[bool, str, dict[str, Any]]:
        """Run one item; returns (ok, outcome, data). Must not raise for item-level failures."""

    def error_data(self, item: Any, error: str) -> dict[str, Any]:
        """The ``data`` of a failed result for ``item`` when ``execute`` raised (``error``
        says what): something ``store`` can store. Default: ``{"error": error}``; a kind
        whose results have another shape (a scrape page) builds its own."""
        return {"error": error}

    async def aclose(self) -> None:  # noqa: B027 — optional hook
        """Release clients."""


class RunKind(ABC):
    """What every kind of run has, whether its work goes through the task queue or not:
    a name, how its stored results count in summaries and dashboards, and how it resumes.

    A kind that is only a ``RunKind`` (not a ``JobKind``) runs its work in the process that
    started the run: it records its items with no tasks (``storage.runs.add_planned(conn,
    run_id, items, 0)``), which tells every coordinator's ``settle`` to leave the run to
    that process, and ``resume`` points at ``resume_command``."""

    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def item_log(self) -> ItemLog | None:
        """Where this kind stores one row per executed item (``storage.item_logs.ItemLog``):
        what summaries, throughput, worker rates and outcome breakdowns count. None only for
        a kind whose runs have no per-item rows (say why). Abstract on purpose: a kind that
        forgets it fails when it is first built, instead of silently missing from the
        dashboards. Import storage inside the method: pool workers import kinds for their
        executors only."""

    def outcome_counts(self, conn: sa.Connection, run_id: int) -> dict[str, int]:
        """Stored results of a run by outcome; by default counted in ``item_log()``."""
        from storage.item_logs import outcome_counts

        log = self.item_log()
        return {} if log is None else outcome_counts(conn, log, run_id)

    @abstractmethod
    def ok_outcomes(self) -> set[str]:
        """Outcomes that count as ok in summaries."""

    def resume_command(self, run_id: int) -> str:
        """The CLI command (after ``python -m engine.run``) that resumes a run of this kind.
        Runs the queue drives (``JobKind``) resume with the shared ``resume``; a kind whose
        runs execute in their own process says which command resumes them there."""
        return f"resume {run_id}"

    def summary_extra(self, conn: sa.Connection, run_id: int) -> dict[str, Any] | None:
        """What this kind adds to a run's final summary, under the key of its name (the
        scrape job's entities and method mix): plain JSON values, shown by ``--json``.
        None (the default): nothing."""
        return None

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Lines the human summary adds for this kind (``summary[self.name]`` holds what
        ``summary_extra`` returned, when it was computed). Default: none."""
        return []

    def cost(self, conn: sa.Connection, run_id: int) -> dict[str, Any] | None:
        """What a run cost (``engine.costs``: requests per method, API calls, browser-seconds,
        bytes by route, ``stored`` — the entities or items it stored, the denominator of the
        cost per stored entity). None (the default): this kind does not account for cost."""
        return None

    def stop_window(self, conn: sa.Connection, run_id: int, since: Any) -> dict[str, float]:
        """The cost metrics of stop rules (``engine.stop_rules``: ``http_429``, ``browser_s``,
        ``proxy_mb``) over what the run did since ``since``; only those this kind has (the
        same as its ``Params.stop_metrics``). Default: none."""
        return {}


def unstorable_row(result: ItemResult, error: str, now: Any) -> dict[str, Any]:
    """The ``errors`` row of a result that could not be stored (``storage.error_log``)."""
    from storage.error_log import UNSTORABLE

    return {
        "run_id": result.run_id,
        "task_id": result.task_id,
        "worker_id": result.worker_id or None,
        "item_key": str(result.ref)[:500],
        "error_type": UNSTORABLE,
        "message": error[:2000],
        "created_at": now,
    }


class JobKind(RunKind):
    """A kind whose runs are planned into tasks that workers claim from the queue."""

    # Optional columnar hand-over: the ``data`` keys a kind stores. When set, workers hand
    # results over as ``ResultBatch`` columns and they arrive in ``store_batch``; when None
    # (the default), one ``ItemResult`` per item arrives in ``store``.
    columns: ClassVar[tuple[str, ...] | None] = None
    # The kind's run parameters: bounds, defaults, CLI flags (engine.jobs.params).
    params_model: ClassVar[type[Params]]

    @abstractmethod
    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate and complete the run parameters: build ``params_model``, then the checks
        that need I/O; raise ``ParamError`` naming the field. Called before the run is
        created; the result is stored with the run, so it must hold no secrets."""

    @abstractmethod
    def plan(
        self, db: Database, run_id: int, params: dict[str, Any]
    ) -> Iterator[Sequence[Any] | CountryBatch]:
        """Yield batches of item references (JSON-serialisable), streamed. A batch whose
        items belong to one country (a scrape source's) is a ``CountryBatch``: only workers
        serving that country claim it; a plain batch has the run's ``task_country``."""

    def task_country(self, params: dict[str, Any]) -> str | None:
        """The country of the run's plain batches (normal form): its ``country``
        parameter when the kind's parameters have one, else None (any worker)."""
        model = getattr(self, "params_model", None)  # a plugin kind may have none
        if model is None or "country" not in model.model_fields:
            return None
        from engine.countries import normal_country

        return normal_country(params.get("country"))

    @abstractmethod
    def load_items(self, conn: sa.Connection, run_id: int, refs: list[Any]) -> list[Any]:
        """Executable items for a task, leaving out those already stored for this run."""

    @abstractmethod
    def store(self, conn: sa.Connection, results: list[ItemResult]) -> int:
        """Store results exactly once per (run, item); returns how many were new."""

    def store_failed(self, conn: sa.Connection, results: list[ItemResult], error: str) -> int:
        """Store, as failed items, results that ``store`` refused (a poison result: data it
        cannot store; ``error`` says why), exactly once per (run, item) like ``store``, and
        log each in ``errors`` (type ``unstorable_result``); returns how many were new.
        Default: the result an executor that raised hands over (ok False, outcome
        ``error``, data ``{"error": error}``) through ``store``."""
        from dataclasses import replace

        from storage.clock import utcnow
        from storage.error_log import add_errors

        failed = [replace(r, ok=False, outcome="error", data={"error": error}) for r in results]
        new = self.store(conn, failed)
        if new:  # the flush isolates one result at a time: then "new" says which
            now = utcnow()
            add_errors(conn, [unstorable_row(r, error, now) for r in results])
        return new

    def store_batch(self, conn: sa.Connection, batch: ResultBatch) -> int:
        """Store a columnar batch exactly once per (run, item); returns how many were new.
        Kinds that declare ``columns`` override it to write the columns as they are."""
        return self.store(conn, batch.to_results())

    @abstractmethod
    async def open_executor(self, params: dict[str, Any], env: WorkerEnv) -> Executor:
        """Build the executor of one run inside a worker process; ``env`` holds what the
        process shares with it (its rate limiter). Called once per run and process."""

"""Pipelines: a source that needs code, as a list of named steps registered for a country.

    from engine.pipelines.runner import Pipeline, ScriptStep, register

    shop = register(Pipeline("shop", "Malaysia"))

    @shop.step
    def catalog(ctx):
        page = ctx.state.get("page", 1)            # saved with every ctx.store()
        while page <= 10:
            ctx.check_stop()                       # raises StopRequested on stop/pause/cancel
            result = ctx.fetch(f"https://shop.example/catalog?page={page}")
            page += 1
            ctx.state["page"] = page
            ctx.store("product", parse(result.text))   # entities and state: one transaction

    shop.add(ScriptStep("legacy", ["python", "scrapers/old.py"]))

    run_pipeline(db, shop)                          # or: python -m engine.run pipeline mod:shop

A run (kind ``pipeline``) has one ``pipeline_steps`` row per step; steps run in order in the
calling thread and each records ``running`` → ``done`` / ``failed`` / ``stopped`` with its
times. A resumed run starts at the first step that is not ``done``, with the state that step
last saved, so work that was stored is not done again and nothing is stored twice (entities
are upserted by type, country and external id). Step functions are synchronous: ``ctx.fetch``
blocks (the cascade runs on the run's own event-loop thread); a step that wants many fetches
at once can run its own ``asyncio.run`` with ``fetchers.afetch``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine import lifecycle
from engine.model import TERMINAL
from engine.pipelines.context import (
    KIND,
    FetchLoop,
    PipelineControl,
    RunLog,
    StepContext,
    StopRequested,
    entity_from,
)
from storage import pipelines as store
from storage import runs as run_store
from storage.db import Database

__all__ = [
    "Pipeline",
    "PipelineControl",
    "PipelineError",
    "PipelineResult",
    "ScriptStep",
    "Step",
    "StepContext",
    "StopRequested",
    "entity_from",
    "register",
    "registered",
    "run_pipeline",
]

log = logging.getLogger(__name__)

RESUMABLE = ("running", "stopping", "stopped", "paused", "failed")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


class PipelineError(ValueError):
    """A pipeline or run that cannot be started as asked; the message says what to do."""


# --- definitions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """A Python step: ``fn(ctx)`` does the work; what it returns is ignored."""

    name: str
    fn: Callable[[StepContext], Any]


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """An existing scraper script, run unchanged as a subprocess (see engine.pipelines.script).

    ``argv`` is run without a shell in ``cwd``; ``env`` is added to this process's
    environment and the run's FETCHFLEET_* variables. A stop sends SIGTERM to the script's
    process group and SIGKILL after ``grace_s``."""

    name: str
    argv: Sequence[str]
    cwd: str | os.PathLike[str] | None = None
    env: Mapping[str, str] | None = None
    grace_s: float = 10.0


AnyStep = Step | ScriptStep


@dataclass
class Pipeline:
    """Named steps for a country (``None``: the country is given per run)."""

    name: str
    country: str | None = None
    steps: list[AnyStep] = field(default_factory=list)
    module: str | None = None  # set by register(): where it was defined

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise PipelineError(f"pipeline name {self.name!r}: letters, digits, _ . - only")
        steps, self.steps = list(self.steps), []
        for s in steps:
            self.add(s)

    def add(self, step: AnyStep) -> AnyStep:
        if not isinstance(step, Step | ScriptStep):
            raise PipelineError(f"{step!r} is not a Step or ScriptStep")
        if not _NAME.fullmatch(step.name):
            raise PipelineError(f"step name {step.name!r}: letters, digits, _ . - only")
        if step.name in self.step_names:
            raise PipelineError(f"pipeline {self.name!r} already has a step {step.name!r}")
        self.steps.append(step)
        return step

    def step(
        self, fn: Callable[[StepContext], Any] | None = None, *, name: str | None = None
    ) -> Any:
        """Decorator: ``@p.step`` or ``@p.step(name="x")`` appends a Python step."""

        def wrap(f: Callable[[StepContext], Any]) -> Callable[[StepContext], Any]:
            self.add(Step(name or f.__name__, f))
            return f

        return wrap(fn) if fn is not None else wrap

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]


_registry: dict[tuple[str, str | None], Pipeline] = {}


def register(pipeline: Pipeline) -> Pipeline:
    """Register a pipeline under (name, country); returns it, so ``p = register(Pipeline(…))``
    works at module level. Registering the same name and country again replaces it (a module
    imported twice)."""
    if pipeline.module is None:
        pipeline.module = sys._getframe(1).f_globals.get("__name__")
    _registry[(pipeline.name, pipeline.country)] = pipeline
    return pipeline


def registered(module: str | None = None) -> list[Pipeline]:
    return [p for p in _registry.values() if module is None or p.module == module]


# --- running ---------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    run_id: int
    status: str
    error: str | None
    steps: list[dict[str, Any]]


_active: set[int] = set()
_active_lock = threading.Lock()


class _RunLock:
    """One process per run. DuckDB: the file lock already proves it across processes, this
    set covers threads. PostgreSQL: a session advisory lock on a connection held for the
    run, released by the server when a killed process's connection drops."""

    def __init__(self, db: Database, run_id: int) -> None:
        self.db, self.run_id = db, run_id
        self._conn: Any = None

    def acquire(self) -> None:
        with _active_lock:
            if self.run_id in _active:
                raise PipelineError(f"run {self.run_id} is already running in this process")
            _active.add(self.run_id)
        if self.db.is_duckdb:
            return
        conn = self.db.engine.connect()
        got = store.try_lock_run(conn, self.run_id)
        conn.commit()
        if not got:
            conn.close()
            self.release()
            raise PipelineError(
                f"run {self.run_id} is being run by another process: stop it there "
                f"(`python -m engine.run stop {self.run_id}`), then resume"
            )
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            try:
                store.unlock_run(self._conn, self.run_id)
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None
        with _active_lock:
            _active.discard(self.run_id)


class _Runner:
    def __init__(
        self,
        db: Database,
        pipeline: Pipeline,
        run_id: int,
        country: str,
        control: PipelineControl,
        fetch_settings: Any,
        on_line: Callable[[str | None, str, str], None] | None,
    ) -> None:
        self.db, self.pipeline, self.run_id, self.country = db, pipeline, run_id, country
        self.control = control
        self.fetch_settings = fetch_settings
        self.log = RunLog(db, run_id, on_line)
        self.saved_state: dict[str, Any] = {}
        self._fetch: FetchLoop | None = None

    def fetcher(self) -> FetchLoop:
        if self._fetch is None:
            from fetchers import FetchSettings

            self._fetch = FetchLoop(self.fetch_settings or FetchSettings())
        return self._fetch

    def close(self) -> None:
        if self._fetch is not None:
            self._fetch.close()
            self._fetch = None

    def engine_line(self, step: str | None, line: str) -> None:
        self.log.write(step, "engine", line)

    def run(self) -> PipelineResult:
        with self.db.connect() as conn:
            rows = store.get_steps(conn, self.run_id)
        outcome, error = "completed", None
        for row in rows:
            if row.status == "done":
                continue
            if self.control.stop_requested():
                outcome = "stopped"
                self.engine_line(None, f"stopped before step {row.name}")
                break
            status, error = self._run_step(row.position, row.name, row.state, row.status)
            if status == "stopped":
                outcome = "stopped"
                break
            if status == "failed":
                outcome = "failed"
                break
        self.log.flush()
        with self.db.begin() as conn:
            if outcome == "completed":
                store.finish_run(conn, self.run_id, "completed", ("running", "stopping"))
            elif outcome == "failed":
                store.finish_run(
                    conn, self.run_id, "failed", ("running", "stopping", "paused"), error
                )
            else:  # a pause or a cancel keeps its status; a stop ends as stopped
                store.finish_run(conn, self.run_id, "stopped", ("running", "stopping"))
            run = run_store.get_run(conn, self.run_id)
            steps = [s.to_dict() for s in store.get_steps(conn, self.run_id)]
        assert run is not None
        if run.status in TERMINAL:
            lifecycle.ended(self.db, self.control.settings, [self.run_id])
        return PipelineResult(self.run_id, run.status, run.error, steps)

    def _run_step(
        self, position: int, name: str, state: dict[str, Any], was: str
    ) -> tuple[str, str | None]:
        step = self.pipeline.steps[position]
        self.saved_state = dict(state)
        with self.db.begin() as conn:
            store.start_step(conn, self.run_id, position)
        again = f" again (it was {was})" if was != "pending" else ""
        self.engine_line(name, f"step {name} started{again}")
        exit_code: int | None = None
        try:
            if isinstance(step, ScriptStep):
                from engine.pipelines.script import run_script

                status, exit_code, error = run_script(self, step, name)
            else:
                step.fn(StepContext(self, position, name, state))
                status, error = "done", None
        except StopRequested:
            status, error = "stopped", None
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            for line in traceback.format_exc().rstrip().splitlines():
                self.log.write(name, "stderr", line)
        except BaseException:  # a second Ctrl-C: record what we can, then go
            self._end(position, name, "stopped", None, None)
            with self.db.begin() as conn:
                store.finish_run(conn, self.run_id, "stopped", ("running", "stopping"), "aborted")
            lifecycle.ended(self.db, self.control.settings, [self.run_id])
            raise
        self._end(position, name, status, error, exit_code)
        if error:
            error = f"step {name} failed: {error}"
        return status, error

    def _end(
        self, position: int, name: str, status: str, error: str | None, exit_code: int | None
    ) -> None:
        self.engine_line(
            name,
            f"step {name} {status}"
            + (f" (exit code {exit_code})" if exit_code is not None else "")
            + (f": {error}" if error else ""),
        )
        self.log.flush()
        with self.db.begin() as conn:
            store.end_step(conn, self.run_id, position, status, self.saved_state, error, exit_code)


def coordinator_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_pipeline(
    db: Database,
    pipeline: Pipeline,
    resume_run_id: int | None = None,
    *,
    country: str | None = None,
    ref: str | None = None,
    fetch_settings: Any = None,
    control: PipelineControl | None = None,
    on_line: Callable[[str | None, str, str], None] | None = None,
) -> PipelineResult:
    """Run ``pipeline`` as a new run (or resume run ``resume_run_id``) in this thread, to
    its end or until it is stopped; returns the outcome.

    ``ref`` is how the CLI finds the pipeline again on ``--resume`` (``module:name`` or a
    file path); ``fetch_settings`` a ``fetchers.FetchSettings`` for ``ctx.fetch``;
    ``control`` lets another thread stop the run (``control.command(run_id, "stop")``);
    ``on_line(step, stream, line)`` sees every line of the run log as it is written."""
    control = control or PipelineControl(db)
    if resume_run_id is None:
        run_id, country = _create(db, pipeline, country, ref)
        lock = _RunLock(db, run_id)
        lock.acquire()
        resumed_at = None
    else:
        run_id = resume_run_id
        lock = _RunLock(db, run_id)
        lock.acquire()
        try:
            country, resumed_at = _prepare_resume(db, pipeline, run_id, control)
        except BaseException:
            lock.release()
            raise
    control.attach(run_id)
    runner = _Runner(db, pipeline, run_id, country, control, fetch_settings, on_line)
    try:
        where = f" at step {resumed_at}" if resumed_at else ""
        runner.engine_line(
            None,
            f"run {run_id}: pipeline {pipeline.name} for {country} "
            f"{'resumed' + where if resume_run_id else 'started'}",
        )
        return runner.run()
    finally:
        try:
            runner.log.flush()
        finally:
            runner.close()
            lock.release()


def _create(
    db: Database, pipeline: Pipeline, country: str | None, ref: str | None
) -> tuple[int, str]:
    if not pipeline.steps:
        raise PipelineError(f"pipeline {pipeline.name!r} has no steps")
    if pipeline.country and country and country != pipeline.country:
        raise PipelineError(
            f"pipeline {pipeline.name!r} is registered for {pipeline.country}, not {country}"
        )
    country = country or pipeline.country
    if not country:
        raise PipelineError(f"pipeline {pipeline.name!r} has no country: give one (--country)")
    params = {
        "pipeline": pipeline.name,
        "country": country,
        "ref": ref,
        "steps": pipeline.step_names,
    }
    with db.begin() as conn:
        run_id = run_store.create_run(conn, KIND, params, coordinator_name())
        run_store.add_planned(conn, run_id, len(pipeline.steps), 0)
        store.create_steps(conn, run_id, pipeline.step_names)
        run_store.start_run(conn, run_id)
    return run_id, country


def _prepare_resume(
    db: Database, pipeline: Pipeline, run_id: int, control: PipelineControl
) -> tuple[str, str | None]:
    """Check that the run can be resumed with this pipeline and set it running; returns the
    run's country and the step it resumes at."""
    with db.begin() as conn:
        run = run_store.get_run(conn, run_id)
        if run is None:
            raise PipelineError(
                f"no run with id {run_id}: `python -m engine.run status` lists runs"
            )
        if run.kind != KIND:
            raise PipelineError(
                f"run {run_id} is a {run.kind} run: `python -m engine.run resume {run_id}`"
            )
        if run.status not in RESUMABLE:
            raise PipelineError(f"run {run_id} is {run.status}: nothing to resume")
        steps = store.get_steps(conn, run_id)
        names = [s.name for s in steps]
        if names != pipeline.step_names:
            raise PipelineError(
                f"pipeline {pipeline.name!r} has steps {pipeline.step_names}, but run {run_id} "
                f"was started with {names}: resume it with the pipeline it was started with"
            )
        if run.status != "running":  # running: its process was killed, we take it over
            run_store.apply_command(conn, run_id, "resume", "pipeline --resume")
        store.set_coordinator(conn, run_id, coordinator_name())
    pending = next((s.name for s in steps if s.status != "done"), None)
    return str(run.params.get("country")), pending

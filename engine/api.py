"""The engine API the CLI and the console share: submit a run, follow it, command it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

from engine import lifecycle
from engine.jobs import get_kind
from engine.jobs.base import CountryBatch, batch_countries
from engine.model import TERMINAL
from engine.settings import Settings
from engine.summary import run_summary
from engine.version import code_version
from storage import queue as q
from storage import runs
from storage.coverage import country_gap
from storage.db import Database
from storage.errors import is_transient, outage_delay

log = logging.getLogger(__name__)

TASKS_PER_TRANSACTION = 200
WARN_EVERY_S = 2.0  # how often wait_run checks for queued countries no live worker serves


def submit_run(
    db: Database,
    settings: Settings,
    kind_name: str,
    params: dict[str, Any],
    coordinator: str,
    on_create: Callable[[Any, int], None] | None = None,
) -> int:
    """Validate parameters, create the run, plan its tasks (streamed), and start it.

    ``on_create(conn, run_id)`` runs in the transaction that creates the run: a scheduler
    records its fire there, so the run exists exactly when the fire does."""
    kind = get_kind(kind_name, settings)
    params = kind.prepare(params)
    with db.begin() as conn:
        # workers of another code version leave its tasks alone (engine.version)
        run_id = runs.create_run(conn, kind_name, params, coordinator, code_version())
        if on_create is not None:
            on_create(conn, run_id)
    plan_run(db, settings, run_id)
    return run_id


def plan_run(db: Database, settings: Settings, run_id: int) -> None:
    """Plan a created run's tasks (streamed, a chunk of batches per transaction), start it."""
    with db.connect() as conn:
        kind_name, params = q.run_kind_params(conn, run_id)
    kind = get_kind(kind_name, settings)
    try:
        seq = 0
        country = kind.task_country(params)
        batches: Iterator[Sequence[Any] | CountryBatch] = iter(kind.plan(db, run_id, params))
        while chunk := list(islice(batches, TASKS_PER_TRANSACTION)):
            refs, countries = batch_countries(chunk, country)
            with db.begin() as conn:
                n_items = q.add_tasks(conn, run_id, refs, seq, settings.max_attempts, countries)
                runs.add_planned(conn, run_id, n_items, len(chunk))
            seq += len(chunk)
    except BaseException as exc:
        with db.begin() as conn:
            runs.set_status(conn, run_id, "failed", f"planning failed: {exc}")
        lifecycle.ended(db, settings, [run_id])
        raise
    with db.begin() as conn:
        runs.start_run(conn, run_id)


def country_warning(db: Database, fresh_s: float, run_id: int | None = None) -> str | None:
    """Why tasks wait: the countries of queued tasks (of ``run_id``, or of every running
    run) that no live worker (heartbeat within ``fresh_s``) serves, as one line; None when
    every queued country is served (``storage.coverage``)."""
    with db.connect() as conn:
        gap = country_gap(conn, fresh_s, run_id)
    return gap.message() if gap else None


class _CountryWatch:
    """``wait_run``'s check of ``country_warning``, every ``WARN_EVERY_S``: it tells
    ``on_warning`` a new line when it changes (None: served again), never the same twice."""

    def __init__(
        self, db: Database, run_id: int, fresh_s: float, on_warning: Callable[[str | None], Any]
    ) -> None:
        self.db, self.run_id, self.fresh_s, self.on_warning = db, run_id, fresh_s, on_warning
        self.last: str | None = None
        self.next_at = 0.0

    def check(self, force: bool = False) -> None:
        """Check when it is time (``force``: now, e.g. once the run ended)."""
        if not force and time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + WARN_EVERY_S
        try:
            now = country_warning(self.db, self.fresh_s, self.run_id)
        except Exception as exc:
            if is_transient(exc):
                return  # the poll itself says the database is away
            raise
        if now != self.last:
            self.last = now
            self.on_warning(now)


def wait_run(
    db: Database,
    run_id: int,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.2,
    timeout_s: float | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    on_warning: Callable[[str | None], Any] | None = None,
    fresh_s: float = 30.0,
) -> dict[str, Any]:
    """Poll until the run reaches a final status (or ``timeout_s``); returns its summary.

    Without a progress callback (or with a disabled one: ``enabled`` False) only the run's
    status is polled; the summary, which counts the stored results, is built once at the end.
    ``sleep`` waits between polls: a coordinator in this process passes its
    ``wait_settled``, which returns as soon as it settles a run. ``on_warning`` hears
    ``country_warning`` (workers live within ``fresh_s``) whenever it changes: a line when
    tasks of a country no live worker serves are queued, None once they are served again.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    wants_progress = on_progress is not None and getattr(on_progress, "enabled", True)
    watch = None if on_warning is None else _CountryWatch(db, run_id, fresh_s, on_warning)
    outage = 0  # polls failed in a row because the database is unreachable
    while True:
        try:
            if watch is not None:
                watch.check()
            if wants_progress:
                summary = run_summary(db, run_id)
                on_progress(summary)  # type: ignore[misc]
                status = summary["status"]
            else:
                with db.connect() as conn:
                    status = runs.get_status(conn, run_id)
                if status is None:
                    return run_summary(db, run_id)  # raises: no such run
        except Exception as exc:
            if not is_transient(exc) or (deadline is not None and time.monotonic() > deadline):
                raise
            outage += 1
            if outage == 1 or outage % 10 == 0:
                log.warning("run %s: cannot reach the database (%s); waiting for it", run_id, exc)
            sleep(outage_delay(outage))
            continue
        outage = 0
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            if watch is not None and watch.last is not None:
                watch.check(force=True)  # a warning given is taken back once it is not true
            if not wants_progress:
                summary = run_summary(db, run_id)
                if on_progress:
                    on_progress(summary)
            return summary
        sleep(poll_s)

"""The engine API the CLI and the console share: submit a run, follow it, command it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

from engine import lifecycle
from engine.jobs import get_kind
from engine.model import TERMINAL
from engine.settings import Settings
from engine.summary import run_summary
from engine.version import code_version
from storage import queue as q
from storage import runs
from storage.db import Database
from storage.errors import is_transient, outage_delay

log = logging.getLogger(__name__)

TASKS_PER_TRANSACTION = 200


def submit_run(
    db: Database, settings: Settings, kind_name: str, params: dict[str, Any], coordinator: str
) -> int:
    """Validate parameters, create the run, plan its tasks (streamed), and start it."""
    kind = get_kind(kind_name, settings)
    params = kind.prepare(params)
    with db.begin() as conn:
        # workers of another code version leave its tasks alone (engine.version)
        run_id = runs.create_run(conn, kind_name, params, coordinator, code_version())
    try:
        seq = 0
        batches: Iterator[Sequence[Any]] = iter(kind.plan(db, run_id, params))
        while chunk := list(islice(batches, TASKS_PER_TRANSACTION)):
            with db.begin() as conn:
                n_items = q.add_tasks(conn, run_id, chunk, seq, settings.max_attempts)
                runs.add_planned(conn, run_id, n_items, len(chunk))
            seq += len(chunk)
    except BaseException as exc:
        with db.begin() as conn:
            runs.set_status(conn, run_id, "failed", f"planning failed: {exc}")
        lifecycle.ended(db, settings, [run_id])
        raise
    with db.begin() as conn:
        runs.start_run(conn, run_id)
    return run_id


def wait_run(
    db: Database,
    run_id: int,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.2,
    timeout_s: float | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> dict[str, Any]:
    """Poll until the run reaches a final status (or ``timeout_s``); returns its summary.

    Without a progress callback (or with a disabled one: ``enabled`` False) only the run's
    status is polled; the summary, which counts the stored results, is built once at the end.
    ``sleep`` waits between polls: a coordinator in this process passes its
    ``wait_settled``, which returns as soon as it settles a run.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    wants_progress = on_progress is not None and getattr(on_progress, "enabled", True)
    outage = 0  # polls failed in a row because the database is unreachable
    while True:
        try:
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
            if not wants_progress:
                summary = run_summary(db, run_id)
                if on_progress:
                    on_progress(summary)
            return summary
        sleep(poll_s)

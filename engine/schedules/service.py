"""Schedule operations shared by the CLI and the console: add, list, enable, disable, remove.

Errors are ``ScheduleError`` with a message that says what to do; the job itself was checked
by its kind (``Params``) before it gets here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.schedules.scheduler import first_due, timing_of
from engine.schedules.timing import Timing
from storage import schedules as store
from storage.clock import utcnow
from storage.db import Database
from storage.schedules import MISSED, OVERLAP, FireRow, ScheduleRow


class ScheduleError(Exception):
    """A schedule operation that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Job:
    """A job as captured from its command line: what ``submit_run`` needs, and the line."""

    kind: str
    params: dict[str, Any]
    settings: dict[str, Any]
    command: str


def add_schedule(
    db: Database,
    name: str,
    job: Job,
    timing: Timing,
    overlap: str = "skip",
    missed: str = "once",
    now: datetime | None = None,
) -> ScheduleRow:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ScheduleError(
            f"schedule name {name!r}: use letters, digits, '-', '_' or '.' (e.g. nightly-revalidate)"
        )
    if overlap not in OVERLAP:
        raise ScheduleError(f"overlap {overlap!r}: one of {', '.join(OVERLAP)}")
    if missed not in MISSED:
        raise ScheduleError(f"missed {missed!r}: one of {', '.join(MISSED)}")
    try:
        timing.check()
    except ValueError as exc:
        raise ScheduleError(str(exc)) from None
    row = ScheduleRow(
        name=name,
        kind=job.kind,
        command=job.command,
        params=job.params,
        settings=job.settings,
        cron=timing.cron,
        every_s=timing.every_s,
        tz=timing.tz,
        overlap=overlap,
        missed=missed,
        enabled=True,
        next_due_at=first_due(timing, now or utcnow()),
    )
    with db.begin() as conn:
        if not store.add(conn, row):
            raise ScheduleError(f"schedule {name!r} exists already (schedule remove {name})")
    return row


def get_schedule(db: Database, name: str) -> ScheduleRow:
    with db.connect() as conn:
        row = store.get(conn, name)
    if row is None:
        raise ScheduleError(f"no schedule {name!r}: `schedule list` shows them")
    return row


def list_schedules(db: Database) -> list[ScheduleRow]:
    with db.connect() as conn:
        return store.list_all(conn)


def set_enabled(db: Database, name: str, enabled: bool, now: datetime | None = None) -> ScheduleRow:
    """Enabling computes the next due time from now: a schedule disabled for a week does
    not fire the week's missed times when it comes back."""
    row = get_schedule(db, name)
    nxt = first_due(timing_of(row), now or utcnow()) if enabled else None
    with db.begin() as conn:
        store.set_enabled(conn, name, enabled, nxt)
    return get_schedule(db, name)


def remove_schedule(db: Database, name: str) -> None:
    with db.begin() as conn:
        if not store.remove(conn, name):
            raise ScheduleError(f"no schedule {name!r}")


def recent_fires(db: Database, name: str | None = None, limit: int = 20) -> list[FireRow]:
    with db.connect() as conn:
        return store.fires(conn, name, limit)

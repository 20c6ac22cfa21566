"""Schedules: jobs that start themselves, and the record of every time one fired.

A schedule holds its job as captured from the command line a user would type (``kind``,
the run ``params`` and the per-run ``settings`` it gave), its timing (a cron expression in a
time zone, or an interval) and its policies. ``schedule_fires`` has one row per due time
(primary key: schedule, due time), written in the same transaction as the run it creates:
a scheduler that crashes mid-fire leaves either both or neither, and a second scheduler
that fires the same due time fails on the key instead of starting a second run.

A ``Component`` of its own, like the fleet's hosts: an engine feature every deployment has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.migrations import Component

metadata = sa.MetaData()

schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("command", sa.Text, nullable=False),  # the job's command line, for people
    sa.Column("params", sa.Text, nullable=False),  # JSON: the run parameters
    sa.Column("settings", sa.Text, nullable=False),  # JSON: per-run settings it gave
    sa.Column("cron", sa.String),  # a cron expression, or NULL with every_s
    sa.Column("every_s", sa.Float),
    sa.Column("tz", sa.String, nullable=False),  # an IANA zone the cron is read in
    sa.Column("overlap", sa.String, nullable=False),  # skip | queue
    sa.Column("missed", sa.String, nullable=False),  # once | skip
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("next_due_at", sa.DateTime),  # naive UTC; NULL while disabled
    sa.Column("created_at", sa.DateTime, nullable=False),
)

schedule_fires = sa.Table(
    "schedule_fires",
    metadata,
    sa.Column("schedule", sa.String, primary_key=True),
    sa.Column("due_at", sa.DateTime, primary_key=True),  # naive UTC; run-now: the click time
    sa.Column("fired_at", sa.DateTime, nullable=False),
    sa.Column("outcome", sa.String, nullable=False),  # started | skipped | missed
    sa.Column("run_id", sa.BigInteger),
    sa.Column("note", sa.Text),
)


def _v1(conn: sa.Connection) -> None:
    schedules.create(conn, checkfirst=True)
    schedule_fires.create(conn, checkfirst=True)


COMPONENT = Component(
    "schedules",
    [(1, "schedules, schedule_fires: jobs that start themselves", _v1)],
    [schedules, schedule_fires],
)

OVERLAP = ("skip", "queue")
MISSED = ("once", "skip")


@dataclass(frozen=True)
class ScheduleRow:
    name: str
    kind: str
    command: str
    params: dict[str, Any]
    settings: dict[str, Any]
    cron: str | None
    every_s: float | None
    tz: str
    overlap: str = "skip"
    missed: str = "once"
    enabled: bool = True
    next_due_at: datetime | None = None
    created_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class FireRow:
    schedule: str
    due_at: datetime
    fired_at: datetime
    outcome: str
    run_id: int | None
    note: str | None
    run_status: str | None = None


_COLUMNS = [
    schedules.c.name,
    schedules.c.kind,
    schedules.c.command,
    schedules.c.params,
    schedules.c.settings,
    schedules.c.cron,
    schedules.c.every_s,
    schedules.c.tz,
    schedules.c.overlap,
    schedules.c.missed,
    schedules.c.enabled,
    schedules.c.next_due_at,
    schedules.c.created_at,
]


def _schedule(r: Any) -> ScheduleRow:
    return ScheduleRow(
        r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), r[5], r[6], r[7], r[8], r[9],
        bool(r[10]), r[11], r[12],
    )  # fmt: skip


def add(conn: sa.Connection, row: ScheduleRow) -> bool:
    """Insert; False when the name is taken."""
    if get(conn, row.name) is not None:
        return False
    values = {k: v for k, v in row.__dict__.items() if k != "created_at"}
    values["params"] = json.dumps(row.params, sort_keys=True)
    values["settings"] = json.dumps(row.settings, sort_keys=True)
    conn.execute(sa.insert(schedules).values(**values, created_at=utcnow()))
    return True


def get(conn: sa.Connection, name: str, lock: bool = False) -> ScheduleRow | None:
    """``lock``: hold the row (PostgreSQL ``FOR UPDATE``) until the transaction ends."""
    q = sa.select(*_COLUMNS).where(schedules.c.name == name)
    if lock and conn.dialect.name == "postgresql":
        q = q.with_for_update()
    rows = fetch_all(conn, q)
    return _schedule(rows[0]) if rows else None


def list_all(conn: sa.Connection) -> list[ScheduleRow]:
    return [_schedule(r) for r in fetch_all(conn, sa.select(*_COLUMNS).order_by(schedules.c.name))]


def due(conn: sa.Connection, now: datetime) -> list[str]:
    """Names of enabled schedules whose next due time has come, earliest first."""
    q = (
        sa.select(schedules.c.name)
        .where(schedules.c.enabled.is_(True), schedules.c.next_due_at <= now)
        .order_by(schedules.c.next_due_at, schedules.c.name)
    )
    return [r[0] for r in fetch_all(conn, q)]


def set_next(conn: sa.Connection, name: str, next_due_at: datetime | None) -> None:
    conn.execute(
        sa.update(schedules).where(schedules.c.name == name).values(next_due_at=next_due_at)
    )


def set_enabled(
    conn: sa.Connection, name: str, enabled: bool, next_due_at: datetime | None
) -> bool:
    res = conn.execute(
        sa.update(schedules)
        .where(schedules.c.name == name)
        .values(enabled=enabled, next_due_at=next_due_at)
    )
    return bool(res.rowcount)


def remove(conn: sa.Connection, name: str) -> bool:
    """The schedule and its fire history; the runs it started stay."""
    conn.execute(sa.delete(schedule_fires).where(schedule_fires.c.schedule == name))
    return bool(conn.execute(sa.delete(schedules).where(schedules.c.name == name)).rowcount)


def record_fire(
    conn: sa.Connection,
    name: str,
    due_at: datetime,
    outcome: str,
    run_id: int | None = None,
    note: str | None = None,
) -> None:
    """One row per (schedule, due time): a second insert of the same fire raises
    IntegrityError, which rolls back the run created beside it."""
    conn.execute(
        sa.insert(schedule_fires).values(
            schedule=name,
            due_at=due_at,
            fired_at=utcnow(),
            outcome=outcome,
            run_id=run_id,
            note=note,
        )
    )


def fires(conn: sa.Connection, name: str | None = None, limit: int = 20) -> list[FireRow]:
    """The latest fires (of one schedule, or all), newest first, with their runs' status."""
    from storage.schema import runs

    j = schedule_fires.outerjoin(runs, runs.c.id == schedule_fires.c.run_id)
    q = (
        sa.select(
            schedule_fires.c.schedule,
            schedule_fires.c.due_at,
            schedule_fires.c.fired_at,
            schedule_fires.c.outcome,
            schedule_fires.c.run_id,
            schedule_fires.c.note,
            runs.c.status,
        )
        .select_from(j)
        .order_by(schedule_fires.c.fired_at.desc(), schedule_fires.c.due_at.desc())
        .limit(limit)
    )
    if name is not None:
        q = q.where(schedule_fires.c.schedule == name)
    return [FireRow(*r) for r in fetch_all(conn, q)]


def last_run_status(conn: sa.Connection, name: str) -> tuple[int, str] | None:
    """The schedule's most recent run and its status (overlap checks)."""
    from storage.schema import runs

    q = (
        sa.select(runs.c.id, runs.c.status)
        .select_from(schedule_fires.join(runs, runs.c.id == schedule_fires.c.run_id))
        .where(schedule_fires.c.schedule == name)
        .order_by(runs.c.id.desc())
        .limit(1)
    )
    rows = fetch_all(conn, q)
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def unplanned_runs(conn: sa.Connection) -> list[int]:
    """Runs a fire created whose planning never finished (still ``queued``): the scheduler
    that fired them stopped mid-fire; the next one finishes their planning."""
    from storage.schema import runs

    q = (
        sa.select(runs.c.id)
        .select_from(schedule_fires.join(runs, runs.c.id == schedule_fires.c.run_id))
        .where(runs.c.status == "queued")
        .order_by(runs.c.id)
    )
    return [int(r[0]) for r in fetch_all(conn, q)]

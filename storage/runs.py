"""Runs: creation, status transitions from operator commands, and settling finished runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import db_now, utcnow
from storage.queue import requeue_failed, task_counts
from storage.schema import commands, run_logs, runs, tasks

TERMINAL = ("completed", "failed", "stopped", "cancelled")
ACTIONS = ("stop", "pause", "resume", "cancel")

# action → (statuses it applies to, status it sets)
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "stop": (("queued", "running", "paused"), "stopping"),
    "pause": (("running",), "paused"),
    "resume": (("paused", "stopped", "stopping", "failed"), "running"),
    "cancel": (("queued", "running", "paused", "stopping", "stopped", "failed"), "cancelled"),
}


@dataclass(slots=True)
class RunRow:
    id: int
    kind: str
    status: str
    params: dict[str, Any]
    total_items: int
    total_tasks: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    code_version: str | None = None  # the creating coordinator's (engine.version)

    @property
    def duration_s(self) -> float:
        if not self.started_at:
            return 0.0
        end = self.finished_at or utcnow()
        return max((end - self.started_at).total_seconds(), 0.0)


def _row(r: Any) -> RunRow:
    return RunRow(
        id=r.id,
        kind=r.kind,
        status=r.status,
        params=json.loads(r.params),
        total_items=r.total_items,
        total_tasks=r.total_tasks,
        error=r.error,
        created_at=r.created_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        code_version=r.code_version,
    )


def create_run(
    conn: sa.Connection,
    kind: str,
    params: dict[str, Any],
    coordinator: str,
    code_version: str | None = None,
) -> int:
    """A queued run; ``code_version``: the creating process's (workers of another version
    leave its tasks alone; None: any worker takes them)."""
    rows = fetch_all(
        conn,
        sa.insert(runs)
        .values(
            kind=kind,
            status="queued",
            params=json.dumps(params, sort_keys=True),
            coordinator=coordinator,
            code_version=code_version,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        .returning(runs.c.id),
    )
    return int(rows[0][0])


def add_planned(conn: sa.Connection, run_id: int, items: int, n_tasks: int) -> None:
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id)
        .values(total_items=runs.c.total_items + items, total_tasks=runs.c.total_tasks + n_tasks)
    )


def planned_tasks(conn: sa.Connection, run_id: int) -> int:
    """How many tasks were planned for a run so far: the number the next task takes."""
    rows = fetch_all(conn, sa.select(runs.c.total_tasks).where(runs.c.id == run_id))
    return int(rows[0][0]) if rows else 0


def start_run(conn: sa.Connection, run_id: int) -> None:
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.status == "queued")
        .values(status="running", started_at=utcnow(), updated_at=utcnow())
    )


def reopen(conn: sa.Connection, run_id: int) -> bool:
    """Set a completed run running again (new tasks were queued for it); returns whether
    it was completed."""
    res = conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.status == "completed")
        .values(status="running", finished_at=None, error=None, updated_at=utcnow())
    )
    return bool(res.rowcount)


def set_code_version(conn: sa.Connection, run_id: int, version: str) -> None:
    """The run goes on with ``version``'s code (a resume by a coordinator of that version):
    from now on workers of that version take its tasks."""
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(code_version=version))


# --- engine notes: what the engine has to tell a run's operator (stream "engine") ----------


def add_note(conn: sa.Connection, run_id: int, line: str) -> None:
    """A line for whoever follows the run (the CLI prints it, the console shows it)."""
    conn.execute(
        sa.insert(run_logs).values(run_id=run_id, stream="engine", line=line, created_at=utcnow())
    )


def notes_after(conn: sa.Connection, run_id: int, after_id: int = 0) -> list[tuple[int, str]]:
    """(id, line) of the run's engine notes after ``after_id``, oldest first."""
    q = (
        sa.select(run_logs.c.id, run_logs.c.line)
        .where(run_logs.c.run_id == run_id, run_logs.c.stream == "engine")
        .where(run_logs.c.id > after_id)
        .order_by(run_logs.c.id)
    )
    return [(int(r[0]), str(r[1])) for r in fetch_all(conn, q)]


def get_run(conn: sa.Connection, run_id: int) -> RunRow | None:
    rows = fetch_all(conn, sa.select(runs).where(runs.c.id == run_id))
    return _row(rows[0]) if rows else None


def get_status(conn: sa.Connection, run_id: int) -> str | None:
    """A run's status alone: what a waiting loop polls (no counting)."""
    rows = fetch_all(conn, sa.select(runs.c.status).where(runs.c.id == run_id))
    return rows[0][0] if rows else None


def list_runs(conn: sa.Connection, limit: int = 50, status: str | None = None) -> list[RunRow]:
    stmt = sa.select(runs).order_by(runs.c.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(runs.c.status == status)
    return [_row(r) for r in fetch_all(conn, stmt)]


def set_status(conn: sa.Connection, run_id: int, status: str, error: str | None = None) -> None:
    values: dict[str, Any] = {"status": status, "updated_at": utcnow()}
    if status in TERMINAL:
        values["finished_at"] = utcnow()
    if error is not None:
        values["error"] = error[:4000]
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(**values))


def apply_command(conn: sa.Connection, run_id: int, action: str, source: str) -> str:
    """Record an operator command for a run and apply its status change.

    Returns the run's status afterwards; raises ValueError when the action does not apply.
    """
    if action not in TRANSITIONS:
        raise ValueError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    run = get_run(conn, run_id)
    if run is None:
        raise ValueError(f"no run with id {run_id}")
    allowed, target = TRANSITIONS[action]
    if run.status not in allowed:
        raise ValueError(
            f"run {run_id} is {run.status}: {action} applies to runs that are {' / '.join(allowed)}"
        )
    conn.execute(
        sa.insert(commands).values(
            target_kind="run",
            target_id=str(run_id),
            action=action,
            source=source,
            created_at=utcnow(),
            handled_at=utcnow(),
            result=f"{run.status} -> {target}",
        )
    )
    values: dict[str, Any] = {"status": target, "updated_at": utcnow()}
    if action == "resume":
        requeue_failed(conn, run_id)
        values.update(finished_at=None, error=None)
        if run.started_at is None:
            values["started_at"] = utcnow()
    if target == "cancelled":
        values["finished_at"] = utcnow()
        conn.execute(
            sa.update(tasks)
            .where(tasks.c.run_id == run_id, tasks.c.status == "queued")
            .values(status="cancelled", updated_at=db_now())
        )
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(**values))
    return target


def command_worker(conn: sa.Connection, worker_id: str, action: str, source: str) -> None:
    conn.execute(
        sa.insert(commands).values(
            target_kind="worker",
            target_id=worker_id,
            action=action,
            source=source,
            created_at=utcnow(),
        )
    )


def settle(conn: sa.Connection) -> list[tuple[int, str]]:
    """Move runs whose tasks are all finished to their final status; returns the changes.

    Only runs the task queue drives: a run that planned items but no tasks does its work
    outside the queue (a pipeline's steps run in the process that started it), and that
    process settles it. The rule reads the run's own counters, so every coordinator agrees
    on it whichever kinds it has loaded. A queue run that planned nothing (an empty input)
    settles at once."""
    changed: list[tuple[int, str]] = []
    active = fetch_all(
        conn,
        sa.select(runs.c.id, runs.c.status).where(
            runs.c.status.in_(("running", "stopping")),
            sa.or_(runs.c.total_tasks > 0, runs.c.total_items == 0),
        ),
    )
    for run_id, status in active:
        counts = task_counts(conn, run_id)
        if status == "stopping" and not counts.get("leased"):
            set_status(conn, run_id, "stopped")
            changed.append((run_id, "stopped"))
        elif status == "running" and not counts.get("queued") and not counts.get("leased"):
            failed = counts.get("failed", 0)
            if failed:
                last = fetch_all(
                    conn,
                    sa.select(tasks.c.last_error)
                    .where(tasks.c.run_id == run_id, tasks.c.status == "failed")
                    .limit(1),
                )
                set_status(
                    conn,
                    run_id,
                    "failed",
                    f"{failed} task(s) failed; last error: {last[0][0] if last else '?'}",
                )
                changed.append((run_id, "failed"))
            else:
                set_status(conn, run_id, "completed")
                changed.append((run_id, "completed"))
    return changed

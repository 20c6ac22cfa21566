"""Storage of pipeline runs: one ``pipeline_steps`` row per step, the run log, fetch logs.

A step's ``message`` column holds JSON, ``{"state": {...}, "error": "..."}``: the state a step
saved (its cursor, so a resumed step continues where it stopped) and, for a failed step, what
went wrong. Keeping both in the one column the schema has avoids a migration; the console
shows the run's own ``error`` (plain text) for people anyway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all, staged
from storage.clock import utcnow
from storage.schema import entities, entity_attributes, fetch_logs, pipeline_steps, run_logs, runs

STEP_STATUSES = ("pending", "running", "done", "failed", "stopped")


@dataclass(slots=True)
class StepRow:
    position: int
    name: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    state: dict[str, Any]
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "name": self.name,
            "status": self.status,
            "started_at": self.started_at.isoformat(timespec="seconds")
            if self.started_at
            else None,
            "finished_at": self.finished_at.isoformat(timespec="seconds")
            if self.finished_at
            else None,
            "exit_code": self.exit_code,
            "error": self.error,
        }


def encode_message(state: dict[str, Any], error: str | None = None) -> str:
    return json.dumps({"state": state, "error": error}, sort_keys=True, default=str)


def decode_message(text: str | None) -> tuple[dict[str, Any], str | None]:
    """(state, error); a message that is not ours (plain text) is an error without state."""
    if not text:
        return {}, None
    try:
        doc = json.loads(text)
    except ValueError:
        return {}, text
    if not isinstance(doc, dict):
        return {}, text
    state = doc.get("state")
    return (state if isinstance(state, dict) else {}), doc.get("error")


def create_steps(conn: sa.Connection, run_id: int, names: Sequence[str]) -> None:
    conn.execute(
        sa.insert(pipeline_steps),
        [
            {"run_id": run_id, "position": i, "name": name, "status": "pending"}
            for i, name in enumerate(names)
        ],
    )


def get_steps(conn: sa.Connection, run_id: int) -> list[StepRow]:
    rows = fetch_all(
        conn,
        sa.select(pipeline_steps)
        .where(pipeline_steps.c.run_id == run_id)
        .order_by(pipeline_steps.c.position),
    )
    out = []
    for r in rows:
        state, error = decode_message(r.message)
        out.append(
            StepRow(
                r.position, r.name, r.status, r.started_at, r.finished_at, r.exit_code, state, error
            )
        )
    return out


def start_step(conn: sa.Connection, run_id: int, position: int) -> None:
    conn.execute(
        sa.update(pipeline_steps)
        .where(pipeline_steps.c.run_id == run_id, pipeline_steps.c.position == position)
        .values(status="running", started_at=utcnow(), finished_at=None, exit_code=None)
    )


def end_step(
    conn: sa.Connection,
    run_id: int,
    position: int,
    status: str,
    state: dict[str, Any],
    error: str | None = None,
    exit_code: int | None = None,
) -> None:
    """Record a step's outcome. ``state`` is what was last saved (not the step's unsaved
    changes), so a resumed step never skips work that was not stored."""
    if status not in STEP_STATUSES:
        raise ValueError(f"step status {status!r}")
    conn.execute(
        sa.update(pipeline_steps)
        .where(pipeline_steps.c.run_id == run_id, pipeline_steps.c.position == position)
        .values(
            status=status,
            finished_at=utcnow(),
            exit_code=exit_code,
            message=encode_message(state, error[:4000] if error else None),
        )
    )


def save_state(conn: sa.Connection, run_id: int, position: int, state: dict[str, Any]) -> None:
    conn.execute(
        sa.update(pipeline_steps)
        .where(pipeline_steps.c.run_id == run_id, pipeline_steps.c.position == position)
        .values(message=encode_message(state))
    )


def step_counts(conn: sa.Connection, run_id: int) -> dict[str, int]:
    rows = fetch_all(
        conn,
        sa.select(pipeline_steps.c.status, sa.func.count())
        .where(pipeline_steps.c.run_id == run_id)
        .group_by(pipeline_steps.c.status),
    )
    return {status: int(n) for status, n in rows}


def finish_run(
    conn: sa.Connection,
    run_id: int,
    status: str,
    from_statuses: Sequence[str],
    error: str | None = None,
) -> bool:
    """Set the run's final status only if it is still one of ``from_statuses``: an operator's
    cancel or pause that arrived meanwhile is kept. Returns whether it changed."""
    now = utcnow()
    values: dict[str, Any] = {"status": status, "updated_at": now, "finished_at": now}
    if error is not None:
        values["error"] = error[:4000]
    done = fetch_all(
        conn,
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.status.in_(tuple(from_statuses)))
        .values(**values)
        .returning(runs.c.id),
    )
    return bool(done)


def run_status(conn: sa.Connection, run_id: int) -> str | None:
    rows = fetch_all(conn, sa.select(runs.c.status).where(runs.c.id == run_id))
    return rows[0][0] if rows else None


def set_coordinator(conn: sa.Connection, run_id: int, name: str) -> None:
    conn.execute(
        sa.update(runs).where(runs.c.id == run_id).values(coordinator=name, updated_at=utcnow())
    )


# PostgreSQL advisory lock key space of pipeline runs (the second key is the run id).
RUN_LOCK_SPACE = 727002


def try_lock_run(conn: sa.Connection, run_id: int) -> bool:
    """Take the session advisory lock of a pipeline run on ``conn`` (PostgreSQL only), without
    waiting; the server releases it when the session ends, a killed process's included."""
    return bool(
        conn.execute(
            sa.text("SELECT pg_try_advisory_lock(CAST(:space AS integer), CAST(:r AS integer))"),
            {"space": RUN_LOCK_SPACE, "r": run_id},
        ).scalar()
    )


def unlock_run(conn: sa.Connection, run_id: int) -> None:
    """Release the lock ``try_lock_run`` took on this session."""
    conn.execute(
        sa.text("SELECT pg_advisory_unlock(CAST(:space AS integer), CAST(:r AS integer))"),
        {"space": RUN_LOCK_SPACE, "r": run_id},
    )


# --- logs ------------------------------------------------------------------------------------

LOG_COLUMNS = {
    "ord": "bigint",
    "step": "text",
    "stream": "text",
    "line": "text",
    "created_at": "timestamp",
}


def add_logs(
    conn: sa.Connection, run_id: int, lines: Sequence[tuple[str | None, str, str, datetime]]
) -> None:
    """Append (step, stream, line, time) rows in the given order (ids follow it)."""
    if not lines:
        return
    rows = [(i, *line) for i, line in enumerate(lines)]
    with staged(conn, LOG_COLUMNS, rows, once=True) as s:
        conn.execute(
            sa.text(
                "INSERT INTO run_logs (run_id, step, stream, line, created_at) "
                f"SELECT :run, step, stream, line, created_at FROM {s} ORDER BY ord"
            ),
            {"run": run_id},
        )


def read_logs(
    conn: sa.Connection, run_id: int, step: str | None = None, limit: int = 10_000
) -> list[tuple[str | None, str, str]]:
    """(step, stream, line) in the order they were written."""
    stmt = sa.select(run_logs.c.step, run_logs.c.stream, run_logs.c.line).where(
        run_logs.c.run_id == run_id
    )
    if step is not None:
        stmt = stmt.where(run_logs.c.step == step)
    return [tuple(r) for r in fetch_all(conn, stmt.order_by(run_logs.c.id).limit(limit))]


def add_fetch_logs(
    conn: sa.Connection,
    run_id: int,
    url: str,
    country: str | None,
    attempts: Sequence[Any],
    domain: str | None = None,
) -> None:
    """One ``fetch_logs`` row per attempt of a pipeline's fetch (``fetchers.Attempt``)."""
    now = utcnow()
    rows = [
        {
            "run_id": run_id,
            "url": url,
            "method": a.method,
            "proxy": a.proxy,
            "status": a.status,
            "bytes": a.bytes,
            "ms": a.ms,
            "error_type": str(a.error_type) if a.error_type else None,
            "blocked_reason": a.blocked_reason,
            "domain": domain,
            "avoided": getattr(a, "avoided", None),
            "country": country,
            "created_at": now,
        }
        for a in attempts
    ]
    if rows:
        conn.execute(sa.insert(fetch_logs), rows)


def run_entities(
    conn: sa.Connection,
    run_id: int,
    entity_type: str,
    country: str,
    after: str | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """A page of the entities this run stored last (by external id, after ``after``), each as
    ``{"id": external id, attribute: value, …}``: a later step reads what an earlier one
    found, a page at a time, and can keep the last id as its cursor."""
    stmt = (
        sa.select(entities.c.id, entities.c.external_id)
        .where(
            entities.c.entity_type == entity_type,
            entities.c.country == country,
            entities.c.last_run_id == run_id,
        )
        .order_by(entities.c.external_id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(entities.c.external_id > after)
    found = fetch_all(conn, stmt)
    if not found:
        return []
    docs = {int(eid): {"id": ext} for eid, ext in found}
    attrs = fetch_all(
        conn,
        sa.select(
            entity_attributes.c.entity_id, entity_attributes.c.name, entity_attributes.c.value
        ).where(entity_attributes.c.entity_id.in_(list(docs))),
    )
    for eid, name, value in attrs:
        docs[int(eid)].setdefault(name, value)
    return list(docs.values())

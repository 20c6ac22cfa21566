"""The SQL of stop rules (``engine.stop_rules``): windows over a run's item log, when it last
made progress, and the record of a rule that fired (the run's ``error`` and ``run_logs``).

Every read is bounded: the last N items of one run (``ORDER BY time DESC LIMIT N``), or the
rows since a time; a run that fired is recorded once, in the transaction that stops it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.item_logs import ItemLog
from storage.schema import commands, run_logs, runs

STEP = "stop_rule"  # run_logs.step of a rule that fired


@dataclass(frozen=True, slots=True)
class ItemWindow:
    items: int
    failed: int
    blocked: int
    first_at: datetime | None  # the oldest item in the window


def item_window(
    conn: sa.Connection, log: ItemLog, run_id: int, since: datetime, last: int | None = None
) -> ItemWindow:
    """A run's items stored since ``since`` (the ``last`` N of them when given): how many,
    how many failed, how many were blocked (outcome ``blocked``)."""
    t = log.col(log.time)
    inner = sa.select(
        log.ok.label("ok"), log.col(log.outcome).label("outcome"), t.label("t")
    ).where(log.table.c.run_id == run_id, t >= since, *log.stored())
    if last is not None:
        inner = inner.order_by(t.desc()).limit(last)
    sub = inner.subquery()
    n, failed, blocked, first = fetch_all(
        conn,
        sa.select(
            sa.func.count(),
            sa.func.count().filter(sa.not_(sub.c.ok)),
            sa.func.count().filter(sub.c.outcome == "blocked"),
            sa.func.min(sub.c.t),
        ),
    )[0]
    return ItemWindow(int(n), int(failed), int(blocked), first)


def last_progress(conn: sa.Connection, log: ItemLog, run_id: int) -> datetime | None:
    """When the run last stored an item."""
    t = log.col(log.time)
    return fetch_all(
        conn, sa.select(sa.func.max(t)).where(log.table.c.run_id == run_id, *log.stored())
    )[0][0]


def run_since(conn: sa.Connection, run_id: int) -> datetime | None:
    """Where a run's windows begin: its last resume, else its start."""
    resumed = fetch_all(
        conn,
        sa.select(sa.func.max(commands.c.created_at)).where(
            commands.c.target_kind == "run",
            commands.c.target_id == str(run_id),
            commands.c.action == "resume",
        ),
    )[0][0]
    started = fetch_all(conn, sa.select(runs.c.started_at).where(runs.c.id == run_id))
    start = started[0][0] if started else None
    return max((t for t in (resumed, start) if t is not None), default=None)


def record_auto_stop(
    conn: sa.Connection, run_id: int, rule: str, message: str, numbers: dict[str, Any]
) -> None:
    """Why a rule stopped the run: the run's ``error`` (what Runs & errors and the summary
    show; a resume clears it) and a ``run_logs`` line (kept)."""
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(error=message[:4000]))
    conn.execute(
        sa.insert(run_logs).values(
            run_id=run_id,
            step=STEP,
            stream="engine",
            line=json.dumps({"rule": rule, "message": message, "numbers": numbers}, default=str),
            created_at=utcnow(),
        )
    )


def auto_stops(conn: sa.Connection, run_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The rules that stopped a run, newest first: rule, message, numbers, at."""
    rows = fetch_all(
        conn,
        sa.select(run_logs.c.line, run_logs.c.created_at)
        .where(run_logs.c.run_id == run_id, run_logs.c.step == STEP)
        .order_by(run_logs.c.id.desc())
        .limit(limit),
    )
    return [{**json.loads(line), "at": at.isoformat(timespec="seconds")} for line, at in rows]

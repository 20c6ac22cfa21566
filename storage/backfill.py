"""The backfill job's tables: the input set, per-item results (exactly once), and the report.

Writes follow ``storage.proxies``: stage a batch in bulk (``storage.bulk.staged``), delete
from the stage what is already stored for (run, item), insert the rest (``ON CONFLICT DO
NOTHING`` as the last guard), in the caller's transaction. Callers on PostgreSQL hold the
locks of the tasks the rows belong to (``engine.queue.sql.SqlQueue.store``), so two
executions of one task cannot both count an item as new.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all, staged
from storage.clock import utcnow
from storage.error_log import add_errors
from storage.schema import backfill_inputs, backfill_items, backfill_runs

# --- the input set -------------------------------------------------------------------------

INPUT_COLS = {"run_id": "bigint", "line_no": "bigint", "item_id": "text"}


def add_inputs(conn: sa.Connection, run_id: int, rows: Sequence[tuple[int, str]]) -> None:
    """Append valid input lines ``(line_no, item_id)``; duplicates are flagged later."""
    if not rows:
        return
    with staged(conn, INPUT_COLS, [(run_id, n, i) for n, i in rows], once=True) as s:
        conn.execute(
            sa.text(
                f"INSERT INTO backfill_inputs (run_id, line_no, item_id, dup) "
                f"SELECT run_id, line_no, item_id, FALSE FROM {s}"
            )
        )


def mark_duplicates(conn: sa.Connection, run_id: int) -> int:
    """Flag every line whose ID appeared on an earlier line; returns how many."""
    conn.execute(
        sa.text(
            """UPDATE backfill_inputs SET dup = TRUE
            WHERE run_id = :r AND line_no IN (
                SELECT line_no FROM (
                    SELECT line_no,
                           row_number() OVER (PARTITION BY item_id ORDER BY line_no) AS n
                    FROM backfill_inputs WHERE run_id = :r) ranked
                WHERE n > 1)"""
        ),
        {"r": run_id},
    )
    return int(
        fetch_all(
            conn,
            sa.select(sa.func.count())
            .select_from(backfill_inputs)
            .where(backfill_inputs.c.run_id == run_id, backfill_inputs.c.dup),
        )[0][0]
    )


def last_line(conn: sa.Connection, run_id: int) -> int:
    rows = fetch_all(
        conn,
        sa.select(sa.func.max(backfill_inputs.c.line_no)).where(backfill_inputs.c.run_id == run_id),
    )
    return int(rows[0][0] or 0)


def ids_between(conn: sa.Connection, run_id: int, after_line: int, upto_line: int) -> list[str]:
    """Unique IDs on lines (after_line, upto_line], in input order. Ranges of line numbers,
    not LIMIT pages: rows are stored in line order, so each range is a cheap pruned scan."""
    rows = fetch_all(
        conn,
        sa.select(backfill_inputs.c.item_id)
        .where(
            backfill_inputs.c.run_id == run_id,
            sa.not_(backfill_inputs.c.dup),
            backfill_inputs.c.line_no > after_line,
            backfill_inputs.c.line_no <= upto_line,
        )
        .order_by(backfill_inputs.c.line_no),
    )
    return [r[0] for r in rows]


def save_input_stats(conn: sa.Connection, run_id: int, stats: dict[str, int]) -> None:
    conn.execute(sa.delete(backfill_runs).where(backfill_runs.c.run_id == run_id))
    conn.execute(
        sa.insert(backfill_runs).values(
            run_id=run_id,
            lines=stats["lines"],
            blank=stats["blank"],
            duplicates=stats["duplicates"],
            malformed=stats["malformed"],
            unique_ids=stats["unique_ids"],
            planned_at=utcnow(),
        )
    )


def input_stats(conn: sa.Connection, run_id: int) -> dict[str, int] | None:
    rows = fetch_all(conn, sa.select(backfill_runs).where(backfill_runs.c.run_id == run_id))
    if not rows:
        return None
    r = rows[0]._mapping
    return {k: int(r[k]) for k in ("lines", "blank", "duplicates", "malformed", "unique_ids")}


def record_bad_lines(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
    add_errors(conn, rows)


# --- results -------------------------------------------------------------------------------


def ids_not_stored(conn: sa.Connection, run_id: int, ids: Sequence[str]) -> list[str]:
    """The IDs of a task this run has no stored result for yet, in task order."""
    if not ids:
        return []
    done = {
        r[0]
        for r in fetch_all(
            conn,
            sa.select(backfill_items.c.item_id).where(
                backfill_items.c.run_id == run_id, backfill_items.c.item_id.in_(list(ids))
            ),
        )
    }
    return [i for i in ids if i not in done]


ITEM_COLS = {
    "run_id": "bigint",
    "item_id": "text",
    "status": "text",
    "outcome": "text",
    "http_status": "int",
    "body": "text",
    "error": "text",
    "attempts": "int",
    "worker_id": "text",
    "task_id": "bigint",
    "fetched_at": "timestamp",
    "elapsed_ms": "float",
}


def store_items(conn: sa.Connection, rows: Iterable[Sequence[Any]]) -> int:
    """Store results (tuples in ITEM_COLS order) exactly once per (run, item); returns new."""
    unique: dict[tuple[int, str], Sequence[Any]] = {}
    for row in rows:
        unique.setdefault((row[0], row[1]), row)
    if not unique:
        return 0
    cols = ", ".join(ITEM_COLS)
    with staged(conn, ITEM_COLS, list(unique.values())) as s:
        conn.execute(
            sa.text(
                f"""DELETE FROM {s} WHERE EXISTS (SELECT 1 FROM backfill_items b
                WHERE b.run_id = {s}.run_id AND b.item_id = {s}.item_id)"""
            )
        )
        new = fetch_all(conn, sa.text(f"SELECT count(*) FROM {s}"))[0][0]
        if new:
            conn.execute(
                sa.text(
                    f"INSERT INTO backfill_items ({cols}) SELECT {cols} FROM {s} "
                    "ON CONFLICT DO NOTHING"
                )
            )
    return int(new)


def outcome_counts(conn: sa.Connection, run_id: int) -> dict[str, int]:
    rows = fetch_all(
        conn,
        sa.select(backfill_items.c.outcome, sa.func.count())
        .where(backfill_items.c.run_id == run_id)
        .group_by(backfill_items.c.outcome),
    )
    return {r[0]: int(r[1]) for r in rows}


# --- the report ----------------------------------------------------------------------------


def timing(conn: sa.Connection, run_id: int) -> dict[str, Any]:
    """Items, HTTP requests and the span of send times of a run's stored results."""
    r = fetch_all(
        conn,
        sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(backfill_items.c.attempts), 0),
            sa.func.min(backfill_items.c.fetched_at),
            sa.func.max(backfill_items.c.fetched_at),
            sa.func.avg(backfill_items.c.elapsed_ms),
        ).where(backfill_items.c.run_id == run_id),
    )[0]
    first: datetime | None = r[2]
    last: datetime | None = r[3]
    return {
        "items": int(r[0]),
        "requests": int(r[1]),
        "first_at": first,
        "last_at": last,
        "span_s": (last - first).total_seconds() if first and last else 0.0,
        "avg_latency_ms": float(r[4]) if r[4] is not None else None,
    }


def peak_window(conn: sa.Connection, run_id: int, window_s: float) -> int:
    """Most items whose last request fell in any window of ``window_s`` seconds."""
    rows = fetch_all(
        conn,
        sa.text(
            """SELECT max(n) FROM (
                SELECT count(*) OVER (ORDER BY fetched_at
                    RANGE BETWEEN (:w * INTERVAL '1 second') PRECEDING AND CURRENT ROW) AS n
                FROM backfill_items WHERE run_id = :r) w"""
        ),
        {"r": run_id, "w": float(window_s)},
    )
    return int(rows[0][0] or 0)


def per_worker(conn: sa.Connection, run_id: int) -> list[dict[str, Any]]:
    rows = fetch_all(
        conn,
        sa.select(
            backfill_items.c.worker_id,
            sa.func.count(),
            sa.func.sum(sa.case((backfill_items.c.status == "ok", 1), else_=0)),
            sa.func.sum(backfill_items.c.attempts),
        )
        .where(backfill_items.c.run_id == run_id)
        .group_by(backfill_items.c.worker_id)
        .order_by(sa.func.count().desc()),
    )
    return [
        {"worker_id": r[0], "items": int(r[1]), "ok": int(r[2]), "requests": int(r[3])}
        for r in rows
    ]


def failures(conn: sa.Connection, run_id: int, examples: int = 3) -> list[dict[str, Any]]:
    """Failed items by outcome and HTTP status, with a few example IDs and the last error."""
    groups = fetch_all(
        conn,
        sa.select(
            backfill_items.c.outcome,
            backfill_items.c.http_status,
            sa.func.count(),
        )
        .where(backfill_items.c.run_id == run_id, backfill_items.c.status != "ok")
        .group_by(backfill_items.c.outcome, backfill_items.c.http_status)
        .order_by(sa.func.count().desc()),
    )
    out = []
    for outcome, http_status, n in groups:
        status_cond = (
            backfill_items.c.http_status.is_(None)
            if http_status is None
            else backfill_items.c.http_status == http_status
        )
        ex = fetch_all(
            conn,
            sa.select(backfill_items.c.item_id, backfill_items.c.error)
            .where(
                backfill_items.c.run_id == run_id,
                backfill_items.c.status != "ok",
                backfill_items.c.outcome == outcome,
                status_cond,
            )
            .order_by(backfill_items.c.item_id)
            .limit(examples),
        )
        out.append(
            {
                "outcome": outcome,
                "http_status": http_status,
                "items": int(n),
                "examples": [e[0] for e in ex],
                "error": ex[0][1] if ex else None,
            }
        )
    return out


def missing_count(conn: sa.Connection, run_id: int) -> int:
    """Unique input IDs with no stored result (0 once a run completed)."""
    rows = fetch_all(
        conn,
        sa.text(
            """SELECT count(*) FROM backfill_inputs i
            WHERE i.run_id = :r AND NOT i.dup AND NOT EXISTS (
                SELECT 1 FROM backfill_items b WHERE b.run_id = i.run_id AND b.item_id = i.item_id)"""
        ),
        {"r": run_id},
    )
    return int(rows[0][0])


def failed_ids_after(conn: sa.Connection, run_id: int, after: str | None, limit: int) -> list[str]:
    """IDs stored as failed for a run, in ID order after ``after`` (keyset paging)."""
    stmt = (
        sa.select(backfill_items.c.item_id)
        .where(backfill_items.c.run_id == run_id, backfill_items.c.status == "failed")
        .order_by(backfill_items.c.item_id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(backfill_items.c.item_id > after)
    return [r[0] for r in fetch_all(conn, stmt)]


def forget_failed(conn: sa.Connection, run_id: int) -> int:
    """Delete a run's failed results so their IDs can be fetched again; returns how many."""
    res = conn.execute(
        sa.delete(backfill_items).where(
            backfill_items.c.run_id == run_id, backfill_items.c.status == "failed"
        )
    )
    return int(res.rowcount or 0)

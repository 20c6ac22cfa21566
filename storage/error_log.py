"""The ``errors`` table as a log of what went wrong per run and item: malformed input lines
recorded while planning (``bad_input``), item failures, invalid entities, results that
could not be stored (``unstorable_result``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.schema import errors

BAD_INPUT = "bad_input"
UNSTORABLE = "unstorable_result"  # a result its kind could not store (a poison result)


def add_errors(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows (dicts of ``errors`` columns: run_id, item_key, error_type, message,
    created_at, optionally task_id and worker_id) in one statement."""
    if rows:
        conn.execute(sa.insert(errors), list(rows))


def bad_input(conn: sa.Connection, run_id: int, limit: int) -> tuple[list[tuple[str, str]], int]:
    """The first ``limit`` malformed input lines of a run as (item key, message), in the
    order they were recorded, and how many were recorded in all."""
    where = (errors.c.run_id == run_id, errors.c.error_type == BAD_INPUT)
    rows = fetch_all(
        conn,
        sa.select(errors.c.item_key, errors.c.message)
        .where(*where)
        .order_by(errors.c.id)
        .limit(limit),
    )
    total = fetch_all(conn, sa.select(sa.func.count()).select_from(errors).where(*where))[0][0]
    return [(r[0], r[1]) for r in rows], int(total)

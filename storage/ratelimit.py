"""The fleet-wide rate limiter's statements (PostgreSQL): one ``rate_limits`` row per key.

    UPDATE rate_limits
       SET tat = greatest(tat, <db clock>) + T
     WHERE key = :key
    RETURNING tat, <db clock>

The row lock serialises every process of every machine on the key, and both times come from
the database, so machines with skewed clocks agree. The clock is ``clock_timestamp()``, not
``now()``: ``now()`` is the start of the transaction, taken *before* the statement waited
for the row lock; a stale "now" would let a grant start its interval in the past and the
next one come less than T later. ``clock_timestamp()`` in the SET list is read after the
lock is held (PostgreSQL re-evaluates the target list on the locked row).
The algorithm around these statements is in ``engine.ratelimit``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

CLOCK = "extract(epoch FROM clock_timestamp())::float8"
# A TAT that is not a finite number (NaN wins greatest(); written by a junk Retry-After before
# penalties were bounded) restarts the schedule rather than turning the limit off.
TAT = "(CASE WHEN tat IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8) THEN 0 ELSE tat END)"

_ACQUIRE = sa.text(
    f"""UPDATE rate_limits
        SET tat = greatest({TAT}, {CLOCK}) + :interval,
            updated_at = (clock_timestamp() AT TIME ZONE 'UTC')
        WHERE key = :key
        RETURNING tat, {CLOCK}"""
)
_PENALIZE = sa.text(
    f"""UPDATE rate_limits
        SET tat = greatest({TAT}, {CLOCK} + :seconds + :tau),
            updated_at = (clock_timestamp() AT TIME ZONE 'UTC')
        WHERE key = :key
        RETURNING tat"""
)
_CREATE = sa.text(
    "INSERT INTO rate_limits (key, tat, updated_at) VALUES (:key, 0, "
    "(clock_timestamp() AT TIME ZONE 'UTC')) ON CONFLICT (key) DO NOTHING"
)


def _update(conn: sa.Connection, stmt: sa.TextClause, params: dict[str, Any]) -> Any:
    """Run ``stmt`` on the key's row, creating the row the first time (any process)."""
    row = conn.execute(stmt, params).fetchone()
    if row is None:
        # No row yet. ON CONFLICT waits for a concurrent creator to commit; the retried
        # UPDATE (a new statement under READ COMMITTED) then sees its row.
        conn.execute(_CREATE, {"key": params["key"]})
        row = conn.execute(stmt, params).fetchone()
    return row


def reserve(conn: sa.Connection, key: str, interval_s: float) -> tuple[float, float]:
    """Move the key's TAT one interval on: ``(new TAT, database clock)`` in epoch seconds."""
    tat, now = _update(conn, _ACQUIRE, {"key": key, "interval": interval_s})
    return float(tat), float(now)


def push_back(conn: sa.Connection, key: str, seconds: float, tau_s: float) -> None:
    """No grant for ``key`` before ``seconds`` from now (the server refused with a 429)."""
    _update(conn, _PENALIZE, {"key": key, "seconds": float(seconds), "tau": tau_s})

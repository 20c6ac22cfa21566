"""The database clock: leases and heartbeats are stamped by the database, not the caller,
so workers on machines with skewed clocks agree on who holds what."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

NOW_SQL = "(now() AT TIME ZONE 'UTC')"


def db_now() -> sa.TextClause:
    return sa.text(NOW_SQL)


def seconds_from_now(seconds: float) -> sa.ColumnElement:
    """NOW + seconds, as an expression both DuckDB and PostgreSQL accept."""
    return sa.literal_column(f"({NOW_SQL} + ({float(seconds)!r} * INTERVAL '1 second'))")


def utcnow() -> datetime:
    """Naive UTC, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)

"""Bulk writes: stage many rows as one relation, then set-based SQL over it.

Row-by-row inserts cost DuckDB about 20x (see shared/reference/stack-notes.md), so results
are staged once per batch into a temp table: on DuckDB by binding one list per column as a
parameter and unnesting it in SQL, on PostgreSQL with COPY. The statements that follow
(dedupe against what is stored, insert, apply aggregates) are the same SQL on both.

``staged`` takes rows, ``staged_columns`` one list per column (``unnest_select`` is the
DuckDB SELECT list behind both). No Arrow: staging never imports pyarrow, nor the pandas
that ``pa.array`` imports on first use (about 0.5 s of CPU per process, more than a
10,000-proxy run spends converting). Timestamps must be naive UTC (``storage.clock.utcnow``),
the form every timestamp column stores.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

_counter = itertools.count()

# Column types understood by ``staged`` and ``staged_columns``.
SQL_TYPES: dict[str, str] = {
    "bigint": "BIGINT",
    "int": "INTEGER",
    "float": "DOUBLE PRECISION",
    "text": "TEXT",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMP",
}
# DuckDB list types for unnest (DOUBLE PRECISION[] is not a DuckDB spelling).
_DUCKDB_TYPES = {**SQL_TYPES, "float": "DOUBLE", "text": "VARCHAR"}


def unnest_select(columns: dict[str, str], first_param: int = 1) -> str:
    """DuckDB: a SELECT list turning one list parameter per column (``$n``, in ``columns``
    order, from ``first_param``) into rows; the lists are zipped."""
    return ", ".join(
        f"unnest(${first_param + i}::{_DUCKDB_TYPES[t]}[]) AS {c}"
        for i, (c, t) in enumerate(columns.items())
    )


@contextlib.contextmanager
def staged_columns(
    conn: sa.Connection, columns: dict[str, str], values: Sequence[Sequence[Any]]
) -> Iterator[str]:
    """Like ``staged``, from one list per column (in ``columns`` order, equal lengths)."""
    if conn.dialect.name != "duckdb":
        with _copied(conn, columns, list(zip(*values, strict=True))) as name:
            yield name
        return
    name = f"stage_{next(_counter)}"
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {name} AS SELECT {unnest_select(columns)}",
        tuple(list(v) for v in values),
    )
    try:
        yield name
    finally:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


@contextlib.contextmanager
def staged(
    conn: sa.Connection, columns: dict[str, str], rows: Sequence[Sequence[Any]]
) -> Iterator[str]:
    """Yield the name of a temp table holding ``rows`` (tuples in ``columns`` order)."""
    if conn.dialect.name == "duckdb":
        values = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in columns]
        with staged_columns(conn, columns, values) as name:
            yield name
        return
    with _copied(conn, columns, rows) as name:
        yield name


@contextlib.contextmanager
def _copied(
    conn: sa.Connection, columns: dict[str, str], rows: Sequence[Sequence[Any]]
) -> Iterator[str]:
    """PostgreSQL: COPY the rows into a temp table dropped at commit."""
    name = f"stage_{next(_counter)}"
    cols_sql = ", ".join(f"{c} {SQL_TYPES[t]}" for c, t in columns.items())
    conn.execute(sa.text(f"CREATE TEMP TABLE {name} ({cols_sql}) ON COMMIT DROP"))
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN") as cp:
        for row in rows:
            cp.write_row(row)
    try:
        yield name
    finally:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


def fetch_all(conn: sa.Connection, stmt: Any, params: dict | None = None) -> list[Any]:
    """Execute and drain: DuckDB refuses new work while a result is unfinished."""
    return list(conn.execute(stmt, params or {}).fetchall())

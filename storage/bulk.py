"""Bulk writes: stage many rows as one relation, then set-based SQL over it.

Row-by-row inserts cost DuckDB about 20x (see shared/reference/stack-notes.md), so results
are staged once per batch into a temp table: on DuckDB from one NumPy array per column
registered as a view (DuckDB scans them in C++: ~0.5 us a row, against ~3 us for list
parameters, which build one ``duckdb::Value`` per element), on PostgreSQL with COPY. The
statements that follow (dedupe against what is stored, insert, apply aggregates) are the
same SQL on both.

``staged`` takes rows, ``staged_columns`` one list per column. ``unnest_select`` is the
DuckDB SELECT list over list parameters, for small statements that need no temp table. No
Arrow: staging never imports pyarrow, nor the pandas that ``pa.array`` imports on first use
(about 0.5 s of CPU per process); NumPy costs ~0.1 s once. Timestamps must be naive UTC
(``storage.clock.utcnow``), the form every timestamp column stores.
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
# Columns that travel as native NumPy arrays when they hold no None; the rest are objects.
_NUMPY_TYPES = {"bigint": "int64", "int": "int64", "float": "float64"}


def unnest_select(columns: dict[str, str], first_param: int = 1) -> str:
    """DuckDB: a SELECT list turning one list parameter per column (``$n``, in ``columns``
    order, from ``first_param``) into rows; the lists are zipped."""
    return ", ".join(
        f"unnest(${first_param + i}::{_DUCKDB_TYPES[t]}[]) AS {c}"
        for i, (c, t) in enumerate(columns.items())
    )


@contextlib.contextmanager
def staged_columns(
    conn: sa.Connection,
    columns: dict[str, str],
    values: Sequence[Sequence[Any]],
    *,
    once: bool = False,
) -> Iterator[str]:
    """Like ``staged``, from one list per column (in ``columns`` order, equal lengths)."""
    if conn.dialect.name != "duckdb":
        with _copied(conn, columns, list(zip(*values, strict=True))) as name:
            yield name
        return
    casts = ", ".join(f"CAST({c} AS {_DUCKDB_TYPES[t]}) AS {c}" for c, t in columns.items())
    with registered(conn, columns, values) as view:
        if once:  # one statement reads it: the view itself, no temp table (~8 ms saved)
            yield f"(SELECT {casts} FROM {view})"
            return
        name = f"stage_{next(_counter)}"
        conn.exec_driver_sql(f"CREATE TEMP TABLE {name} AS SELECT {casts} FROM {view}")
    try:
        yield name
    finally:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


@contextlib.contextmanager
def registered(
    conn: sa.Connection, columns: dict[str, str], values: Sequence[Sequence[Any]]
) -> Iterator[str]:
    """DuckDB: the columns as a view over NumPy arrays, for one statement to read (its
    columns are not cast: select them through ``CAST`` where the type matters)."""
    import numpy as np

    arrays = {}
    for (col, kind), vals in zip(columns.items(), values, strict=True):
        dtype = _NUMPY_TYPES.get(kind)
        if dtype is not None and None not in vals:
            arrays[col] = np.fromiter(vals, dtype=dtype, count=len(vals))
        else:
            arrays[col] = np.array(vals, dtype=object)  # scalars: str, datetime, None
    name = f"src_{next(_counter)}"
    raw = conn.connection.driver_connection
    raw.register(name, arrays)
    try:
        yield name
    finally:
        raw.unregister(name)


@contextlib.contextmanager
def staged(
    conn: sa.Connection,
    columns: dict[str, str],
    rows: Sequence[Sequence[Any]],
    *,
    once: bool = False,
) -> Iterator[str]:
    """Yield a relation holding ``rows`` (tuples in ``columns`` order) to use as ``FROM {name}``:
    a temp table, or with ``once`` (a single statement reads it) on DuckDB a subquery over the
    arrays."""
    if conn.dialect.name == "duckdb":
        values = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in columns]
        with staged_columns(conn, columns, values, once=once) as name:
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

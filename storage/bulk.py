"""Bulk writes: stage many rows as one relation, then set-based SQL over it.

Row-by-row inserts cost DuckDB about 20x (see shared/reference/stack-notes.md), so results
are staged once per batch: on DuckDB as a registered Arrow table copied into a temp table,
on PostgreSQL with COPY into a temp table. The statements that follow (dedupe against what
is stored, insert, apply aggregates) are the same SQL on both.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

_counter = itertools.count()

# Column types understood by ``staged``: (arrow type, SQL type).
TYPES: dict[str, tuple[pa.DataType, str]] = {
    "bigint": (pa.int64(), "BIGINT"),
    "int": (pa.int32(), "INTEGER"),
    "float": (pa.float64(), "DOUBLE PRECISION"),
    "text": (pa.string(), "TEXT"),
    "bool": (pa.bool_(), "BOOLEAN"),
    "timestamp": (pa.timestamp("us"), "TIMESTAMP"),
}


@contextlib.contextmanager
def staged(
    conn: sa.Connection, columns: dict[str, str], rows: Sequence[Sequence[Any]]
) -> Iterator[str]:
    """Yield the name of a temp table holding ``rows`` (tuples in ``columns`` order)."""
    name = f"stage_{next(_counter)}"
    dialect = conn.dialect.name
    cols_sql = ", ".join(f"{c} {TYPES[t][1]}" for c, t in columns.items())
    if dialect == "duckdb":
        arrays = [
            pa.array([r[i] for r in rows], type=TYPES[t][0]) for i, t in enumerate(columns.values())
        ]
        table = pa.Table.from_arrays(arrays, names=list(columns))
        raw = conn.connection.driver_connection
        view = f"{name}_arrow"
        raw.register(view, table)
        try:
            conn.execute(sa.text(f"CREATE TEMP TABLE {name} ({cols_sql})"))
            conn.execute(sa.text(f"INSERT INTO {name} SELECT * FROM {view}"))
        finally:
            raw.unregister(view)
    else:
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

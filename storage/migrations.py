"""Schema versions as explicit, ordered steps.

Reflection (and so Alembic autogenerate) does not work on duckdb-engine with SQLAlchemy 2.1,
so each change to the schema is a numbered step here; ``migrate`` applies the missing ones
and records them in ``schema_version``. A step adds tables or columns; it never drops data.
Version 1 is the whole of ``storage.schema`` as first released.

Plugin kinds bring their own tables as a ``Component``: a name, its own numbered steps and
the tables they create. ``migrate(db, components=…)`` applies each component's missing steps
in order after the core ones, in the same transaction (under the same advisory lock on
PostgreSQL), and records them in ``component_versions``. The engine passes the registered
kinds' components (``engine.jobs.components()``); storage never imports the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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


def _v4_components(conn: sa.Connection) -> None:
    schema.component_versions.create(conn, checkfirst=True)


def _v5_rate_margin(conn: sa.Connection) -> None:
    # IF NOT EXISTS: a database created at version 5 has them from steps 1-2 already.
    for column in ("margin", "margin_at"):
        conn.execute(
            sa.text(f"ALTER TABLE rate_limits ADD COLUMN IF NOT EXISTS {column} FLOAT8 DEFAULT 0")
        )


def _v6_countries(conn: sa.Connection) -> None:
    # IF NOT EXISTS: a database created at version 6 has them from step 1 already.
    conn.execute(sa.text("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS country VARCHAR"))
    conn.execute(sa.text("ALTER TABLE workers ADD COLUMN IF NOT EXISTS countries VARCHAR"))


def _v7_versions_and_pools(conn: sa.Connection) -> None:
    # IF NOT EXISTS / checkfirst: a database created at version 7 has them from step 1.
    for table in ("runs", "workers"):
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS code_version VARCHAR"))
    schema.run_proxies.create(conn, checkfirst=True)


def _v9_fetch_costs(conn: sa.Connection) -> None:
    # IF NOT EXISTS: a database created at version 9 has them from step 1 already. Rows
    # logged before have neither (NULL): their costs count under no domain.
    for column in ("domain", "avoided"):
        conn.execute(sa.text(f"ALTER TABLE fetch_logs ADD COLUMN IF NOT EXISTS {column} TEXT"))


def _v10_metrics_indexes(conn: sa.Connection) -> None:
    # PostgreSQL only (DuckDB scans a column in milliseconds and pays for every index on
    # insert): the time windows the metrics endpoint reads every scrape.
    if conn.dialect.name != "postgresql":
        return
    for name, table, column in METRICS_INDEXES:
        conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column})"))


METRICS_INDEXES = (
    ("ix_backfill_items_fetched", "backfill_items", "fetched_at"),
    ("ix_urls_fetched", "urls", "fetched_at"),
    ("ix_errors_created", "errors", "created_at"),
)


def _v11_queue_indexes(conn: sa.Connection) -> None:
    # PostgreSQL only, like every secondary index (schema.py): a claim takes the first
    # queued tasks by (run, seq) and the watchdog the leases past their time; without these
    # both sort or scan every task of the run (9 ms a claim at 20,000 tasks, 48 ms at
    # 200,000, against 1.4 ms with them: bench/pg_claim_index.py).
    if conn.dialect.name != "postgresql":
        return
    for name, columns, where in QUEUE_INDEXES:
        conn.execute(
            sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON tasks ({columns}) WHERE {where}")
        )


QUEUE_INDEXES = (
    ("ix_tasks_queued", "run_id, seq", "status = 'queued'"),
    ("ix_tasks_leased", "lease_until", "status = 'leased'"),
)


def _v12_proxy_quality(conn: sa.Connection) -> None:
    # checkfirst: a database created at version 12 has it from step 1. The checks stored
    # before seed the history, so an upgraded pool is sortable by reliability at once.
    from storage.proxy_history import HISTORY_N, backfill_checks

    schema.proxy_quality.create(conn, checkfirst=True)
    backfill_checks(conn, HISTORY_N)


def _v13_error_snapshots(conn: sa.Connection) -> None:
    # checkfirst: a database created at version 13 has it from step 1 already.
    schema.error_snapshots.create(conn, checkfirst=True)


def _v14_lost_leases(conn: sa.Connection) -> None:
    # IF NOT EXISTS: a database created at version 14 has it from step 1 already.
    conn.execute(
        sa.text("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS lost_leases INTEGER DEFAULT 0")
    )


# (version, description, step). Append new steps; never edit released ones: steps 2 and 3
# hold the built-in kinds' tables (backfill, scrape) as released, before kinds could bring
# their own; a new kind's tables go into its own Component, not into a core step.
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
    (4, "component_versions: the schema steps of plugin kinds' components", _v4_components),
    (5, "rate_limits.margin, margin_at: the measured margin of each key", _v5_rate_margin),
    (6, "tasks.country, workers.countries: countries per worker", _v6_countries),
    (
        7,
        "runs.code_version, workers.code_version; run_proxies: a scrape run's proxy pool",
        _v7_versions_and_pools,
    ),
    (9, "fetch_logs.domain, avoided: cost accounting per domain", _v9_fetch_costs),
    (10, "indexes on the logs' time columns the metrics endpoint reads", _v10_metrics_indexes),
    (11, "partial indexes: queued tasks by (run, seq), leases by expiry", _v11_queue_indexes),
    (12, "proxy_quality: each proxy's last N checks and uses, reliability", _v12_proxy_quality),
    (13, "error_snapshots: the first page of each error kind of a run", _v13_error_snapshots),
    (14, "tasks.lost_leases: a task that loses every holder fails", _v14_lost_leases),
]

LATEST = STEPS[-1][0]


@dataclass(frozen=True)
class Component:
    """The tables a plugin kind brings and the steps that create or change them.

    ``steps`` are (version, description, step) like ``STEPS``: numbered from 1, applied in
    order, appended to and never edited once released. ``tables`` are those the steps
    create (define them on a ``MetaData`` of the plugin's own, not ``storage.schema``'s):
    exports and the Data page list them. A kind declares its component with
    ``KindInfo(schema="module:attr")``.
    """

    name: str
    steps: Sequence[tuple[int, str, Step]]
    tables: Sequence[sa.Table] = ()

    def __post_init__(self) -> None:
        versions = [v for v, _, _ in self.steps]
        if versions != sorted(set(versions)) or (versions and versions[0] < 1):
            raise ValueError(f"component {self.name!r}: step versions must rise from 1")

    @property
    def latest(self) -> int:
        return self.steps[-1][0] if self.steps else 0


INTERNAL_TABLES = {"schema_version", "component_versions"}  # migration bookkeeping


def exportable_tables(components: Iterable[Component] = ()) -> dict[str, sa.Table]:
    """Every table that can be exported (``storage.export``, the Data page): the core
    schema's and those of the components (plugin kinds' tables), by name. Here, not in
    ``storage.export``, so that listing them (the CLI's help) does not import pyarrow."""
    out = {n: t for n, t in schema.TABLES.items() if n not in INTERNAL_TABLES}
    for component in components:
        for table in component.tables:
            if table.name in out or table.name in INTERNAL_TABLES:
                raise ValueError(
                    f"component {component.name!r}: table {table.name!r} exists already"
                )
            out[table.name] = table
    return out


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


def applied_versions(conn: sa.Connection) -> set[int]:
    """The core steps this database has, by number. A step is applied when it is missing,
    not only when it is newer than the newest applied: steps developed side by side land
    in any order (a database that got step 10 before step 6 existed still gets step 6)."""
    if current_version(conn) == 0:
        return set()
    return {int(r[0]) for r in conn.execute(sa.select(schema.schema_version.c.version))}


def component_versions(conn: sa.Connection) -> dict[str, int]:
    """Component name → the last step applied (after core step 4; else empty)."""
    if current_version(conn) < 4:
        return {}
    cv = schema.component_versions
    rows = conn.execute(
        sa.select(cv.c.component, sa.func.max(cv.c.version)).group_by(cv.c.component)
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def migrate(db: Database, components: Sequence[Component] = ()) -> int:
    """Bring the core schema to LATEST and each component to its latest step, in one
    transaction; returns the core version found before."""
    now = datetime.now(UTC).replace(tzinfo=None)
    with db.begin() as conn:
        if db.dialect == "postgresql":
            # Two processes starting at once must not both create the schema.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727001)"))
        found = current_version(conn)
        have = applied_versions(conn)
        for version, description, step in STEPS:
            if version in have:
                continue
            step(conn)
            conn.execute(
                sa.insert(schema.schema_version).values(
                    version=version, description=description, applied_at=now
                )
            )
        applied = component_versions(conn)
        for component in components:
            done = applied.get(component.name, 0)
            for version, description, step in component.steps:
                if version <= done:
                    continue
                step(conn)
                conn.execute(
                    sa.insert(schema.component_versions).values(
                        component=component.name,
                        version=version,
                        description=description,
                        applied_at=now,
                    )
                )
    return found

"""Item logs: where a job kind stores one row per executed item, and the one way to count them.

Each kind says where its items land (``RunKind.item_log()`` in the engine returns an
``ItemLog``; a kind without per-item rows returns None); summaries, throughput, per-worker
rates and outcome breakdowns read every registered kind's log through this description, so
a kind that brings its own result table is counted everywhere without an edit here. The
logs reach storage as arguments (``storage`` never imports the engine's registry).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all


@dataclass(frozen=True, slots=True)
class ItemLog:
    """Where a job kind stores one row per executed item, and how to read it. The table has
    a ``run_id`` column; the named columns exist in it."""

    kind: str
    table: sa.Table
    time: str  # when the item was executed
    ok_column: str  # the item succeeded when this column equals ok_value (or is in it)
    ok_value: Any = True
    key: str | None = None  # the item's key column (None: proxies, joined by proxy_id)
    outcome: str = "outcome"
    error: str = "error"
    worker: str | None = "worker_id"  # None: the log does not say which worker
    pending: str | None = None  # an outcome value of rows not executed yet (not counted)

    def col(self, name: str) -> sa.ColumnElement[Any]:
        return self.table.c[name]

    @property
    def ok(self) -> sa.ColumnElement[bool]:
        if isinstance(self.ok_value, tuple):  # several outcomes are not failures
            return self.table.c[self.ok_column].in_(self.ok_value)
        return self.table.c[self.ok_column] == self.ok_value

    def stored(self) -> list[sa.ColumnElement[bool]]:
        """Conditions for rows that are results (a registered, unfetched page is not)."""
        return [] if self.pending is None else [self.col(self.outcome) != self.pending]


# kind name → its log: what the dashboards iterate (engine.jobs.item_logs() builds it)
ItemLogs = Mapping[str, ItemLog]


def outcome_counts(conn: sa.Connection, log: ItemLog, run_id: int) -> dict[str, int]:
    """A run's stored results by outcome (rows still pending left out)."""
    outcome = log.col(log.outcome)
    rows = fetch_all(
        conn,
        sa.select(outcome, sa.func.count())
        .where(log.table.c.run_id == run_id, *log.stored())
        .group_by(outcome),
    )
    return {r[0]: int(r[1]) for r in rows}

"""Which queued countries no live worker serves: what turns a run that would wait silently
into one that says why it waits.

A task planned for a country (``tasks.country``) is claimed only by a worker serving it
(``workers.countries``, NULL: any). When every live worker is restricted to other countries,
such tasks stay queued for ever; the CLI prints ``CountryGap.message`` while it follows a run
and the console shows it on the Workers and Runs pages. Live means alive by status and
heartbeated within ``fresh_s`` (a killed worker stops counting once its heartbeat is stale).
Only tasks of running runs count: a paused run's tasks wait for the operator, not a worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import NOW_SQL
from storage.schema import runs, tasks, workers

LIVE = ("starting", "idle", "busy", "stopping")
SHOWN_WORKERS = 8  # (host, countries) pairs named in a message; the rest are counted


@dataclass(frozen=True)
class CountryGap:
    """Countries with queued tasks and no live worker serving them."""

    unserved: dict[str, int]  # country (normal form) → its queued tasks
    workers: list[tuple[str, str | None]]  # (host, countries; None: any) of live workers

    def message(self) -> str:
        """One line naming the countries and the live workers (stable while neither
        changes, so a follower can print it once)."""
        codes = ", ".join(sorted(self.unserved))
        what = "country" if len(self.unserved) == 1 else "countries"
        if self.workers:
            shown = [f"{h} [{c or 'any'}]" for h, c in self.workers[:SHOWN_WORKERS]]
            more = len(self.workers) - SHOWN_WORKERS
            who = "workers: " + ", ".join(shown) + (f", and {more} more" if more > 0 else "")
        else:
            who = "no live worker at all"
        flag = ",".join(sorted(self.unserved))
        return (
            f"tasks of {what} {codes} are queued but no live worker serves {codes} ({who}); "
            f"start one with `engine.run worker --countries {flag}`"
        )


def live_worker_countries(conn: sa.Connection, fresh_s: float) -> list[tuple[str, str | None]]:
    """(host, countries) of the live workers, each distinct pair once, by host."""
    cutoff = sa.literal_column(f"({NOW_SQL} - ({float(fresh_s)!r} * INTERVAL '1 second'))")
    rows = fetch_all(
        conn,
        sa.select(workers.c.host, workers.c.countries)
        .where(workers.c.status.in_(LIVE), workers.c.heartbeat_at >= cutoff)
        .distinct(),
    )
    return sorted(((r[0], r[1]) for r in rows), key=lambda r: (r[0], r[1] or ""))


def queued_countries(conn: sa.Connection, run_id: int | None = None) -> dict[str, int]:
    """Country → queued tasks of running runs (of ``run_id``, when given) planned for it."""
    where = [tasks.c.status == "queued", tasks.c.country.is_not(None), runs.c.status == "running"]
    if run_id is not None:
        where.append(tasks.c.run_id == run_id)
    rows = fetch_all(
        conn,
        sa.select(tasks.c.country, sa.func.count())
        .select_from(tasks.join(runs, runs.c.id == tasks.c.run_id))
        .where(*where)
        .group_by(tasks.c.country),
    )
    return {r[0]: int(r[1]) for r in rows}


def country_gap(
    conn: sa.Connection, fresh_s: float, run_id: int | None = None
) -> CountryGap | None:
    """The countries of queued tasks (of ``run_id``, or of every running run) that no live
    worker serves, or None when every one is served (or none is queued)."""
    queued = queued_countries(conn, run_id)
    if not queued:
        return None
    live = live_worker_countries(conn, fresh_s)
    if any(c is None for _, c in live):  # a worker that serves any country serves them all
        return None
    served = {code for _, c in live for code in (c or "").split(",") if code}
    unserved = {c: n for c, n in queued.items() if c not in served}
    return CountryGap(unserved, live) if unserved else None

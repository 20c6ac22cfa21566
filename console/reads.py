"""Cached reads for the pages: storage.dashboard aggregates, shaped for display.

``st.cache_data(ttl=…)`` shares one read between the sessions looking at the same thing: the
live parts refresh every second or two, and ten open tabs must not mean ten times the SQL.
Keys are the database URL and the filter values (plain hashable arguments). Every query is
an aggregate or one page of rows (``storage.dashboard``), so a read costs the same with
a thousand rows or a million. The item logs the dashboards count are every registered
kind's (``engine.jobs.item_logs()``), the tables those of the core and of the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from console.resources import get_console
from engine.jobs import item_logs
from engine.summary import run_summary
from storage import dashboard as dash
from storage.clock import utcnow
from storage.export import export, export_entities, exportable_tables

LIVE_TTL_S = 1.0
SLOW_TTL_S = 5.0
NOW_WINDOW_S = 10  # "items/s now" averages the last ten seconds


def _db(url: str) -> Any:
    return get_console(url).db


# --- home ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HomeSnapshot:
    runs_by_status: dict[str, int]
    workers_alive: int
    items_per_s_now: float
    per_minute: list[tuple[datetime, float]]  # (minute, items/s) over the last hour, gaps 0
    items_last_hour: int
    errors_last_hour: int
    pool_by_status: dict[str, int]
    fetch: dash.FetchActivity  # fetch attempts of scrape runs over the last hour
    fetch_per_minute: list[tuple[datetime, float]]  # (minute, attempts/s), gaps 0


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def home_snapshot(url: str, heartbeat_within_s: float) -> HomeSnapshot:
    now = utcnow()
    hour_ago = now - timedelta(hours=1)
    with _db(url).connect() as conn:
        by_minute = dict(dash.throughput(conn, item_logs(), hour_ago, "minute"))
        snap = HomeSnapshot(
            runs_by_status=dash.runs_by_status(conn),
            workers_alive=dash.workers_alive(conn, heartbeat_within_s),
            items_per_s_now=round(
                dash.items_since(conn, item_logs(), now - timedelta(seconds=NOW_WINDOW_S))
                / NOW_WINDOW_S,
                1,
            ),
            per_minute=[],
            items_last_hour=sum(by_minute.values()),
            errors_last_hour=dash.errors_since(conn, hour_ago),
            pool_by_status=dash.pool_by_status(conn),
            fetch=dash.fetch_activity(conn, hour_ago),
            fetch_per_minute=[],
        )
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    minutes = [start + timedelta(minutes=i) for i in range(60)]
    snap.per_minute.extend((m, round(by_minute.get(m, 0) / 60, 2)) for m in minutes)
    fetches = dict(snap.fetch.per_minute)
    snap.fetch_per_minute.extend((m, round(fetches.get(m, 0) / 60, 2)) for m in minutes)
    return snap


# --- runs ----------------------------------------------------------------------------------

RUN_COLUMNS = [
    "run",
    "kind",
    "status",
    "items",
    "done",
    "ok",
    "failed",
    "duration_s",
    "created",
    "finished",
    "error",
]


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def runs_frame(url: str, limit: int = 200, kind: str | None = None) -> pd.DataFrame:
    with _db(url).connect() as conn:
        stats = dash.run_stats(conn, item_logs(), limit=limit, kind=kind)
    return pd.DataFrame(
        [
            (
                s.id,
                s.kind,
                s.status,
                s.total,
                s.done,
                s.ok,
                s.failed,
                round(s.duration_s, 1),
                s.created_at,
                s.finished_at,
                s.error,
            )
            for s in stats
        ],
        columns=RUN_COLUMNS,
    )


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def runs_by_status(url: str) -> dict[str, int]:
    with _db(url).connect() as conn:
        return dash.runs_by_status(conn)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def latest_run_id(url: str, kind: str) -> int | None:
    with _db(url).connect() as conn:
        stats = dash.run_stats(conn, item_logs(), limit=1, kind=kind)
    return stats[0].id if stats else None


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def summary(url: str, run_id: int) -> dict[str, Any]:
    """engine.summary.run_summary: what the CLI prints with --json."""
    return run_summary(_db(url), run_id, get_console(url).settings)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def run_cost(url: str, run_id: int, kind: str) -> dict[str, Any] | None:
    """What a run cost (``RunKind.cost``; None for a kind that does not account for it)."""
    from engine.jobs import get_kind

    with _db(url).connect() as conn:
        return get_kind(kind, get_console(url).settings).cost(conn, run_id)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def backfill_report(url: str, run_id: int) -> dict[str, Any]:
    """The backfill job's evaluation report (what `engine.run report` prints)."""
    from engine.jobs.backfill.kind import run_report

    return run_report(_db(url), run_id)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def run_detail(
    url: str, run_id: int, kind: str
) -> tuple[dash.TaskStats, list[dash.Group], list[dash.Group]]:
    with _db(url).connect() as conn:
        return (
            dash.task_stats(conn, run_id),
            dash.error_groups(conn, run_id),
            dash.outcome_groups(conn, item_logs().get(kind), run_id),
        )


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def error_snapshots(url: str, run_id: int) -> list[dict[str, Any]]:
    """A run's error snapshots without their bytes (``storage.snapshots``)."""
    from storage.snapshots import list_snapshots

    with _db(url).connect() as conn:
        return list_snapshots(conn, run_id)


@st.cache_data(ttl=60, max_entries=8, show_spinner=False)
def error_snapshot(url: str, run_id: int, snapshot_id: int) -> dict[str, Any] | None:
    """One snapshot with its HTML and screenshot (a few MB at most: few kept)."""
    from storage.snapshots import get_snapshot

    with _db(url).connect() as conn:
        return get_snapshot(conn, run_id, snapshot_id)


def snapshots_zip(url: str, run_id: int) -> bytes:
    """Every snapshot of the run in one zip (what `engine.run snapshots --out` writes);
    built when the download button is clicked, not cached."""
    from storage.snapshots import zip_snapshots

    with _db(url).connect() as conn:
        return zip_snapshots(conn, run_id)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def run_throughput(url: str, run_id: int, seconds: int = 90) -> pd.DataFrame:
    """Items stored per second by one run over the last ``seconds`` complete seconds (0 where
    nothing was stored), a steady window for a live chart."""
    end = utcnow().replace(microsecond=0) - timedelta(seconds=1)  # the current second is partial
    start = end - timedelta(seconds=seconds - 1)
    with _db(url).connect() as conn:
        rows = dict(dash.throughput(conn, item_logs(), start, "second", run_id=run_id))
    times = [start + timedelta(seconds=i) for i in range(seconds)]
    return pd.DataFrame({"time": times, "items/s": [rows.get(t, 0) for t in times]})


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def hourly(url: str, hours: int = 24) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(errors per hour by type, item outcomes per hour) over the last ``hours``."""
    since = utcnow() - timedelta(hours=hours)
    with _db(url).connect() as conn:
        errs = dash.errors_per_hour(conn, since)
        outcomes = dash.outcomes_per_hour(conn, item_logs(), since)
    return (
        pd.DataFrame(errs, columns=["hour", "error_type", "errors"]),
        pd.DataFrame(outcomes, columns=["hour", "outcome", "items"]),
    )


# --- scrape runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScrapeLive:
    progress: dash.ScrapeProgress
    method_mix: list[tuple[str, str, int]]  # (country, method, pages done)
    blocked: list[tuple[str, str, int]]  # (reason, method, attempts)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def scrape_live(url: str, run_id: int) -> ScrapeLive:
    with _db(url).connect() as conn:
        return ScrapeLive(
            progress=dash.scrape_progress(conn, run_id, NOW_WINDOW_S),
            method_mix=dash.method_mix(conn, run_id),
            blocked=dash.blocked_reasons(conn, run_id),
        )


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def run_ids(url: str, kind: str, limit: int = 200) -> list[int]:
    """The newest runs of a kind, newest first."""
    with _db(url).connect() as conn:
        return [s.id for s in dash.run_stats(conn, item_logs(), limit=limit, kind=kind)]


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def fetch_log_stats(url: str, run_id: int) -> dash.FetchLogStats:
    with _db(url).connect() as conn:
        return dash.fetch_log_stats(conn, run_id)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def entity_countries(url: str, run_id: int | None) -> list[str]:
    with _db(url).connect() as conn:
        return dash.entity_countries(conn, run_id)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def entity_page(
    url: str, run_id: int | None, country: str | None, page: int, size: int
) -> tuple[int, pd.DataFrame]:
    """(entities matching, one page of them with their attributes as columns)."""
    with _db(url).connect() as conn:
        total = dash.entity_count(conn, run_id, country)
        cols, rows = dash.entity_page(conn, run_id, country, (page - 1) * size, size)
    return total, pd.DataFrame(rows, columns=cols)


def entities_export_bytes(
    url: str, fmt: str, exports_dir: Path, run_id: int | None, country: str | None
) -> bytes:
    """Entities with their attributes as columns, CSV or Parquet (storage.export, streamed)."""
    exports_dir.mkdir(parents=True, exist_ok=True)
    out = exports_dir / f"console-entities-{utcnow():%Y%m%d%H%M%S%f}.{fmt}"
    try:
        export_entities(_db(url), fmt, out, run_id=run_id, country=country)
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


# --- workers -------------------------------------------------------------------------------

WORKER_COLUMNS = [
    "worker",
    "host",
    "pid",
    "kind",
    "status",
    "countries",
    "heartbeat_age_s",
    "tasks_held",
    "items_done",
    "items_failed",
    "items_per_s",
    "avg_items_per_s",
    "started",
    "exit_reason",
]


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def workers_frame(url: str) -> pd.DataFrame:
    with _db(url).connect() as conn:
        stats = dash.worker_stats(conn, item_logs())
    return pd.DataFrame(
        [
            (
                w.id,
                w.host,
                w.pid,
                w.kind,
                w.status,
                w.countries or "any",
                None if w.heartbeat_age_s is None else round(w.heartbeat_age_s, 1),
                w.tasks_held,
                w.items_done,
                w.items_failed,
                w.items_per_s,
                w.lifetime_per_s,
                w.started_at,
                w.exit_reason,
            )
            for w in stats
        ],
        columns=WORKER_COLUMNS,
    )


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def country_warning(url: str, fresh_s: float, run_id: int | None = None) -> str | None:
    """Queued countries no live worker serves (``engine.api.country_warning``), or None."""
    from engine.api import country_warning as warning

    return warning(_db(url), fresh_s, run_id)


# --- proxy pool ----------------------------------------------------------------------------


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def pool_values(url: str, column: str) -> list[str]:
    with _db(url).connect() as conn:
        return dash.pool_values(conn, column)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def pool_by_status(url: str) -> dict[str, int]:
    """Stored proxies per status (active, inactive, untested, tampering)."""
    with _db(url).connect() as conn:
        return dash.pool_by_status(conn)


def pool_status_count(url: str, status: str | None) -> int | None:
    """Stored proxies with a status (None when no status is asked about)."""
    if status is None:
        return None
    with _db(url).connect() as conn:
        return dash.pool_by_status(conn).get(status, 0)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def pool_page(
    url: str, flt: dash.PoolFilter, sort: str, descending: bool, page: int, size: int
) -> tuple[int, pd.DataFrame]:
    """(rows matching the filter, one page of them)."""
    with _db(url).connect() as conn:
        total = dash.pool_count(conn, flt)
        cols, rows = dash.pool_page(conn, flt, sort, descending, (page - 1) * size, size)
    return total, pd.DataFrame(rows, columns=cols)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def proxy_history(url: str, proxy_id: int) -> list[tuple[Any, str, bool, float | None]]:
    """One proxy's kept checks and uses, oldest first (``storage.proxy_history``)."""
    from storage.proxy_history import history

    with _db(url).connect() as conn:
        return history(conn, proxy_id)


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def pool_charts(
    url: str,
) -> tuple[list[tuple[int, int]], list[tuple[str, int]], list[tuple[str, int]], dict[str, int]]:
    """(latency histogram, alive by protocol, alive by country, pool by status)."""
    with _db(url).connect() as conn:
        return (
            dash.latency_histogram(conn),
            dash.alive_by(conn, "protocol"),
            dash.alive_by(conn, "country", limit=20),
            dash.pool_by_status(conn),
        )


# --- the fetchers ---------------------------------------------------------------------------


def fetch_settings() -> Any:
    """The fetchers' settings (FETCHFLEET_* too), read like the cascade reads them."""
    from fetchers.config import FetchSettings

    return FetchSettings()


@st.cache_data(ttl=30, show_spinner=False)
def doctor() -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """(what each fetch method needs and whether it is here, the per-country method order):
    ``fetchers.doctor`` (what `engine.run doctor` prints) and the cascade's policy."""
    from fetchers.cascade import Policy
    from fetchers.config import FetchSettings
    from fetchers.doctor import doctor as run_doctor

    settings = FetchSettings()
    checks = [
        {
            "method": c.method,
            "needs": c.needs,
            "kind": c.kind,
            "status": "ok" if c.ok else "missing",
            "found at": c.found_at,
            "install": c.install,
        }
        for c in run_doctor(settings)
    ]
    return checks, Policy.load(settings.policy_file).rows()


# --- tables and exports --------------------------------------------------------------------


def table_names() -> list[str]:
    """Every exportable table: the core schema's and the registered kinds' own."""
    from engine.jobs import table_names as names

    return names()


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def table_preview(
    url: str, table: str, run_id: int | None, limit: int = 50
) -> tuple[int, pd.DataFrame]:
    db = _db(url)
    tables = exportable_tables(db.components)
    with db.connect() as conn:
        total = dash.table_count(conn, table, run_id, tables)
        cols, rows = dash.table_preview(conn, table, run_id, limit, tables)
    return total, pd.DataFrame(rows, columns=cols)


def export_bytes(
    url: str,
    table: str,
    fmt: str,
    exports_dir: Path,
    run_id: int | None = None,
    where: dict[str, str] | None = None,
) -> bytes:
    """A CSV or Parquet file of the selection (storage.export: streamed, no secrets)."""
    exports_dir.mkdir(parents=True, exist_ok=True)
    out = exports_dir / f"console-{table}-{utcnow():%Y%m%d%H%M%S%f}.{fmt}"
    try:
        export(_db(url), table, fmt, out, run_id=run_id, where=where)
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)

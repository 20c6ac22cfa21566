"""The aggregates the console shows, computed in SQL: never whole tables into memory.

Each function takes a connection and returns small plain values (dataclasses, tuples, dicts)
sized by the answer, not by the tables: counts by status, rows per minute, one page of the
proxy table. Everything a user picks (a status, a country, a run) reaches SQL as a bound
parameter; the few names that are inlined (a ``date_trunc`` unit, a sort column, a bucket
width) come from whitelists in this module, never from input.

The *item logs* are the per-item result tables of the job kinds (one row per run and item);
throughput, per-worker rates and outcome breakdowns read them. Today that is
``proxy_checks`` (validate); a kind that lands with its own result table adds one entry to
``ITEM_LOGS`` and every chart counts it.

Both databases: the SQL below runs unchanged on DuckDB and PostgreSQL (``date_trunc``,
``FILTER (WHERE …)``, ``GROUP BY`` an output alias).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import NOW_SQL, utcnow
from storage.export import build_query
from storage.schema import TABLES, errors, proxies, proxy_checks, runs, tasks, workers

ALIVE_WORKER_STATUSES = ("starting", "idle", "busy", "stopping")
TIME_UNITS = ("second", "minute", "hour")


@dataclass(frozen=True, slots=True)
class ItemLog:
    """Where a job kind stores one row per executed item, and how to read it."""

    kind: str
    table: sa.Table
    time: str  # when the item was executed
    ok_column: str  # the item succeeded when this column equals ok_value
    ok_value: Any = True
    key: str | None = None  # the item's key column (None: proxies, joined by proxy_id)
    outcome: str = "outcome"
    error: str = "error"
    worker: str = "worker_id"

    def col(self, name: str) -> sa.ColumnElement[Any]:
        return self.table.c[name]

    @property
    def ok(self) -> sa.ColumnElement[bool]:
        return self.table.c[self.ok_column] == self.ok_value


ITEM_LOGS: dict[str, ItemLog] = {
    "validate": ItemLog("validate", proxy_checks, time="checked_at", ok_column="alive"),
}
if "backfill_items" in TABLES:  # the backfill job's results (one row per run and ID)
    ITEM_LOGS["backfill"] = ItemLog(
        "backfill",
        TABLES["backfill_items"],
        time="fetched_at",
        ok_column="status",
        ok_value="ok",
        key="item_id",
    )


def _unit(unit: str) -> sa.ColumnElement[Any]:
    if unit not in TIME_UNITS:
        raise ValueError(f"time unit {unit!r}: one of {', '.join(TIME_UNITS)}")
    return sa.literal_column(f"'{unit}'")


def _bucket(unit: str, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.func.date_trunc(_unit(unit), column)


# --- runs ----------------------------------------------------------------------------------


@dataclass(slots=True)
class RunStat:
    id: int
    kind: str
    status: str
    total: int
    done: int
    ok: int
    failed: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float
    error: str | None


def runs_by_status(conn: sa.Connection) -> dict[str, int]:
    rows = fetch_all(conn, sa.select(runs.c.status, sa.func.count()).group_by(runs.c.status))
    return {r[0]: int(r[1]) for r in rows}


def done_counts(conn: sa.Connection, run_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """run id → (items stored, items ok), over every item log."""
    out: dict[int, tuple[int, int]] = {}
    if not run_ids:
        return out
    for log in ITEM_LOGS.values():
        run_col = log.table.c.run_id
        rows = fetch_all(
            conn,
            sa.select(run_col, sa.func.count(), sa.func.count().filter(log.ok))
            .where(run_col.in_(list(run_ids)))
            .group_by(run_col),
        )
        for run_id, done, ok in rows:
            prev = out.get(int(run_id), (0, 0))
            out[int(run_id)] = (prev[0] + int(done), prev[1] + int(ok))
    return out


def run_stats(
    conn: sa.Connection,
    limit: int = 100,
    kind: str | None = None,
    status: str | None = None,
) -> list[RunStat]:
    """The newest runs with their item counts and durations."""
    stmt = sa.select(
        runs.c.id,
        runs.c.kind,
        runs.c.status,
        runs.c.total_items,
        runs.c.created_at,
        runs.c.started_at,
        runs.c.finished_at,
        runs.c.error,
    ).order_by(runs.c.id.desc())
    if kind:
        stmt = stmt.where(runs.c.kind == kind)
    if status:
        stmt = stmt.where(runs.c.status == status)
    rows = fetch_all(conn, stmt.limit(limit))
    counts = done_counts(conn, [r[0] for r in rows])
    now = utcnow()
    out = []
    for r in rows:
        done, ok = counts.get(int(r[0]), (0, 0))
        started, finished = r[5], r[6]
        duration = ((finished or now) - started).total_seconds() if started else 0.0
        out.append(
            RunStat(
                id=int(r[0]),
                kind=r[1],
                status=r[2],
                total=int(r[3]),
                done=done,
                ok=ok,
                failed=done - ok,
                created_at=r[4],
                started_at=started,
                finished_at=finished,
                duration_s=max(duration, 0.0),
                error=r[7],
            )
        )
    return out


@dataclass(slots=True)
class TaskStats:
    states: dict[str, int]
    retried_tasks: int  # tasks that needed more than one attempt
    retries: int  # attempts beyond the first, over all tasks
    leased: list[tuple[int, str | None]]  # (task id, worker id) held right now (first 50)


def task_stats(conn: sa.Connection, run_id: int) -> TaskStats:
    states = {
        r[0]: int(r[1])
        for r in fetch_all(
            conn,
            sa.select(tasks.c.status, sa.func.count())
            .where(tasks.c.run_id == run_id)
            .group_by(tasks.c.status),
        )
    }
    extra = sa.func.greatest(tasks.c.attempts - 1, 0)
    retried, retries = fetch_all(
        conn,
        sa.select(
            sa.func.count().filter(tasks.c.attempts > 1), sa.func.coalesce(sa.func.sum(extra), 0)
        ).where(tasks.c.run_id == run_id),
    )[0]
    leased = fetch_all(
        conn,
        sa.select(tasks.c.id, tasks.c.worker_id)
        .where(tasks.c.run_id == run_id, tasks.c.status == "leased")
        .order_by(tasks.c.id)
        .limit(50),
    )
    return TaskStats(
        states=states,
        retried_tasks=int(retried or 0),
        retries=int(retries or 0),
        leased=[(int(t), w) for t, w in leased],
    )


# --- errors --------------------------------------------------------------------------------


@dataclass(slots=True)
class Group:
    """A count of one kind of thing (an error type, an item outcome) with a few examples."""

    name: str
    count: int
    examples: list[tuple[str | None, str | None]] = field(default_factory=list)  # (key, message)


def errors_since(conn: sa.Connection, since: datetime) -> int:
    return int(
        fetch_all(
            conn, sa.select(sa.func.count()).select_from(errors).where(errors.c.created_at >= since)
        )[0][0]
    )


def errors_per_hour(conn: sa.Connection, since: datetime) -> list[tuple[datetime, str, int]]:
    """(hour, error type, count) since ``since``, oldest first."""
    hour = _bucket("hour", errors.c.created_at).label("hour")
    rows = fetch_all(
        conn,
        sa.select(hour, errors.c.error_type, sa.func.count())
        .where(errors.c.created_at >= since)
        .group_by(sa.text("hour"), errors.c.error_type)
        .order_by(sa.text("hour")),
    )
    return [(r[0], r[1], int(r[2])) for r in rows]


def error_groups(conn: sa.Connection, run_id: int, examples: int = 3) -> list[Group]:
    """The run's error log (bad input lines, failed task attempts…) by type, with examples."""
    groups = [
        Group(r[0], int(r[1]))
        for r in fetch_all(
            conn,
            sa.select(errors.c.error_type, sa.func.count())
            .where(errors.c.run_id == run_id)
            .group_by(errors.c.error_type)
            .order_by(sa.func.count().desc()),
        )
    ]
    for g in groups:
        g.examples = [
            (r[0], r[1])
            for r in fetch_all(
                conn,
                sa.select(errors.c.item_key, errors.c.message)
                .where(errors.c.run_id == run_id, errors.c.error_type == g.name)
                .order_by(errors.c.id)
                .limit(examples),
            )
        ]
    return groups


def outcome_groups(conn: sa.Connection, kind: str, run_id: int, examples: int = 3) -> list[Group]:
    """The run's item outcomes (alive, timeout, refused…) with example error messages."""
    log = ITEM_LOGS.get(kind)
    if log is None:
        return []
    t, outcome = log.table, log.col(log.outcome)
    groups = [
        Group(r[0], int(r[1]))
        for r in fetch_all(
            conn,
            sa.select(outcome, sa.func.count())
            .where(t.c.run_id == run_id)
            .group_by(outcome)
            .order_by(sa.func.count().desc()),
        )
    ]
    key = _item_key(log)
    for g in groups:
        stmt = (
            sa.select(key, log.col(log.error))
            .select_from(_item_join(log))
            .where(t.c.run_id == run_id, outcome == g.name, log.col(log.error).is_not(None))
            .limit(examples)
        )
        g.examples = [(r[0], r[1]) for r in fetch_all(conn, stmt)]
    return groups


def _item_key(log: ItemLog) -> sa.ColumnElement[Any]:
    return proxies.c.key if log.key is None else log.col(log.key)


def _item_join(log: ItemLog) -> Any:
    if log.key is None:
        return log.table.join(proxies, proxies.c.id == log.table.c.proxy_id)
    return log.table


def outcomes_per_hour(conn: sa.Connection, since: datetime) -> list[tuple[datetime, str, int]]:
    """(hour, outcome, items) over every item log since ``since`` (the fetch-log view)."""
    acc: dict[tuple[datetime, str], int] = defaultdict(int)
    for log in ITEM_LOGS.values():
        hour = _bucket("hour", log.col(log.time)).label("hour")
        for h, outcome, n in fetch_all(
            conn,
            sa.select(hour, log.col(log.outcome), sa.func.count())
            .where(log.col(log.time) >= since)
            .group_by(sa.text("hour"), log.col(log.outcome)),
        ):
            acc[(h, outcome)] += int(n)
    return sorted((h, o, n) for (h, o), n in acc.items())


# --- throughput ----------------------------------------------------------------------------


def throughput(
    conn: sa.Connection, since: datetime, unit: str = "minute", run_id: int | None = None
) -> list[tuple[datetime, int]]:
    """Items stored per ``unit`` since ``since`` (all runs, or one), oldest first."""
    acc: dict[datetime, int] = defaultdict(int)
    for log in ITEM_LOGS.values():
        b = _bucket(unit, log.col(log.time)).label("b")
        stmt = sa.select(b, sa.func.count()).where(log.col(log.time) >= since)
        if run_id is not None:
            stmt = stmt.where(log.table.c.run_id == run_id)
        for bucket, n in fetch_all(conn, stmt.group_by(sa.text("b"))):
            acc[bucket] += int(n)
    return sorted(acc.items())


def items_since(conn: sa.Connection, since: datetime, run_id: int | None = None) -> int:
    total = 0
    for log in ITEM_LOGS.values():
        stmt = sa.select(sa.func.count()).select_from(log.table).where(log.col(log.time) >= since)
        if run_id is not None:
            stmt = stmt.where(log.table.c.run_id == run_id)
        total += int(fetch_all(conn, stmt)[0][0])
    return total


# --- workers -------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerStat:
    id: str
    host: str
    pid: int
    kind: str
    status: str
    started_at: datetime
    heartbeat_age_s: float | None
    tasks_held: str | None
    items_done: int
    items_failed: int
    items_per_s: float  # over the last ``recent_s`` seconds, from the item logs
    lifetime_per_s: float  # items done / time between start and last heartbeat
    exit_reason: str | None

    @property
    def alive(self) -> bool:
        return self.status in ALIVE_WORKER_STATUSES


def worker_stats(
    conn: sa.Connection, within_s: float = 3600, recent_s: float = 30, limit: int = 200
) -> list[WorkerStat]:
    """Workers alive now or seen within ``within_s`` (newest first), with their rates."""
    now_col = sa.literal_column(NOW_SQL).label("db_now")
    since_hb = sa.literal_column(f"({NOW_SQL} - ({float(within_s)!r} * INTERVAL '1 second'))")
    rows = fetch_all(
        conn,
        sa.select(
            workers.c.id,
            workers.c.host,
            workers.c.pid,
            workers.c.kind,
            workers.c.status,
            workers.c.started_at,
            workers.c.heartbeat_at,
            workers.c.tasks_held,
            workers.c.items_done,
            workers.c.items_failed,
            workers.c.exit_reason,
            now_col,
        )
        .where(
            sa.or_(
                workers.c.status.in_(ALIVE_WORKER_STATUSES),
                workers.c.heartbeat_at >= since_hb,
            )
        )
        .order_by(workers.c.started_at.desc())
        .limit(limit),
    )
    recent = _recent_per_worker(conn, [r[0] for r in rows], utcnow() - timedelta(seconds=recent_s))
    out = []
    for r in rows:
        hb, now = r[6], r[11]
        life = (hb - r[5]).total_seconds() if hb else 0.0
        done = int(r[8] or 0)
        out.append(
            WorkerStat(
                id=r[0],
                host=r[1],
                pid=int(r[2]),
                kind=r[3],
                status=r[4],
                started_at=r[5],
                heartbeat_age_s=max((now - hb).total_seconds(), 0.0) if hb else None,
                tasks_held=r[7],
                items_done=done,
                items_failed=int(r[9] or 0),
                items_per_s=round(recent.get(r[0], 0) / recent_s, 2),
                lifetime_per_s=round(done / life, 2) if life > 0 else 0.0,
                exit_reason=r[10],
            )
        )
    return out


def _recent_per_worker(
    conn: sa.Connection, worker_ids: Sequence[str], since: datetime
) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    if not worker_ids:
        return out
    for log in ITEM_LOGS.values():
        w = log.col(log.worker)
        for worker_id, n in fetch_all(
            conn,
            sa.select(w, sa.func.count())
            .where(log.col(log.time) >= since, w.in_(list(worker_ids)))
            .group_by(w),
        ):
            out[worker_id] += int(n)
    return out


def workers_alive(conn: sa.Connection, heartbeat_within_s: float) -> int:
    """Workers that say they are alive and heartbeated recently (any machine)."""
    cutoff = sa.literal_column(
        f"({NOW_SQL} - ({float(heartbeat_within_s)!r} * INTERVAL '1 second'))"
    )
    return int(
        fetch_all(
            conn,
            sa.select(sa.func.count())
            .select_from(workers)
            .where(workers.c.status.in_(ALIVE_WORKER_STATUSES), workers.c.heartbeat_at >= cutoff),
        )[0][0]
    )


# --- the proxy pool ------------------------------------------------------------------------

POOL_FILTER_COLUMNS = ("status", "anonymity", "country", "protocol")
POOL_SORTS: dict[str, str] = {
    "latency": "latency_ms",
    "status": "status",
    "anonymity": "anonymity",
    "country": "country",
    "last checked": "last_checked",
    "id": "id",
}
POOL_TABLE_COLUMNS = (
    "id",
    "key",
    "protocol",
    "status",
    "anonymity",
    "country",
    "exit_ip",
    "latency_ms",
    "latency_ewma_ms",
    "success_count",
    "failure_count",
    "last_outcome",
    "last_checked",
    "source",
)


@dataclass(frozen=True, slots=True)
class PoolFilter:
    """Equality filters on the proxy pool; the same pairs drive the export."""

    status: str | None = None
    anonymity: str | None = None
    country: str | None = None
    protocol: str | None = None

    def pairs(self) -> dict[str, str]:
        return {c: v for c in POOL_FILTER_COLUMNS if (v := getattr(self, c))}

    def where(self) -> list[sa.ColumnElement[bool]]:
        return [proxies.c[c] == v for c, v in self.pairs().items()]


def pool_by_status(conn: sa.Connection) -> dict[str, int]:
    rows = fetch_all(conn, sa.select(proxies.c.status, sa.func.count()).group_by(proxies.c.status))
    return {r[0]: int(r[1]) for r in rows}


def pool_values(conn: sa.Connection, column: str, limit: int = 300) -> list[str]:
    """Distinct non-null values of a filter column, for the filter's choices."""
    if column not in POOL_FILTER_COLUMNS:
        raise ValueError(f"cannot filter the pool by {column!r}")
    col = proxies.c[column]
    rows = fetch_all(
        conn, sa.select(col).where(col.is_not(None)).group_by(col).order_by(col).limit(limit)
    )
    return [r[0] for r in rows]


def pool_count(conn: sa.Connection, flt: PoolFilter) -> int:
    stmt = sa.select(sa.func.count()).select_from(proxies).where(*flt.where())
    return int(fetch_all(conn, stmt)[0][0])


def pool_page(
    conn: sa.Connection,
    flt: PoolFilter,
    sort: str = "latency",
    descending: bool = False,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One page of the proxy table (never the encrypted password), sorted in SQL."""
    if sort not in POOL_SORTS:
        raise ValueError(f"cannot sort the pool by {sort!r}: one of {', '.join(POOL_SORTS)}")
    col = proxies.c[POOL_SORTS[sort]]
    order = (col.desc() if descending else col.asc()).nulls_last()
    stmt = (
        sa.select(*(proxies.c[c] for c in POOL_TABLE_COLUMNS))
        .where(*flt.where())
        .order_by(order, proxies.c.id)
        .offset(max(0, int(offset)))
        .limit(max(1, int(limit)))
    )
    return list(POOL_TABLE_COLUMNS), [tuple(r) for r in fetch_all(conn, stmt)]


def alive_by(conn: sa.Connection, column: str, limit: int = 20) -> list[tuple[str, int]]:
    """Active proxies per protocol or country, largest first."""
    if column not in ("protocol", "country", "anonymity"):
        raise ValueError(f"cannot group the pool by {column!r}")
    col = sa.func.coalesce(proxies.c[column], "unknown").label("v")
    rows = fetch_all(
        conn,
        sa.select(col, sa.func.count().label("n"))
        .where(proxies.c.status == "active")
        .group_by(sa.text("v"))
        .order_by(sa.text("n DESC"), sa.text("v"))
        .limit(limit),
    )
    return [(r[0], int(r[1])) for r in rows]


LATENCY_WIDTH_MS = 50
LATENCY_BUCKETS = 40  # the last one (1950 ms with the defaults) holds everything slower


def latency_histogram(
    conn: sa.Connection,
    flt: PoolFilter | None = None,
    width_ms: int = LATENCY_WIDTH_MS,
    buckets: int = LATENCY_BUCKETS,
) -> list[tuple[int, int]]:
    """(bucket start in ms, proxies) of last latencies; the last bucket holds the tail."""
    width, top = int(width_ms), int(buckets) - 1
    lat = proxies.c.latency_ms
    b = sa.literal_column(f"least(floor(latency_ms / {width}), {top}) * {width}").label("b")
    conds = [lat.is_not(None), proxies.c.status == "active", *(flt.where() if flt else [])]
    rows = fetch_all(
        conn,
        sa.select(b, sa.func.count())
        .select_from(proxies)
        .where(*conds)
        .group_by(sa.text("b"))
        .order_by(sa.text("b")),
    )
    return [(int(r[0]), int(r[1])) for r in rows]


# --- any table -----------------------------------------------------------------------------


def table_preview(
    conn: sa.Connection, table_name: str, run_id: int | None = None, limit: int = 50
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The first rows of a table (or of one run's rows), as the export would write them."""
    stmt = build_query(table_name, run_id).limit(limit)
    result = conn.execute(stmt)
    cols = list(result.keys())
    return cols, [tuple(r) for r in result.fetchall()]


def table_count(conn: sa.Connection, table_name: str, run_id: int | None = None) -> int:
    sub = build_query(table_name, run_id).order_by(None).subquery()
    return int(fetch_all(conn, sa.select(sa.func.count()).select_from(sub))[0][0])

"""The aggregates the console shows, computed in SQL: never whole tables into memory.

Each function takes a connection and returns small plain values (dataclasses, tuples, dicts)
sized by the answer, not by the tables: counts by status, rows per minute, one page of the
proxy table. Everything a user picks (a status, a country, a run) reaches SQL as a bound
parameter; the few names that are inlined (a ``date_trunc`` unit, a sort column, a bucket
width) come from whitelists in this module, never from input.

The *item logs* (``storage.item_logs.ItemLog``) are the per-item result tables of the job
kinds (one row per run and item); throughput, per-worker rates and outcome breakdowns read
them: ``proxy_checks`` (validate), ``backfill_items`` (backfill), ``urls`` (scrape: one row
per page, counted once fetched) and those of plugin kinds. The functions that read them
take the logs as an argument (``engine.jobs.item_logs()``, built from the kinds' registry):
a kind with its own result table is counted by every chart without an edit here. The scrape job's ``fetch_logs`` (every attempt of every fetch) is read by its own
functions below: the fetch activity on Home, the per-run fetch statistics.

Both databases: the SQL below runs unchanged on DuckDB and PostgreSQL (``date_trunc``,
``FILTER (WHERE …)``, ``GROUP BY`` an output alias).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import NOW_SQL, utcnow
from storage.export import attribute_names, build_query, entities_query, entity_filter
from storage.item_logs import ItemLog, ItemLogs
from storage.proxy_history import QUALITY_COLUMNS
from storage.schema import (
    entities,
    errors,
    fetch_logs,
    files,
    proxies,
    proxy_quality,
    runs,
    tasks,
    urls,
    workers,
)

ALIVE_WORKER_STATUSES = ("starting", "idle", "busy", "stopping")
TIME_UNITS = ("second", "minute", "hour")


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


def done_counts(
    conn: sa.Connection, logs: ItemLogs, run_ids: Sequence[int]
) -> dict[int, tuple[int, int]]:
    """run id → (items stored, items ok), over every item log."""
    out: dict[int, tuple[int, int]] = {}
    if not run_ids:
        return out
    for log in logs.values():
        run_col = log.table.c.run_id
        rows = fetch_all(
            conn,
            sa.select(run_col, sa.func.count(), sa.func.count().filter(log.ok))
            .where(run_col.in_(list(run_ids)), *log.stored())
            .group_by(run_col),
        )
        for run_id, done, ok in rows:
            prev = out.get(int(run_id), (0, 0))
            out[int(run_id)] = (prev[0] + int(done), prev[1] + int(ok))
    return out


def run_stats(
    conn: sa.Connection,
    logs: ItemLogs,
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
    counts = done_counts(conn, logs, [r[0] for r in rows])
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


def outcome_groups(
    conn: sa.Connection, log: ItemLog | None, run_id: int, examples: int = 3
) -> list[Group]:
    """The run's item outcomes (alive, timeout, refused…) in its kind's item log (None: the
    kind has none), with example error messages."""
    if log is None:
        return []
    t, outcome = log.table, log.col(log.outcome)
    groups = [
        Group(r[0], int(r[1]))
        for r in fetch_all(
            conn,
            sa.select(outcome, sa.func.count())
            .where(t.c.run_id == run_id, *log.stored())
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


def outcomes_per_hour(
    conn: sa.Connection, logs: ItemLogs, since: datetime
) -> list[tuple[datetime, str, int]]:
    """(hour, outcome, items) over every item log since ``since`` (the fetch-log view)."""
    acc: dict[tuple[datetime, str], int] = defaultdict(int)
    for log in logs.values():
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
    conn: sa.Connection,
    logs: ItemLogs,
    since: datetime,
    unit: str = "minute",
    run_id: int | None = None,
) -> list[tuple[datetime, int]]:
    """Items stored per ``unit`` since ``since`` (all runs, or one), oldest first."""
    acc: dict[datetime, int] = defaultdict(int)
    for log in logs.values():
        b = _bucket(unit, log.col(log.time)).label("b")
        stmt = sa.select(b, sa.func.count()).where(log.col(log.time) >= since)
        if run_id is not None:
            stmt = stmt.where(log.table.c.run_id == run_id)
        for bucket, n in fetch_all(conn, stmt.group_by(sa.text("b"))):
            acc[bucket] += int(n)
    return sorted(acc.items())


def items_since(
    conn: sa.Connection, logs: ItemLogs, since: datetime, run_id: int | None = None
) -> int:
    total = 0
    for log in logs.values():
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
    countries: str | None = None  # what it claims ("IN,MY"); None: any country

    @property
    def alive(self) -> bool:
        return self.status in ALIVE_WORKER_STATUSES


def worker_stats(
    conn: sa.Connection,
    logs: ItemLogs,
    within_s: float = 3600,
    recent_s: float = 30,
    limit: int = 200,
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
            workers.c.countries,
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
    since = utcnow() - timedelta(seconds=recent_s)
    recent = _recent_per_worker(conn, logs, [r[0] for r in rows], since)
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
                countries=r[12],
            )
        )
    return out


def _recent_per_worker(
    conn: sa.Connection, logs: ItemLogs, worker_ids: Sequence[str], since: datetime
) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    if not worker_ids:
        return out
    for log in logs.values():
        if log.worker is None:
            continue
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
    # over the last N checks and uses (storage.proxy_history)
    "reliability": "reliability",
    "check success": "check_ratio",
    "use success": "use_ratio",
    "median latency (last N)": "check_ms_median",
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
    "last_error",  # a tampering proxy's: what it modified in the canary
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
    name = POOL_SORTS[sort]
    q = proxy_quality.c
    col = q[name] if name in QUALITY_COLUMNS else proxies.c[name]
    order = (col.desc() if descending else col.asc()).nulls_last()
    stmt = (
        sa.select(*(proxies.c[c] for c in POOL_TABLE_COLUMNS), *(q[c] for c in QUALITY_COLUMNS))
        .select_from(proxies.outerjoin(proxy_quality, q.proxy_id == proxies.c.id))
        .where(*flt.where())
        .order_by(order, proxies.c.id)
        .offset(max(0, int(offset)))
        .limit(max(1, int(limit)))
    )
    cols = [*POOL_TABLE_COLUMNS, *QUALITY_COLUMNS]
    return cols, [tuple(r) for r in fetch_all(conn, stmt)]


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
    conn: sa.Connection,
    table_name: str,
    run_id: int | None = None,
    limit: int = 50,
    tables: Mapping[str, sa.Table] | None = None,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The first rows of a table (or of one run's rows), as the export would write them
    (``tables``: ``storage.export.exportable_tables``, default the core schema's)."""
    stmt = build_query(table_name, run_id, tables=tables).limit(limit)
    result = conn.execute(stmt)
    cols = list(result.keys())
    return cols, [tuple(r) for r in result.fetchall()]


def table_count(
    conn: sa.Connection,
    table_name: str,
    run_id: int | None = None,
    tables: Mapping[str, sa.Table] | None = None,
) -> int:
    sub = build_query(table_name, run_id, tables=tables).order_by(None).subquery()
    return int(fetch_all(conn, sa.select(sa.func.count()).select_from(sub))[0][0])


# --- the scrape job --------------------------------------------------------------------------


@dataclass(slots=True)
class ScrapeProgress:
    """One scrape run at a glance: its pages by status, rates, entities and files."""

    registered: int  # URLs registered for the run (start URLs and links it follows)
    by_status: dict[str, int]  # queued, done, failed, blocked, disallowed
    pages_recent: int  # pages fetched in the last ``recent_s`` seconds
    recent_s: float
    bytes: int
    entities_seen: int  # entities this run saw last
    entities_new: int  # of those, first seen in this run
    files: int  # files stored

    @property
    def fetched(self) -> int:
        return sum(n for s, n in self.by_status.items() if s != "queued")

    @property
    def done(self) -> int:
        return self.by_status.get("done", 0)

    @property
    def pages_per_s(self) -> float:
        return round(self.pages_recent / self.recent_s, 2) if self.recent_s else 0.0

    @property
    def success_ratio(self) -> float | None:
        """Pages done over pages requested: a page robots.txt forbids was not (None before
        the first page)."""
        tried = self.fetched - self.by_status.get("disallowed", 0)
        return self.done / tried if tried else None


def scrape_progress(conn: sa.Connection, run_id: int, recent_s: float = 10) -> ScrapeProgress:
    since = utcnow() - timedelta(seconds=recent_s)
    by_status = {
        r[0]: int(r[1])
        for r in fetch_all(
            conn,
            sa.select(urls.c.status, sa.func.count())
            .where(urls.c.run_id == run_id)
            .group_by(urls.c.status),
        )
    }
    recent, nbytes = fetch_all(
        conn,
        sa.select(
            sa.func.count().filter(urls.c.fetched_at >= since),
            sa.func.coalesce(sa.func.sum(urls.c.bytes), 0),
        ).where(urls.c.run_id == run_id),
    )[0]
    seen, new = fetch_all(
        conn,
        sa.select(sa.func.count(), sa.func.count().filter(entities.c.first_run_id == run_id)).where(
            entities.c.last_run_id == run_id
        ),
    )[0]
    stored = fetch_all(
        conn,
        sa.select(sa.func.count())
        .select_from(files)
        .where(files.c.run_id == run_id, files.c.status == "stored"),
    )[0][0]
    return ScrapeProgress(
        registered=sum(by_status.values()),
        by_status=by_status,
        pages_recent=int(recent or 0),
        recent_s=float(recent_s),
        bytes=int(nbytes or 0),
        entities_seen=int(seen or 0),
        entities_new=int(new or 0),
        files=int(stored or 0),
    )


def method_mix(conn: sa.Connection, run_id: int) -> list[tuple[str, str, int]]:
    """(country, method, pages): which fetch method produced the run's good pages, per
    country (the method that won the cascade for each page)."""
    method = sa.func.coalesce(urls.c.method, "?").label("m")
    rows = fetch_all(
        conn,
        sa.select(urls.c.country, method, sa.func.count())
        .where(urls.c.run_id == run_id, urls.c.status == "done")
        .group_by(urls.c.country, sa.text("m"))
        .order_by(urls.c.country, sa.text("m")),
    )
    return [(r[0], r[1], int(r[2])) for r in rows]


def blocked_reasons(
    conn: sa.Connection, run_id: int, limit: int = 10
) -> list[tuple[str, str, int]]:
    """(reason, method, attempts) of the run's blocked attempts, for its ``limit`` most
    frequent reasons (a challenge page, a captcha, an access-denied page…)."""
    fl = fetch_logs
    cond = [fl.c.run_id == run_id, fl.c.blocked_reason.is_not(None)]
    top = [
        r[0]
        for r in fetch_all(
            conn,
            sa.select(fl.c.blocked_reason)
            .where(*cond)
            .group_by(fl.c.blocked_reason)
            .order_by(sa.func.count().desc(), fl.c.blocked_reason)
            .limit(limit),
        )
    ]
    if not top:
        return []
    rows = fetch_all(
        conn,
        sa.select(fl.c.blocked_reason, fl.c.method, sa.func.count())
        .where(*cond, fl.c.blocked_reason.in_(top))
        .group_by(fl.c.blocked_reason, fl.c.method),
    )
    rank = {r: i for i, r in enumerate(top)}
    return sorted(((r[0], r[1], int(r[2])) for r in rows), key=lambda r: (rank[r[0]], r[1]))


@dataclass(slots=True)
class MethodStat:
    method: str
    attempts: int
    ok: int
    blocked: int
    median_ms: float | None
    p90_ms: float | None
    bytes: int


@dataclass(slots=True)
class FetchLogStats:
    """A run's fetch log: every attempt of every fetch, by method and outcome."""

    by_outcome: list[tuple[str, str, int]]  # (method, outcome: ok or the error type, attempts)
    by_method: list[MethodStat]

    @property
    def attempts(self) -> int:
        return sum(m.attempts for m in self.by_method)


def _outcome(fl: sa.Table) -> sa.ColumnElement[Any]:
    return sa.func.coalesce(fl.c.error_type, "ok")


def fetch_log_stats(conn: sa.Connection, run_id: int) -> FetchLogStats:
    """Attempts by method and outcome, and per method: attempts, ok, blocked, the median and
    90th percentile of the time an attempt took (``percentile_cont``, both databases)."""
    fl = fetch_logs
    outcome = _outcome(fl).label("o")
    by_outcome = [
        (r[0], r[1], int(r[2]))
        for r in fetch_all(
            conn,
            sa.select(fl.c.method, outcome, sa.func.count())
            .where(fl.c.run_id == run_id)
            .group_by(fl.c.method, sa.text("o"))
            .order_by(fl.c.method, sa.func.count().desc()),
        )
    ]
    rows = fetch_all(
        conn,
        sa.select(
            fl.c.method,
            sa.func.count(),
            sa.func.count().filter(fl.c.error_type.is_(None)),
            sa.func.count().filter(fl.c.error_type == "blocked"),
            sa.func.percentile_cont(0.5).within_group(fl.c.ms),
            sa.func.percentile_cont(0.9).within_group(fl.c.ms),
            sa.func.coalesce(sa.func.sum(fl.c.bytes), 0),
        )
        .where(fl.c.run_id == run_id)
        .group_by(fl.c.method)
        .order_by(sa.func.count().desc(), fl.c.method),
    )
    by_method = [
        MethodStat(
            method=r[0],
            attempts=int(r[1]),
            ok=int(r[2]),
            blocked=int(r[3]),
            median_ms=None if r[4] is None else round(float(r[4]), 1),
            p90_ms=None if r[5] is None else round(float(r[5]), 1),
            bytes=int(r[6]),
        )
        for r in rows
    ]
    return FetchLogStats(by_outcome=by_outcome, by_method=by_method)


@dataclass(slots=True)
class FetchActivity:
    """Fetch attempts (all scrape runs) since a time: the Home page's fetch figures."""

    attempts: int
    ok: int
    blocked: int
    per_minute: list[tuple[datetime, int]]  # (minute, attempts), oldest first, no gaps filled


def fetch_activity(conn: sa.Connection, since: datetime) -> FetchActivity:
    """Time-bounded (``created_at >= since``; indexed on PostgreSQL): cheap at any size."""
    fl = fetch_logs
    minute = _bucket("minute", fl.c.created_at).label("b")
    rows = fetch_all(
        conn,
        sa.select(
            minute,
            sa.func.count(),
            sa.func.count().filter(fl.c.error_type.is_(None)),
            sa.func.count().filter(fl.c.error_type == "blocked"),
        )
        .where(fl.c.created_at >= since)
        .group_by(sa.text("b"))
        .order_by(sa.text("b")),
    )
    return FetchActivity(
        attempts=sum(int(r[1]) for r in rows),
        ok=sum(int(r[2]) for r in rows),
        blocked=sum(int(r[3]) for r in rows),
        per_minute=[(r[0], int(r[1])) for r in rows],
    )


def entity_countries(conn: sa.Connection, run_id: int | None = None) -> list[str]:
    """The countries of a run's entities (or of all), for the table's filter."""
    stmt = sa.select(entities.c.country).group_by(entities.c.country).order_by(entities.c.country)
    if run_id is not None:
        stmt = stmt.where(entities.c.last_run_id == run_id)
    return [r[0] for r in fetch_all(conn, stmt.limit(300))]


def entity_count(conn: sa.Connection, run_id: int | None = None, country: str | None = None) -> int:
    stmt = sa.select(sa.func.count()).select_from(entities).where(*entity_filter(run_id, country))
    return int(fetch_all(conn, stmt)[0][0])


def entity_page(
    conn: sa.Connection,
    run_id: int | None = None,
    country: str | None = None,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One page of entities with their attributes as columns (``storage.export``'s wide view:
    the page of entities is cut before the attributes are joined)."""
    conds = entity_filter(run_id, country)
    names = attribute_names(conn, conds)
    stmt = entities_query(names, conds, offset=max(0, int(offset)), limit=max(1, int(limit)))
    result = conn.execute(stmt)
    cols = list(result.keys())
    return cols, [tuple(r) for r in result.fetchall()]

"""What a monitoring stack scrapes, in SQL: the fleet's current state, and its recent rates
over short windows.

Each query reads a small table (runs, workers, rate_limits), an indexed status (tasks of
unfinished runs, proxies), or a recent window of a log through its time index (item logs,
errors, fetch_logs: migration step 10 adds the ones PostgreSQL lacked), so a scrape every
15 s stays cheap however long the logs grow.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.item_logs import ItemLogs
from storage.schema import errors, fetch_logs, proxies, runs, tasks, workers

ALIVE = ("starting", "idle", "busy", "stopping")
UNFINISHED = ("queued", "running", "paused", "stopping")


def runs_by_kind_status(conn: sa.Connection) -> dict[tuple[str, str], int]:
    q = sa.select(runs.c.kind, runs.c.status, sa.func.count()).group_by(runs.c.kind, runs.c.status)
    return {(r[0], r[1]): int(r[2]) for r in fetch_all(conn, q)}


def items_in_window(conn: sa.Connection, logs: ItemLogs, since: datetime) -> dict[str, int]:
    """Items each kind stored since ``since`` (through its log's time column)."""
    out = {}
    for kind, log in logs.items():
        q = sa.select(sa.func.count()).select_from(log.table).where(log.col(log.time) >= since)
        q = q.where(*log.stored())
        out[kind] = int(fetch_all(conn, q)[0][0])
    return out


def errors_by_type(conn: sa.Connection, since: datetime) -> dict[str, int]:
    q = (
        sa.select(errors.c.error_type, sa.func.count())
        .where(errors.c.created_at >= since)
        .group_by(errors.c.error_type)
    )
    return {r[0]: int(r[1]) for r in fetch_all(conn, q)}


def blocked_by_reason(conn: sa.Connection, since: datetime) -> dict[tuple[str, str], int]:
    """(reason, method) → fetch attempts that met a block page since ``since``."""
    fl = fetch_logs
    q = (
        sa.select(fl.c.blocked_reason, fl.c.method, sa.func.count())
        .where(fl.c.created_at >= since, fl.c.blocked_reason.is_not(None))
        .group_by(fl.c.blocked_reason, fl.c.method)
    )
    return {(r[0], r[1]): int(r[2]) for r in fetch_all(conn, q)}


def workers_by_host_status(conn: sa.Connection) -> dict[tuple[str, str], int]:
    """Workers that are alive, by host and status (the dead stay in the table as history)."""
    q = (
        sa.select(workers.c.host, workers.c.status, sa.func.count())
        .where(workers.c.status.in_(ALIVE))
        .group_by(workers.c.host, workers.c.status)
    )
    return {(r[0] or "", r[1]): int(r[2]) for r in fetch_all(conn, q)}


def heartbeat_ages(conn: sa.Connection, now: datetime) -> list[tuple[str, str, float]]:
    """(host, worker, seconds since its heartbeat) of the live workers."""
    q = sa.select(workers.c.host, workers.c.id, workers.c.heartbeat_at).where(
        workers.c.status.in_(ALIVE)
    )
    return [
        (r[0] or "", r[1], max((now - r[2]).total_seconds(), 0.0) if r[2] else float("nan"))
        for r in fetch_all(conn, q)
    ]


def queue_depth(conn: sa.Connection) -> dict[tuple[str, str], int]:
    """(kind, task status) → tasks of the runs that are not over."""
    q = (
        sa.select(runs.c.kind, tasks.c.status, sa.func.count())
        .select_from(tasks.join(runs, runs.c.id == tasks.c.run_id))
        .where(runs.c.status.in_(UNFINISHED))
        .group_by(runs.c.kind, tasks.c.status)
    )
    return {(r[0], r[1]): int(r[2]) for r in fetch_all(conn, q)}


def proxies_by_status(conn: sa.Connection) -> dict[str, int]:
    q = sa.select(proxies.c.status, sa.func.count()).group_by(proxies.c.status)
    return {r[0]: int(r[1]) for r in fetch_all(conn, q)}


def limiter_requests(
    conn: sa.Connection, now: datetime, window_s: float
) -> list[tuple[str, dict[str, object], int]]:
    """For each running backfill run: (its rate key, its params' rate, requests it sent in
    the last ``window_s``) — the limiter's use is requests over what the rate allows."""
    import json

    from storage.schema import backfill_items

    since = now - timedelta(seconds=window_s)
    running = fetch_all(
        conn,
        sa.select(runs.c.id, runs.c.params).where(
            runs.c.kind == "backfill", runs.c.status == "running"
        ),
    )
    out = []
    for run_id, params in running:
        p = json.loads(params)
        sent = fetch_all(
            conn,
            sa.select(sa.func.coalesce(sa.func.sum(backfill_items.c.attempts), 0)).where(
                backfill_items.c.run_id == run_id, backfill_items.c.fetched_at >= since
            ),
        )[0][0]
        out.append((str(p.get("rate_key") or ""), p.get("rate") or {}, int(sent)))
    return out


def merge_keys(rows: list[tuple[str, dict[str, object], int]]) -> dict[str, tuple[dict, int]]:
    """Runs that share a rate key share its limit: their requests add up."""
    acc: dict[str, tuple[dict, int]] = {}
    sums: dict[str, int] = defaultdict(int)
    for key, rate, sent in rows:
        sums[key] += sent
        acc[key] = (rate, sums[key])
    return acc

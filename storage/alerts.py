"""Alerts: webhooks told about runs, schedules, workers and the proxy pool, each event once.

Three tables:

- ``alerts``: the webhooks. The URL is either literal (``url``, checked to hold no
  credentials) or the *name* of an environment variable holding it (``url_env``): a
  webhook URL with a token in it never reaches the database.
- ``alert_events``: the outbox. One row per (event, subject) — a run's id, a worker's id, a
  schedule's due time — under a unique key: an event recorded twice (two coordinators, or
  a sweep after a crash) fails on the key and stays one row. ``uid`` is the stable ``id``
  of the body a receiver may dedupe on.
- ``alert_deliveries``: one row per (event, alert), written in the event's transaction,
  with its status (``pending`` → ``delivered`` | ``failed``), attempts, the next try, the
  lease a deliverer holds while it sends, and the last error.

A ``Component`` of its own, like the schedules: an engine feature every deployment has.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from storage.bulk import fetch_all
from storage.migrations import Component

metadata = sa.MetaData()
_event_seq = sa.Sequence("alert_events_id_seq", metadata=metadata)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("url", sa.Text),  # a literal URL without credentials, or NULL with url_env
    sa.Column("url_env", sa.String),  # the name of the variable holding the URL
    sa.Column("events", sa.Text, nullable=False),  # comma-separated event names
    sa.Column("pool_below", sa.Integer),  # pool_low: fewer active proxies than this
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("pool_low_open", sa.Boolean, nullable=False),  # a pool_low episode is on
    sa.Column("pool_low_episode", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

alert_events = sa.Table(
    "alert_events",
    metadata,
    sa.Column(
        "id", sa.BigInteger, _event_seq, server_default=_event_seq.next_value(), primary_key=True
    ),
    sa.Column("uid", sa.String, nullable=False, unique=True),  # the body's stable id
    sa.Column("event", sa.String, nullable=False),
    sa.Column("subject", sa.String, nullable=False),  # run id, worker id, schedule@due…
    sa.Column("event_at", sa.DateTime, nullable=False),  # naive UTC
    sa.Column("text", sa.Text, nullable=False),  # the one-line summary
    sa.Column("payload", sa.Text, nullable=False),  # JSON: the body's generic fields
    sa.UniqueConstraint("event", "subject", name="alert_events_key"),
)

alert_deliveries = sa.Table(
    "alert_deliveries",
    metadata,
    sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("alert", sa.String, primary_key=True),
    sa.Column("status", sa.String, nullable=False),  # pending, delivered, failed
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_try_at", sa.DateTime, nullable=False),
    sa.Column("lease_until", sa.DateTime),  # a deliverer is sending it until then
    sa.Column("lease_token", sa.String),
    sa.Column("last_status", sa.Integer),  # the receiver's HTTP status
    sa.Column("last_error", sa.Text),  # never holds the URL
    sa.Column("delivered_at", sa.DateTime),
)


def _v1(conn: sa.Connection) -> None:
    alerts.create(conn, checkfirst=True)
    alert_events.create(conn, checkfirst=True)
    alert_deliveries.create(conn, checkfirst=True)


COMPONENT = Component(
    "alerts",
    [(1, "alerts, alert_events, alert_deliveries: webhooks, each event once", _v1)],
    [alerts, alert_events, alert_deliveries],
)


@dataclass(frozen=True)
class AlertRow:
    name: str
    url: str | None
    url_env: str | None
    events: tuple[str, ...]
    pool_below: int | None = None
    enabled: bool = True
    pool_low_open: bool = False
    pool_low_episode: int = 0
    created_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Claimed:
    """A delivery a deliverer holds under ``token`` while it sends."""

    event_id: int
    alert: str
    token: str
    attempts: int
    uid: str
    event: str
    at: datetime
    text: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class RecentRow:
    event_id: int
    uid: str
    event: str
    subject: str
    event_at: datetime
    text: str
    alert: str | None
    status: str | None
    attempts: int | None
    last_status: int | None
    last_error: str | None
    next_try_at: datetime | None
    delivered_at: datetime | None


_ALERT_COLUMNS = [
    alerts.c.name,
    alerts.c.url,
    alerts.c.url_env,
    alerts.c.events,
    alerts.c.pool_below,
    alerts.c.enabled,
    alerts.c.pool_low_open,
    alerts.c.pool_low_episode,
    alerts.c.created_at,
]


def _alert(r: Any) -> AlertRow:
    events = tuple(e for e in str(r[3]).split(",") if e)
    return AlertRow(r[0], r[1], r[2], events, r[4], bool(r[5]), bool(r[6]), int(r[7]), r[8])


# --- alerts ------------------------------------------------------------------------------


def add(conn: sa.Connection, row: AlertRow, now: datetime) -> bool:
    """Insert; False when the name is taken."""
    if get(conn, row.name) is not None:
        return False
    conn.execute(
        sa.insert(alerts).values(
            name=row.name,
            url=row.url,
            url_env=row.url_env,
            events=",".join(row.events),
            pool_below=row.pool_below,
            enabled=row.enabled,
            pool_low_open=False,
            pool_low_episode=0,
            created_at=now,
        )
    )
    return True


def get(conn: sa.Connection, name: str, lock: bool = False) -> AlertRow | None:
    q = sa.select(*_ALERT_COLUMNS).where(alerts.c.name == name)
    if lock and conn.dialect.name == "postgresql":
        q = q.with_for_update()
    rows = fetch_all(conn, q)
    return _alert(rows[0]) if rows else None


def list_all(conn: sa.Connection) -> list[AlertRow]:
    return [_alert(r) for r in fetch_all(conn, sa.select(*_ALERT_COLUMNS).order_by(alerts.c.name))]


def remove(conn: sa.Connection, name: str) -> bool:
    """The alert and its pending deliveries; the events and finished deliveries stay."""
    conn.execute(
        sa.delete(alert_deliveries).where(
            alert_deliveries.c.alert == name, alert_deliveries.c.status == "pending"
        )
    )
    return bool(conn.execute(sa.delete(alerts).where(alerts.c.name == name)).rowcount)


def set_pool_low(conn: sa.Connection, name: str, open_: bool, episode: int) -> None:
    conn.execute(
        sa.update(alerts)
        .where(alerts.c.name == name)
        .values(pool_low_open=open_, pool_low_episode=episode)
    )


# --- the outbox --------------------------------------------------------------------------


def event_exists(conn: sa.Connection, event: str, subject: str) -> bool:
    q = sa.select(alert_events.c.id).where(
        alert_events.c.event == event, alert_events.c.subject == subject
    )
    return bool(fetch_all(conn, q))


def record_event(
    conn: sa.Connection,
    event: str,
    subject: str,
    text: str,
    payload: dict[str, Any],
    alert_names: list[str],
    now: datetime,
) -> int | None:
    """The event and one pending delivery per alert, in the caller's transaction; None
    when the event is recorded already (here, or by another process: the unique key).

    On PostgreSQL the insert runs in a savepoint, so a concurrent duplicate rolls back
    only itself; DuckDB has one writing process, which the check before it covers."""
    if event_exists(conn, event, subject):
        return None
    values = {
        "uid": uuid.uuid4().hex,
        "event": event,
        "subject": subject,
        "event_at": now,
        "text": text,
        "payload": json.dumps(payload, default=str, sort_keys=True),
    }
    try:
        if conn.dialect.name == "postgresql":
            with conn.begin_nested():
                conn.execute(sa.insert(alert_events).values(**values))
        else:
            conn.execute(sa.insert(alert_events).values(**values))
    except IntegrityError:
        return None
    q = sa.select(alert_events.c.id).where(alert_events.c.uid == values["uid"])
    event_id = int(fetch_all(conn, q)[0][0])
    for name in alert_names:
        conn.execute(
            sa.insert(alert_deliveries).values(
                event_id=event_id,
                alert=name,
                status="pending",
                attempts=0,
                next_try_at=now,
            )
        )
    return event_id


def claim(
    conn: sa.Connection,
    now: datetime,
    lease_s: float,
    limit: int = 20,
    event_id: int | None = None,
) -> list[Claimed]:
    """Take up to ``limit`` due pending deliveries under a fresh lease. PostgreSQL skips
    the rows another deliverer is claiming (``SKIP LOCKED``); a lease that ran out (its
    deliverer died mid-send) is taken over."""
    d, e = alert_deliveries, alert_events
    q = (
        sa.select(d.c.event_id, d.c.alert, d.c.attempts)
        .where(
            d.c.status == "pending",
            d.c.next_try_at <= now,
            sa.or_(d.c.lease_until.is_(None), d.c.lease_until < now),
        )
        .order_by(d.c.next_try_at, d.c.event_id)
        .limit(limit)
    )
    if event_id is not None:
        q = q.where(d.c.event_id == event_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rows = fetch_all(conn, q)
    out = []
    for event_id_, alert, attempts in rows:
        token = uuid.uuid4().hex
        conn.execute(
            sa.update(d)
            .where(d.c.event_id == event_id_, d.c.alert == alert)
            .values(lease_until=now + timedelta(seconds=lease_s), lease_token=token)
        )
        ev = fetch_all(
            conn,
            sa.select(e.c.uid, e.c.event, e.c.event_at, e.c.text, e.c.payload).where(
                e.c.id == event_id_
            ),
        )[0]
        out.append(
            Claimed(
                int(event_id_),
                alert,
                token,
                int(attempts),
                ev[0],
                ev[1],
                ev[2],
                ev[3],
                json.loads(ev[4]),
            )
        )
    return out


def settle_delivery(
    conn: sa.Connection,
    c: Claimed,
    status: str,
    now: datetime,
    http_status: int | None,
    error: str | None,
    next_try_at: datetime | None = None,
) -> bool:
    """Record a send's outcome, only while ``c``'s lease is still ours (fencing); False
    when another deliverer took it over meanwhile."""
    d = alert_deliveries
    values: dict[str, Any] = {
        "status": status,
        "attempts": c.attempts + 1,
        "lease_until": None,
        "lease_token": None,
        "last_status": http_status,
        "last_error": None if error is None else error[:2000],
    }
    if status == "delivered":
        values["delivered_at"] = now
    if next_try_at is not None:
        values["next_try_at"] = next_try_at
    res = conn.execute(
        sa.update(d)
        .where(d.c.event_id == c.event_id, d.c.alert == c.alert, d.c.lease_token == c.token)
        .values(**values)
    )
    return bool(res.rowcount)


def _recent_select() -> sa.Select:
    e, d = alert_events, alert_deliveries
    return sa.select(
        e.c.id,
        e.c.uid,
        e.c.event,
        e.c.subject,
        e.c.event_at,
        e.c.text,
        d.c.alert,
        d.c.status,
        d.c.attempts,
        d.c.last_status,
        d.c.last_error,
        d.c.next_try_at,
        d.c.delivered_at,
    ).select_from(e.outerjoin(d, d.c.event_id == e.c.id))


def recent(conn: sa.Connection, limit: int = 50) -> list[RecentRow]:
    """The latest events, newest first, each with its deliveries (one row per delivery)."""
    e, d = alert_events, alert_deliveries
    latest = sa.select(e.c.id).order_by(e.c.id.desc()).limit(limit).subquery()
    q = (
        _recent_select()
        .where(e.c.id.in_(sa.select(latest.c.id)))
        .order_by(e.c.id.desc(), d.c.alert)
    )
    return [RecentRow(*r) for r in fetch_all(conn, q)]


def delivery_of(conn: sa.Connection, event_id: int, alert: str) -> RecentRow | None:
    """One event's delivery to one alert."""
    q = _recent_select().where(alert_events.c.id == event_id, alert_deliveries.c.alert == alert)
    rows = fetch_all(conn, q)
    return RecentRow(*rows[0]) if rows else None


# --- what the sweeps look at -------------------------------------------------------------


def ended_runs(conn: sa.Connection, since: datetime) -> list[tuple[int, str]]:
    """Runs that reached a final status since ``since``: (id, status)."""
    from storage.schema import runs

    q = (
        sa.select(runs.c.id, runs.c.status)
        .where(
            runs.c.status.in_(("completed", "failed", "stopped", "cancelled")),
            runs.c.finished_at >= since,
        )
        .order_by(runs.c.id)
    )
    return [(int(r[0]), str(r[1])) for r in fetch_all(conn, q)]


def lost_workers(conn: sa.Connection, since: datetime) -> list[tuple[str, str, int, str | None]]:
    """Workers the watchdog marked dead since ``since``: (id, host, pid, reason)."""
    from storage.schema import workers

    q = (
        sa.select(workers.c.id, workers.c.host, workers.c.pid, workers.c.exit_reason)
        .where(workers.c.status == "dead", workers.c.heartbeat_at >= since)
        .order_by(workers.c.heartbeat_at)
    )
    return [(str(r[0]), str(r[1]), int(r[2]), r[3]) for r in fetch_all(conn, q)]


def missed_fires(conn: sa.Connection, since: datetime) -> list[tuple[str, datetime, str, Any]]:
    """Schedule fires recorded ``missed`` or ``error`` since ``since``."""
    from storage.schedules import schedule_fires as f

    q = (
        sa.select(f.c.schedule, f.c.due_at, f.c.outcome, f.c.note)
        .where(f.c.outcome.in_(("missed", "error")), f.c.fired_at >= since)
        .order_by(f.c.fired_at)
    )
    return [(str(r[0]), r[1], str(r[2]), r[3]) for r in fetch_all(conn, q)]


def active_proxies(conn: sa.Connection) -> int:
    from storage.schema import proxies

    q = sa.select(sa.func.count()).select_from(proxies).where(proxies.c.status == "active")
    return int(fetch_all(conn, q)[0][0])

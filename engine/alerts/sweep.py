"""The sweep: events read off the database instead of emitted by the code that caused them.

Each deliverer round records, for the enabled alerts:
- run ends the run-end hook did not record (a process that died between its commit and its
  hook): terminal runs finished within the lookback;
- ``worker_lost``: workers the watchdog (or a coordinator taking over a killed one's
  workers) marked ``dead``;
- ``schedule_missed``: schedule fires recorded ``missed`` or ``error``;
- ``pool_low``: per alert with a threshold, once per episode — the count going below the
  threshold opens one (one event), coming back to it closes it.

Only what happened since the earliest alert was added and within ``alerts_retry_window_s``
counts: adding an alert does not replay history. The outbox's key makes the sweep and the
hooks, and several deliverers, record each event once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from engine.alerts.events import RUN_EVENT, Event, summary_text
from engine.alerts.record import emit, emit_run_end
from engine.settings import Settings
from storage import alerts as store
from storage.bulk import fetch_all
from storage.db import Database

log = logging.getLogger(__name__)


def sweep(db: Database, settings: Settings, now: datetime) -> None:
    with db.connect() as conn:
        alerts = [a for a in store.list_all(conn) if a.enabled]
    if not alerts:
        return
    since = max(
        now - timedelta(seconds=settings.alerts_retry_window_s),
        min(a.created_at or now for a in alerts),
    )
    wanted = {e for a in alerts for e in a.events}
    with db.connect() as conn:
        ended = store.ended_runs(conn, since) if wanted & set(Event) else []
        lost = store.lost_workers(conn, since) if Event.WORKER_LOST in wanted else []
        missed = store.missed_fires(conn, since) if Event.SCHEDULE_MISSED in wanted else []
        known = set(_known(conn, since))
    for run_id, status in ended:
        event = RUN_EVENT.get(status)
        if event not in wanted or (event, str(run_id)) in known:
            continue  # no alert wants it, or recorded already: no query per round
        emit_run_end(db, run_id, status, now, settings)
    for worker_id, host, pid, reason in lost:
        if (Event.WORKER_LOST, worker_id) not in known:
            payload = {"worker_id": worker_id, "host": host, "pid": pid, "reason": reason}
            emit(db, Event.WORKER_LOST, payload, worker_id, now=now)
    for schedule, due_at, outcome, note in missed:
        subject = f"{schedule}@{due_at.isoformat(timespec='seconds')}"
        if (Event.SCHEDULE_MISSED, subject) not in known:
            payload = {
                "schedule": schedule,
                "due_at": due_at.isoformat(timespec="seconds"),
                "outcome": outcome,
                "note": note,
            }
            emit(db, Event.SCHEDULE_MISSED, payload, subject, now=now)
    for a in alerts:
        if a.pool_below is not None and Event.POOL_LOW in a.events:
            pool_low(db, a.name, now)


def _known(conn: sa.Connection, since: datetime) -> list[tuple[str, str]]:
    """(event, subject) of the events recorded since a little before ``since``."""
    e = store.alert_events
    q = sa.select(e.c.event, e.c.subject).where(e.c.event_at >= since - timedelta(hours=1))
    return [(str(r[0]), str(r[1])) for r in fetch_all(conn, q)]


def pool_low(db: Database, name: str, now: datetime) -> int | None:
    """Open or close the alert's pool_low episode; returns the event recorded, if one was.
    The alert's row is locked while it decides, so two deliverers open an episode once."""
    with db.begin() as conn:
        a = store.get(conn, name, lock=True)
        if a is None or a.pool_below is None or not a.enabled:
            return None
        active = store.active_proxies(conn)
        if active >= a.pool_below:
            if a.pool_low_open:
                store.set_pool_low(conn, name, False, a.pool_low_episode)
            return None
        if a.pool_low_open:
            return None
        episode = a.pool_low_episode + 1
        store.set_pool_low(conn, name, True, episode)
        payload = {"alert": name, "active": active, "threshold": a.pool_below}
        text = summary_text(Event.POOL_LOW, payload)
        event_id = store.record_event(
            conn, Event.POOL_LOW, f"{name}#{episode}", text, payload, [name], now
        )
    log.info("alert %s: pool_low (%d active < %d)", name, active, a.pool_below)
    return event_id

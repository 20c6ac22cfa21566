"""Putting events in the outbox: ``emit`` (any engine part) and ``runs_ended`` (the run-end
hook, ``engine.lifecycle.ended``).

An event is recorded only when an enabled alert wants it, with one pending delivery per
such alert, in one transaction; the key (event, subject) makes a second record of the same
event — another coordinator, the sweep after a crash — a no-op. Recording never raises into
the caller's path: a run's end must not fail because an alert could not be written (the
sweep records it later).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from engine.alerts.events import RUN_EVENT, Event, summary_text
from engine.settings import Settings
from storage import alerts as store
from storage.clock import utcnow
from storage.db import Database

log = logging.getLogger(__name__)


def subscribers(conn: sa.Connection, event: str, only: str | None = None) -> list[str]:
    """The enabled alerts that want ``event`` (``only``: just that one, if it does)."""
    try:
        rows = store.list_all(conn)
    except sa.exc.DBAPIError:  # a database opened without the alerts component
        return []
    return [
        a.name
        for a in rows
        if a.enabled and (event in a.events or event == Event.TEST) and only in (None, a.name)
    ]


def run_payload(db: Database, run_id: int, settings: Settings | None = None) -> dict[str, Any]:
    """A run's generic fields: id, kind, status, counts, duration, error."""
    from engine.summary import run_summary

    s = run_summary(db, run_id, settings)
    c = s["counts"]
    return {
        "run_id": s["run_id"],
        "kind": s["kind"],
        "status": s["status"],
        "counts": {k: c[k] for k in ("total", "done", "ok", "failed")},
        "outcomes": c["outcomes"],
        "duration_s": s["duration_s"],
        "error": s["error"],
    }


def emit(
    db: Database,
    event: str,
    payload: dict[str, Any],
    subject: str | None = None,
    *,
    only: str | None = None,
    now: datetime | None = None,
    settings: Settings | None = None,
    wake: bool = True,
) -> int | None:
    """Record ``event`` once; returns its outbox id, or None when no alert wants it or it is
    recorded already. ``subject`` defaults to ``payload["run_id"]``: an event about a run is
    once per run. A payload with a ``run_id`` gets the run's fields (kind, status, counts…)
    where it does not give them.

    For stop rules: ``emit(db, "run_auto_stopped", {"run_id": 7, "rule": "blocked_ratio",
    "reason": "blocked 62% of the last 200 items > 50%"})`` when the rule fires; the run's
    later ``run_stopped`` is then not sent (one alert per stop)."""
    if subject is None:
        if payload.get("run_id") is None:
            raise ValueError(f"{event}: give a subject (or a run_id in the payload)")
        subject = str(payload["run_id"])
    when = now or utcnow()
    with db.connect() as conn:
        names = subscribers(conn, event, only)
    if not names:
        return None
    if payload.get("run_id") is not None:
        payload = {**run_payload(db, int(payload["run_id"]), settings), **payload}
    text = summary_text(event, payload)
    with db.begin() as conn:
        event_id = store.record_event(conn, event, subject, text, payload, names, when)
    if event_id is not None:
        log.info("alert event %s %s recorded for %s", event, subject, ", ".join(names))
        if wake:
            _wake()
    return event_id


def run_end_event(db: Database, run_id: int, status: str) -> str | None:
    """The event a run's final status means. A run a stop rule stopped (its stop and the
    rule's record are one transaction, ``engine.stop_rules``) ends as ``run_auto_stopped``,
    decided here at its end rather than when the rule fired, so it is one alert whichever
    thread gets there first; one that already had its ``run_auto_stopped`` gets no other."""
    event = RUN_EVENT.get(status)
    if event == Event.RUN_STOPPED:
        with db.connect() as conn:
            try:
                if store.event_exists(conn, Event.RUN_AUTO_STOPPED, str(run_id)):
                    return None
                if _auto_stop(conn, run_id) is not None:
                    return Event.RUN_AUTO_STOPPED
            except sa.exc.DBAPIError:
                return None
    return event


def emit_run_end(
    db: Database,
    run_id: int,
    status: str,
    now: datetime | None = None,
    settings: Settings | None = None,
) -> None:
    """Record the event of a run's end (``run_end_event``), with the stop rule's rule,
    reason and numbers when it is ``run_auto_stopped``."""
    event = run_end_event(db, run_id, status)
    if event is None:
        return
    payload: dict[str, Any] = {"run_id": run_id}
    if event == Event.RUN_AUTO_STOPPED:
        with db.connect() as conn:
            stop = _auto_stop(conn, run_id) or {}
        payload.update(rule=stop.get("rule"), reason=stop.get("message"))
        payload["numbers"] = stop.get("numbers")
    emit(db, event, payload, now=now, settings=settings)


def _auto_stop(conn: sa.Connection, run_id: int) -> dict[str, Any] | None:
    """The stop rule that stopped the run this time (its record is newer than the run's
    last start or resume), or None."""
    from storage.runs import get_run
    from storage.stop_metrics import auto_stops, run_since

    run = get_run(conn, run_id)
    found = auto_stops(conn, run_id, limit=1)
    if run is None or not found:
        return None
    since = run_since(conn, run_id) or run.started_at
    at = datetime.fromisoformat(found[0]["at"])
    return found[0] if since is None or at >= since.replace(microsecond=0) else None


def runs_ended(
    db: Database,
    settings: Settings | None,
    run_ids: Iterable[int],
    now: datetime | None = None,
) -> None:
    """The run-end hook: one event per run that reached its final status. Logged, never
    raised."""
    from storage.runs import get_run

    for run_id in run_ids:
        try:
            with db.connect() as conn:
                if not _any_alert(conn):
                    return
                run = get_run(conn, run_id)
            if run is None:
                continue
            emit_run_end(db, run_id, run.status, now, settings)
        except Exception as exc:  # the sweep records it later
            log.warning("run %s: its alert event was not recorded now: %s", run_id, exc)


def _any_alert(conn: sa.Connection) -> bool:
    try:
        return any(a.enabled for a in store.list_all(conn))
    except sa.exc.DBAPIError:
        return False


_wakers: list[Any] = []


def on_recorded(wake: Any) -> None:
    """A deliverer in this process asks to be woken when an event is recorded here."""
    _wakers.append(wake)


def forget_waker(wake: Any) -> None:
    if wake in _wakers:
        _wakers.remove(wake)


def _wake() -> None:
    for wake in list(_wakers):
        wake()

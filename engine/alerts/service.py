"""Alert operations shared by the CLI and the console: add, list, test, remove, recent.

Errors are ``AlertError`` with a message that says what to do (and never holds a URL).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from engine.alerts.deliver import Deliverer, Outcome
from engine.alerts.events import DEFAULT_EVENTS, EVENTS, Event
from engine.alerts.record import emit
from engine.alerts.webhook import WebhookError, check_env_name, check_literal
from engine.settings import Settings
from storage import alerts as store
from storage.alerts import AlertRow, RecentRow
from storage.clock import utcnow
from storage.db import Database

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class AlertError(Exception):
    """An alert operation that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Added:
    alert: AlertRow
    warnings: list[str]


def parse_events(text: str | Iterable[str] | None, pool_below: int | None) -> tuple[str, ...]:
    """The events an alert wants: the given ones (comma-separated), or every event but
    pool_low — plus pool_low when a threshold is given."""
    if text is None or text == "" or text == []:
        chosen = list(DEFAULT_EVENTS)
        if pool_below is not None:
            chosen.append(Event.POOL_LOW.value)
    else:
        items = text.split(",") if isinstance(text, str) else list(text)
        chosen = [e.strip() for e in items if e.strip()]
        unknown = [e for e in chosen if e not in EVENTS]
        if unknown:
            raise AlertError(
                f"unknown event(s) {', '.join(unknown)}: choose from {', '.join(EVENTS)}"
            )
    if Event.POOL_LOW in chosen and pool_below is None:
        raise AlertError("pool_low needs a threshold: --pool-below N (active proxies)")
    if pool_below is not None and Event.POOL_LOW not in chosen:
        chosen.append(Event.POOL_LOW.value)
    return tuple(dict.fromkeys(chosen))


def add_alert(
    db: Database,
    name: str,
    url: str | None = None,
    url_env: str | None = None,
    events: str | Iterable[str] | None = None,
    pool_below: int | None = None,
    now: datetime | None = None,
) -> Added:
    if not _NAME.match(name or ""):
        raise AlertError(
            f"alert name {name!r}: use letters, digits, '-', '_' or '.' (e.g. ops-slack)"
        )
    if bool(url) == bool(url_env):
        raise AlertError("give the webhook as --url URL or --url-env VAR (one of them)")
    if pool_below is not None and pool_below < 1:
        raise AlertError("--pool-below: a number of active proxies, 1 or more")
    warnings: list[str] = []
    try:
        if url:
            warnings = check_literal(url)
        else:
            check_env_name(url_env or "")
    except WebhookError as exc:
        raise AlertError(str(exc)) from None
    row = AlertRow(
        name=name,
        url=url.strip() if url else None,
        url_env=url_env,
        events=parse_events(events, pool_below),
        pool_below=pool_below,
    )
    with db.begin() as conn:
        if not store.add(conn, row, now or utcnow()):
            raise AlertError(f"alert {name!r} exists already (alerts remove {name})")
    return Added(get_alert(db, name), warnings)


def get_alert(db: Database, name: str) -> AlertRow:
    with db.connect() as conn:
        row = store.get(conn, name)
    if row is None:
        raise AlertError(f"no alert {name!r}: `alerts list` shows them")
    return row


def list_alerts(db: Database) -> list[AlertRow]:
    with db.connect() as conn:
        return store.list_all(conn)


def remove_alert(db: Database, name: str) -> None:
    with db.begin() as conn:
        if not store.remove(conn, name):
            raise AlertError(f"no alert {name!r}: `alerts list` shows them")


def send_test(db: Database, settings: Settings, name: str) -> Outcome:
    """Send a test event to this alert now, through the outbox like any event (so it shows
    among the recent alerts); a failed send stays pending and is retried like others."""
    import uuid

    row = get_alert(db, name)
    if not row.enabled:
        raise AlertError(f"alert {name!r} is disabled")
    subject = f"{name}:{uuid.uuid4().hex}"
    event_id = emit(db, Event.TEST, {"alert": name}, subject, only=name, wake=False)
    if event_id is None:
        raise AlertError(f"alert {name!r}: the test event was not recorded")
    outcomes = Deliverer(db, settings).deliver_due(event_id=event_id)
    if outcomes:
        return outcomes[0]
    # This process's deliverer polled it first: wait for what it did (bounded).
    deadline = time.monotonic() + settings.alerts_timeout_s + 5
    while True:
        with db.connect() as conn:
            row = store.delivery_of(conn, event_id, name)
        if row is not None and (
            row.status != "pending" or row.attempts or time.monotonic() > deadline
        ):
            return Outcome(
                event_id,
                row.uid,
                row.event,
                name,
                row.status or "?",
                row.last_status,
                row.last_error,
            )
        time.sleep(0.1)


def recent(db: Database, limit: int = 50) -> list[RecentRow]:
    with db.connect() as conn:
        return store.recent(conn, limit)

"""The Alerts page's reads and its form's checks (the page stays layout only)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from storage.db import Database


def alerts_frame(db: Database) -> pd.DataFrame:
    from engine.alerts.service import list_alerts
    from engine.alerts.webhook import describe

    return pd.DataFrame(
        [
            {
                "name": a.name,
                "webhook": describe(a.url, a.url_env),  # never a secret
                "events": ", ".join(a.events),
                "pool below": a.pool_below,
                "enabled": a.enabled,
            }
            for a in list_alerts(db)
        ]
    )


def recent_frame(db: Database, limit: int = 50) -> pd.DataFrame:
    from engine.alerts.service import recent

    return pd.DataFrame(
        [
            {
                "at (UTC)": r.event_at,
                "event": r.event,
                "alert": r.alert,
                "delivery": r.status,
                "attempts": r.attempts,
                "HTTP": r.last_status,
                "next try (UTC)": r.next_try_at if r.status == "pending" else None,
                "summary": r.text,
                "last error": r.last_error,
                "id": r.uid,
            }
            for r in recent(db, limit)
        ]
    )


def add_from_form(
    db: Database, name: str, target: str, value: str, events: list[str], pool_below: int | None
) -> tuple[dict[str, str], list[str]]:
    """Add the alert; returns (problems by field, warnings). ``target`` is "env" (``value``
    names an environment variable of the console's server) or "url"."""
    from engine.alerts.service import AlertError, add_alert

    value = (value or "").strip()
    if not value:
        return {"Webhook": "give an environment variable's name (or a URL)"}, []
    url, url_env = (None, value) if target == "env" else (value, None)
    try:
        added = add_alert(db, (name or "").strip(), url, url_env, events or None, pool_below)
    except AlertError as exc:
        field = "Name" if "name" in str(exc) or "exists" in str(exc) else "Webhook"
        if "event" in str(exc) or "pool" in str(exc):
            field = "Events"
        return {field: str(exc)}, []
    return {}, added.warnings


def send_test_line(c: Any, name: str) -> str:
    """Send a test event now; a line saying what the receiver answered."""
    from engine.alerts.service import AlertError, send_test

    try:
        out = send_test(c.db, c.settings, name)
    except AlertError as exc:
        return f"error: {exc}"
    got = f"HTTP {out.http_status}" if out.http_status else "no answer"
    return f"{name}: {got} ({out.status})" + (f": {out.error}" if out.error else "")

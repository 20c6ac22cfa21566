"""The alert events, what each one's body carries, and its one-line summary (Slack's
``text``).

A body is ``{"text", "event", "id", "at", **payload}``: Slack (and Mattermost, Teams'
incoming webhooks, Discord's ``/slack`` endpoint) show ``text``; anything else reads the
generic fields. The payload is fixed when the event is recorded, so a resend is the same
body, ``id`` included.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Event(StrEnum):
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_STOPPED = "run_stopped"  # by an operator (stop or cancel)
    RUN_AUTO_STOPPED = "run_auto_stopped"  # by a stop rule, with the rule and its numbers
    SCHEDULE_MISSED = "schedule_missed"  # a fire recorded missed or error
    WORKER_LOST = "worker_lost"  # the watchdog marked a worker dead
    POOL_LOW = "pool_low"  # fewer active proxies than the alert's threshold
    TEST = "test"  # `alerts test`: only to the alert tested


EVENTS = tuple(e.value for e in Event if e is not Event.TEST)
# What an alert gets without --events: everything but pool_low, which needs a threshold.
DEFAULT_EVENTS = tuple(e for e in EVENTS if e != Event.POOL_LOW)

RUN_EVENT = {
    "completed": Event.RUN_COMPLETED,
    "failed": Event.RUN_FAILED,
    "stopped": Event.RUN_STOPPED,
    "cancelled": Event.RUN_STOPPED,
}

PREFIX = "Fetchfleet: "


def summary_text(event: str, p: dict[str, Any]) -> str:
    """The one-line human summary of an event."""
    if event.startswith("run_"):
        c = p.get("counts") or {}
        line = f"run {p.get('run_id')} ({p.get('kind', '?')}) {p.get('status', event[4:])}"
        if event == Event.RUN_AUTO_STOPPED:
            line = f"run {p.get('run_id')} ({p.get('kind', '?')}) stopped by a stop rule"
            if p.get("rule"):
                line += f" {p['rule']}"
        if c:
            line += (
                f": {c.get('done', 0):,} of {c.get('total', 0):,} items, "
                f"{c.get('ok', 0):,} ok, {c.get('failed', 0):,} failed"
            )
        if p.get("duration_s") is not None:
            line += f" in {float(p['duration_s']):.1f} s"
        why = p.get("reason") or p.get("error")
        if why and event != Event.RUN_COMPLETED:
            line += f" — {why}"
        return PREFIX + _one_line(line)
    if event == Event.SCHEDULE_MISSED:
        what = "missed" if p.get("outcome") == "missed" else "could not start"
        line = f"schedule {p.get('schedule')} {what} its run due {p.get('due_at')} UTC"
        if p.get("note"):
            line += f" — {p['note']}"
        return PREFIX + _one_line(line)
    if event == Event.WORKER_LOST:
        line = f"worker {p.get('worker_id')} on {p.get('host')} lost"
        if p.get("reason"):
            line += f": {p['reason']}"
        return PREFIX + _one_line(line)
    if event == Event.POOL_LOW:
        return PREFIX + (
            f"only {p.get('active')} active proxies (alert {p.get('alert')} is set below "
            f"{p.get('threshold')})"
        )
    if event == Event.TEST:
        return PREFIX + f"test alert from {p.get('alert')} — the webhook works"
    return PREFIX + event


def _one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def body(uid: str, event: str, at: Any, text: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON a receiver gets; ``id`` is stable across resends (dedupe on it)."""
    stamp = at.isoformat(timespec="seconds") + "Z" if hasattr(at, "isoformat") else str(at)
    return {"text": text, "event": event, "id": uid, "at": stamp, **payload}

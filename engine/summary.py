"""Run summaries as plain dicts: what `status`, `--json` and the console show.

The counts come from the run's kind (``RunKind.outcome_counts``, by default its item log);
a kind may add a section of its own under its name (``RunKind.summary_extra``: the scrape
job's entities and method mix), computed once a run has ended, not on every progress poll.
"""

from __future__ import annotations

from typing import Any

from engine.jobs import get_kind
from engine.settings import Settings
from storage import queue as q
from storage import runs
from storage.db import Database


def run_summary(
    db: Database, run_id: int, settings: Settings | None = None, *, extra: bool = False
) -> dict[str, Any]:
    """The run's counts, tasks and timing, and the stop rule that stopped it (``auto_stop``);
    with ``extra``, also its kind's own section and its ``cost`` (``engine.costs``)."""
    with db.connect() as conn:
        run = runs.get_run(conn, run_id)
        if run is None:
            raise ValueError(f"no run with id {run_id}: `python -m engine.run status` lists runs")
        kind = get_kind(run.kind, settings or Settings())
        outcomes = kind.outcome_counts(conn, run_id)
        tasks = q.task_counts(conn, run_id)
        more = kind.summary_extra(conn, run_id) if extra else None
        cost = kind.cost(conn, run_id) if extra else None
        stopped_by = _auto_stop(conn, run)
    done = sum(outcomes.values())
    ok = sum(v for k, v in outcomes.items() if k in kind.ok_outcomes())
    duration = run.duration_s
    summary = {
        "run_id": run.id,
        "kind": run.kind,
        "status": run.status,
        "counts": {
            "total": run.total_items,
            "done": done,
            "ok": ok,
            "failed": done - ok,
            "outcomes": dict(sorted(outcomes.items())),
        },
        "tasks": tasks,
        "duration_s": round(duration, 3),
        "items_per_s": round(done / duration, 2) if duration > 0 else 0.0,
        "error": run.error,
        "created_at": run.created_at.isoformat(timespec="seconds"),
    }
    if stopped_by is not None:
        summary["auto_stop"] = stopped_by
    if more is not None:
        summary[run.kind] = more
    if cost is not None:
        summary["cost"] = cost
    return summary


def _auto_stop(conn: Any, run: runs.RunRow) -> dict[str, Any] | None:
    """The stop rule that stopped the run (rule, message, numbers, at), while it is stopped
    by it (a resume clears the run's error; the run log keeps the record)."""
    if run.status not in ("stopping", "stopped") or not (run.error or "").startswith(
        "auto-stopped"
    ):
        return None
    from storage.stop_metrics import auto_stops

    found = auto_stops(conn, run.id, limit=1)
    return found[0] if found else None


def add_summary_extra(
    db: Database, summary: dict[str, Any], settings: Settings | None = None
) -> dict[str, Any]:
    """Add the kind's own section (``RunKind.summary_extra``) to a summary made without it
    (``wait_run``'s), under the kind's name; returns the summary."""
    kind = get_kind(summary["kind"], settings or Settings())
    with db.connect() as conn:
        more = kind.summary_extra(conn, int(summary["run_id"]))
        cost = kind.cost(conn, int(summary["run_id"]))
    if more is not None:
        summary[kind.name] = more
    if cost is not None:
        summary["cost"] = cost
    return summary


def summary_lines(summary: dict[str, Any], settings: Settings | None = None) -> list[str]:
    """The kind's own lines of the human summary (``RunKind.summary_lines``); none for a kind
    this process does not know (a plugin not loaded here)."""
    try:
        kind = get_kind(summary["kind"], settings or Settings())
    except ValueError:
        return []
    return kind.summary_lines(summary)


def runs_overview(db: Database, limit: int = 20) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = runs.list_runs(conn, limit)
    return [
        {
            "run_id": r.id,
            "kind": r.kind,
            "status": r.status,
            "total": r.total_items,
            "created_at": r.created_at.isoformat(timespec="seconds"),
            "duration_s": round(r.duration_s, 1),
            "error": r.error,
        }
        for r in rows
    ]

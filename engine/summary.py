"""Run summaries as plain dicts: what `status`, `--json` and the console show."""

from __future__ import annotations

from typing import Any

from engine.jobs import get_kind
from engine.settings import Settings
from storage import queue as q
from storage import runs
from storage.db import Database


def run_summary(db: Database, run_id: int, settings: Settings | None = None) -> dict[str, Any]:
    with db.connect() as conn:
        run = runs.get_run(conn, run_id)
        if run is None:
            raise ValueError(f"no run with id {run_id}: `python -m engine.run status` lists runs")
        kind = get_kind(run.kind, settings or Settings())
        outcomes = kind.outcome_counts(conn, run_id)
        tasks = q.task_counts(conn, run_id)
    done = sum(outcomes.values())
    ok = sum(v for k, v in outcomes.items() if k in kind.ok_outcomes())
    duration = run.duration_s
    return {
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

"""The Schedules page's reads and its add form's checks (the page stays layout only)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from typing import Any

import pandas as pd

from storage.db import Database

_DURATION = re.compile(r"^\s*\d+(\.\d+)?\s*[smhd]\s*$")


def schedules_frame(db: Database) -> pd.DataFrame:
    from engine.schedules.scheduler import timing_of
    from engine.schedules.service import list_schedules, recent_fires

    rows = []
    for s in list_schedules(db):
        last = recent_fires(db, s.name, limit=1)
        rows.append(
            {
                "name": s.name,
                "kind": s.kind,
                "when": timing_of(s).describe(),
                "enabled": s.enabled,
                "next due (UTC)": s.next_due_at,
                "last fire": last[0].outcome if last else None,
                "last run": last[0].run_id if last else None,
                "last run status": last[0].run_status if last else None,
                "overlap": s.overlap,
                "missed": s.missed,
                "command": s.command,
            }
        )
    return pd.DataFrame(rows)


def fires_frame(db: Database, limit: int = 50) -> pd.DataFrame:
    from engine.schedules.service import recent_fires

    return pd.DataFrame(
        [
            {
                "schedule": f.schedule,
                "due (UTC)": f.due_at,
                "fired (UTC)": f.fired_at,
                "outcome": f.outcome,
                "run": f.run_id,
                "run status": f.run_status,
                "note": f.note,
            }
            for f in recent_fires(db, None, limit)
        ]
    )


def add_from_form(
    c: Any,
    name: str,
    when: str,
    tz: str,
    command: str,
    overlap: str,
    missed: str,
    pending: Any = None,
) -> dict[str, str]:
    """Add the schedule; returns the problems by field (empty: added). The job is
    ``pending`` (a job page's "Schedule this…", checked by that page's form) or the command
    line, checked by the same path as ``schedule add`` (its kind's flags and parameters)."""
    from engine.cli.common import UserError, parse_duration
    from engine.cli.schedule import capture_job
    from engine.jobs.params import ParamError
    from engine.schedules.service import ScheduleError, add_schedule
    from engine.schedules.timing import Timing

    problems: dict[str, str] = {}
    when = (when or "").strip()
    if not when:
        problems["When"] = "give a cron expression (0 3 * * *) or an interval (30m)"
    timing = None
    if when and _DURATION.match(when):
        try:
            timing = Timing(every_s=parse_duration(when), tz=tz or "UTC")
        except UserError as exc:
            problems["When"] = str(exc)
    elif when:
        timing = Timing(cron=when, tz=tz or "UTC")
    if timing is not None:
        try:
            timing.check()
        except ValueError as exc:
            field = "Time zone" if "time zone" in str(exc) else "When"
            problems[field] = str(exc)
    job = pending
    try:
        argv = [] if pending is not None else shlex.split(command or "")
    except ValueError as exc:
        problems["Job"] = f"cannot split the command line: {exc}"
        argv = []
    if pending is not None:
        pass
    elif not argv and "Job" not in problems:
        problems["Job"] = "give the job's command line, e.g. validate --revalidate --judge URL"
    elif (argv and argv[0] in ("python", "python3")) or argv[:2] == ["-m", "engine.run"]:
        problems["Job"] = "start with the command (validate, scrape, backfill), not python -m …"
    elif argv:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                job = capture_job(argv)
        except (UserError, ParamError) as exc:
            problems["Job"] = str(exc)
        except SystemExit:  # argparse: its message is on stderr
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            problems["Job"] = lines[-1] if lines else "the command line does not parse"
    if problems or timing is None or job is None:
        return problems
    try:
        add_schedule(c.db, (name or "").strip(), job, timing, overlap, missed)
    except ScheduleError as exc:  # the name: taken, or not usable
        return {"Name": str(exc)}
    return {}


PENDING = "sched_job"  # session key: a job page's "Schedule this…" waiting for its timing
SUMMARY_SKIP = ("spec_text", "file_roots", "spec_dir", "headers")


def job_from_page(c: Any, kind: str, params: dict[str, Any], file_keys: tuple[str, ...]) -> Any:
    """The job a page's form describes, for a schedule. A pasted or uploaded list is moved
    out of ``data/uploads`` (deleted when a run using it ends) to ``data/scheduled``, where
    it stays for every fire; removing the schedule leaves it for the operator to delete."""
    import shutil
    import uuid
    from pathlib import Path

    from engine.schedules.service import Job

    params = dict(params)
    keep = c.settings.data_dir / "scheduled"
    for key in file_keys:
        value = params.get(key)
        if not value:
            continue
        path = Path(value)
        if path.resolve().is_relative_to(c.uploads_dir.resolve()):
            keep.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = keep / f"{uuid.uuid4().hex[:8]}-{path.name}"
            shutil.move(path, target)
            params[key] = str(target)
    shown = ", ".join(
        f"{k}={v}"
        for k, v in sorted(params.items())
        if v not in (None, "", []) and k not in SUMMARY_SKIP
    )
    return Job(kind, params, {}, f"{kind} (from the console): {shown}")


def schedule_this(c: Any, kind: str, params: dict[str, Any], file_keys: tuple[str, ...]) -> None:
    """A job page's "Schedule this…": keep the job its form checked and go to the Schedules
    page, where the timing is chosen."""
    import streamlit as st

    st.session_state[PENDING] = job_from_page(c, kind, params, file_keys)
    st.switch_page("pages/schedules.py")

"""The scheduler: fires due schedules into a coordinator's runs, exactly once per due time.

Exactly once, with several schedulers on one PostgreSQL (every console server runs one, and
``engine.run scheduler`` on a headless host): a fire is one transaction that takes a
transaction-scoped advisory lock (the other schedulers skip that round), locks the schedule's
row, checks it is still due, creates the run, records the fire under the key (schedule, due
time) and moves the due time on. A scheduler that dies inside it leaves nothing; one that dies
after it leaves a run and its fire. Planning the run's tasks happens after the commit: a run
whose planning was cut off stays ``queued``, and the next scheduler marks it failed with the
reason (planning may already have imported part of its input, so it is not redone).

Policies: ``overlap`` — ``skip`` records a skipped fire while the schedule's previous run is
still going; ``queue`` waits for it to end and then fires once (fires that fell due meanwhile
coalesce). ``missed`` — a fire later than ``grace_s`` (the scheduler was down) is run
``once`` or recorded as ``missed`` and ``skip``-ped; either way the next due time is the first
one after now, so downtime never causes a burst of runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from engine.model import TERMINAL
from engine.schedules.timing import Timing
from engine.settings import Settings
from storage import schedules as store
from storage.clock import utcnow
from storage.db import Database

log = logging.getLogger(__name__)

SCHEDULER_LOCK = 0x46_46_53_43  # "FFSC": the advisory lock of a scheduler's round
GRACE_S = 120.0  # later than this after its due time, a fire counts as missed
PER_RUN_SETTINGS = ("batch_size", "max_attempts", "check_timeout_s")
TERMINAL_STATUSES = {str(s) for s in TERMINAL}


@dataclass(frozen=True)
class Fired:
    """What one fire did: ``started`` (with its run), ``skipped``, ``missed`` or ``error``."""

    schedule: str
    due_at: datetime
    outcome: str
    run_id: int | None = None
    note: str | None = None


def timing_of(row: store.ScheduleRow) -> Timing:
    return Timing(row.cron, row.every_s, row.tz)


def run_settings(base: Settings, row: store.ScheduleRow) -> Settings:
    """The scheduler's settings with the per-run ones the schedule's command gave."""
    update = {k: v for k, v in row.settings.items() if k in PER_RUN_SETTINGS}
    return base.model_copy(update=update)


def _turn(conn: sa.Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return True  # DuckDB: one process holds the database
    return bool(
        conn.execute(
            sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SCHEDULER_LOCK}
        ).scalar()
    )


class Scheduler:
    """``coordinator`` names the runs' coordinator (whose pool or whose fleet does them);
    ``now`` is injectable so tests run a day of schedules in a second."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        coordinator: str,
        now: Callable[[], datetime] = utcnow,
        grace_s: float = GRACE_S,
    ) -> None:
        self.db = db
        self.settings = settings
        self.coordinator = coordinator
        self.now = now
        self.grace_s = grace_s
        self._recovered = False

    # --- one round -----------------------------------------------------------------------

    def tick(self) -> list[Fired]:
        """Fire every schedule that is due now; returns what each fire did."""
        if not self._recovered:
            self.recover()
        with self.db.connect() as conn:
            names = store.due(conn, self.now())
        out = []
        for name in names:
            fired = self.fire(name)
            if fired is not None:
                out.append(fired)
        return out

    def fire(self, name: str, now_anyway: bool = False) -> Fired | None:
        """Fire one schedule if it is due (``now_anyway``: run-now, due or not); None when
        another scheduler has the round or the schedule is not due (any more)."""
        now = self.now()
        with self.db.begin() as conn:
            if not _turn(conn):
                return None
            row = store.get(conn, name, lock=True)
            if row is None:
                return None
            if not now_anyway and (
                not row.enabled or row.next_due_at is None or row.next_due_at > now
            ):
                return None
            due = now if now_anyway else row.next_due_at
            assert due is not None
            nxt = row.next_due_at if now_anyway else timing_of(row).next_after(now)
            previous = store.last_run_status(conn, name)
            if previous is not None and previous[1] not in TERMINAL_STATUSES:
                if row.overlap == "queue" and not now_anyway:
                    return None  # fires once the previous run has ended
                note = f"run {previous[0]} of this schedule is still {previous[1]}"
                return self._settle_fire(conn, name, due, nxt, now_anyway, "skipped", note)
            late = (now - max(due, self._finished_at(conn, previous))).total_seconds()
            note = "run now" if now_anyway else None
            if not now_anyway and late > self.grace_s:
                if row.missed == "skip":
                    note = f"{late:.0f} s late (the scheduler was down): skipped (missed=skip)"
                    return self._settle_fire(conn, name, due, nxt, now_anyway, "missed", note)
                note = f"{late:.0f} s late (the scheduler was down): fired once"
        return self._start(row, due, nxt, now_anyway, note)

    def _settle_fire(
        self,
        conn: sa.Connection,
        name: str,
        due: datetime,
        nxt: datetime | None,
        now_anyway: bool,
        outcome: str,
        note: str,
    ) -> Fired:
        """A fire that starts no run: recorded with why; the schedule moves on."""
        store.record_fire(conn, name, due, outcome, note=note[:2000])
        if not now_anyway:
            store.set_next(conn, name, nxt)
        return Fired(name, due, outcome, note=note)

    def _start(
        self,
        row: store.ScheduleRow,
        due: datetime,
        nxt: datetime | None,
        now_anyway: bool,
        note: str | None,
    ) -> Fired | None:
        """Create the run and its fire in one transaction (``submit_run``'s, after it has
        prepared the parameters, which reads files, outside any lock), then plan it."""
        from engine.api import submit_run

        created: list[Fired] = []

        def record(conn: sa.Connection, run_id: int) -> None:
            current = store.get(conn, row.name, lock=True)
            if current is None or (not now_anyway and current.next_due_at != due):
                raise _Gone(row.name)  # removed, or another scheduler fired it meanwhile
            store.record_fire(conn, row.name, due, "started", run_id=run_id, note=note)
            if not now_anyway:
                store.set_next(conn, row.name, nxt)
            created.append(Fired(row.name, due, "started", run_id, note))

        settings = run_settings(self.settings, row)
        try:
            submit_run(
                self.db, settings, row.kind, dict(row.params), self.coordinator, on_create=record
            )
        except _Gone:
            return None
        except Exception as exc:
            if created:  # created, then planning failed: the run is failed with the reason
                log.warning(
                    "schedule %s: run %s failed to plan: %s", row.name, created[0].run_id, exc
                )
                return created[0]
            log.warning("schedule %s: could not start its run: %s", row.name, exc)
            with self.db.begin() as conn:
                return self._settle_fire(conn, row.name, due, nxt, now_anyway, "error", str(exc))
        return created[0]

    @staticmethod
    def _finished_at(conn: sa.Connection, previous: tuple[int, str] | None) -> datetime:
        if previous is None:
            return datetime.min
        from storage.runs import get_run

        run = get_run(conn, previous[0])
        return run.finished_at if run is not None and run.finished_at else datetime.min

    def recover(self) -> list[int]:
        """Runs whose planning a previous scheduler did not finish: failed, with why."""
        from engine import lifecycle
        from storage.runs import set_status

        self._recovered = True
        with self.db.begin() as conn:
            if not _turn(conn):
                return []
            stuck = store.unplanned_runs(conn)
            for run_id in stuck:
                set_status(
                    conn,
                    run_id,
                    "failed",
                    "planning was cut off (the scheduler that fired it stopped); the "
                    "schedule's next fire starts a new run",
                )
        if stuck:
            lifecycle.ended(self.db, self.settings, stuck)
        return stuck

    # --- the loop ------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event, poll_s: float = 5.0) -> None:
        """Tick until ``stop`` is set; a database outage is logged and waited out."""
        from storage.errors import is_transient

        while not stop.is_set():
            try:
                for f in self.tick():
                    log.info("schedule %s: %s %s", f.schedule, f.outcome, f.run_id or "")
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("scheduler round failed")
                else:
                    log.warning("scheduler: database unreachable (%s); retrying", exc)
            stop.wait(poll_s)


class _Gone(Exception):
    """The schedule was removed or fired by another scheduler between our two transactions."""


def first_due(timing: Timing, now: datetime) -> datetime:
    """A new (or re-enabled) schedule's first due time: the first after now."""
    return timing.next_after(now)

"""Schedules: timing, the job captured from its command line, exactly one run per due time
(with two schedulers on one PostgreSQL, and after a scheduler killed mid-fire), the overlap
and missed-run policies (with an injected clock), and the CLI end to end with a real run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.cli.common import open_database
from engine.schedules.scheduler import Scheduler
from engine.schedules.service import Job, ScheduleError, add_schedule, set_enabled
from engine.schedules.timing import Timing
from engine.settings import Settings
from sim.world import SimWorld
from storage import schedules as store
from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.db import Database
from tests.conftest import cli_here
from tests.test_backfill import ROOT, assert_exactly_the_input, cli, params, subset
from tests.test_backfill import world as world

T0 = datetime(2026, 12, 1, 2, 0, 0)  # naive UTC, the form stored


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


@pytest.fixture
def sdb(db_url: str) -> Any:
    from engine.jobs import components

    database = open_database(db_url, components=components())
    yield database
    database.dispose()


def job(world: SimWorld, tmp_path: Path, n: int = 40) -> Job:
    return Job("backfill", params(world, subset(world, tmp_path, n)), {}, "backfill …")


def runs_of(db: Database, name: str) -> list[tuple[int, str]]:
    with db.connect() as conn:
        return [
            (int(r[0]), str(r[1]))
            for r in fetch_all(
                conn,
                sa.text(
                    "SELECT r.id, f.outcome FROM schedule_fires f JOIN runs r ON r.id = f.run_id "
                    "WHERE f.schedule = :n ORDER BY r.id"
                ),
                {"n": name},
            )
        ]


def end_runs(db: Database) -> None:
    """Nobody works these runs (no pool here): cancel them, as an operator would."""
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET status = 'cancelled', finished_at = :t"), {"t": T0})


# --- timing ------------------------------------------------------------------------------


def test_cron_is_read_in_its_time_zone_across_daylight_saving() -> None:
    t = Timing(cron="30 1 * * *", tz="Europe/Berlin")
    # 01:30 Berlin is 00:30 UTC in winter (UTC+1) and 23:30 UTC the day before in summer
    assert t.next_after(datetime(2026, 3, 28, 12, 0)) == datetime(2026, 3, 29, 0, 30)
    assert t.next_after(datetime(2026, 3, 29, 12, 0)) == datetime(2026, 3, 29, 23, 30)
    assert Timing(every_s=90).next_after(T0) == T0 + timedelta(seconds=90)


@pytest.mark.parametrize(
    ("timing", "says"),
    [
        (Timing(cron="61 * * * *"), "is not a cron expression"),
        (Timing(cron="0 3 * * *", tz="Mars/Olympus"), "time zone 'Mars/Olympus' is unknown"),
        (Timing(), "either a cron expression or an interval"),
        (Timing(cron="* * * * *", every_s=60), "either a cron expression or an interval"),
        (Timing(every_s=0), "more than zero"),
    ],
)
def test_bad_timing_says_what_is_wrong(timing: Timing, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        timing.check()


# --- firing ------------------------------------------------------------------------------


def test_due_times_fire_once_each_and_overlap_skip_records_why(
    sdb: Database, world: SimWorld, tmp_path: Path
) -> None:
    clock = Clock(T0)
    add_schedule(sdb, "hourly", job(world, tmp_path), Timing(cron="0 * * * *"), now=clock())
    s = Scheduler(sdb, Settings(), "test", now=clock)
    assert s.tick() == []  # not due before 03:00
    clock.advance(hours=1)
    (first,) = s.tick()
    assert first.outcome == "started" and first.due_at == T0 + timedelta(hours=1)
    assert s.tick() == []  # the same due time never fires twice
    clock.advance(hours=1)
    (second,) = s.tick()  # the first run has no worker here: it is still running
    assert second.outcome == "skipped" and f"run {first.run_id}" in (second.note or "")
    end_runs(sdb)
    clock.advance(hours=1)
    (third,) = s.tick()
    assert third.outcome == "started"
    assert runs_of(sdb, "hourly") == [(first.run_id, "started"), (third.run_id, "started")]
    with sdb.connect() as conn:
        row = store.get(conn, "hourly")
        total = fetch_all(
            conn, sa.text("SELECT total_items FROM runs WHERE id = :r"), {"r": third.run_id}
        )
    assert row is not None and row.next_due_at == T0 + timedelta(hours=4)
    assert total[0][0] == 40  # planned from the ID file like a run by hand


def test_overlap_queue_waits_for_the_previous_run_then_fires_once(
    sdb: Database, world: SimWorld, tmp_path: Path
) -> None:
    clock = Clock(T0)
    add_schedule(sdb, "q", job(world, tmp_path), Timing(every_s=600), "queue", now=clock())
    s = Scheduler(sdb, Settings(), "test", now=clock)
    clock.advance(minutes=10)
    (started,) = s.tick()
    assert started.outcome == "started"
    clock.advance(minutes=35)  # three more due times pass while the first run goes on
    assert s.tick() == []
    with sdb.connect() as conn:
        row = store.get(conn, "q")
    assert row is not None and row.next_due_at == T0 + timedelta(minutes=20)  # kept, waiting
    end_runs(sdb)
    with sdb.begin() as conn:  # it ended just now: waiting was not downtime
        conn.execute(sa.text("UPDATE runs SET finished_at = :t"), {"t": clock()})
    (queued,) = s.tick()
    assert queued.outcome == "started" and queued.note is None
    assert s.tick() == []  # the coalesced due times do not fire again
    assert len(runs_of(sdb, "q")) == 2


@pytest.mark.parametrize("missed", ["once", "skip"])
def test_downtime_fires_once_or_records_missed_never_a_burst(
    sdb: Database, world: SimWorld, tmp_path: Path, missed: str
) -> None:
    clock = Clock(T0)
    add_schedule(sdb, "m", job(world, tmp_path), Timing(every_s=600), missed=missed, now=clock())
    clock.advance(days=1)  # 144 due times passed with no scheduler running
    fired = Scheduler(sdb, Settings(), "test", now=clock).tick()
    assert len(fired) == 1
    if missed == "once":
        assert fired[0].outcome == "started" and "late" in (fired[0].note or "")
        assert len(runs_of(sdb, "m")) == 1
    else:
        assert fired[0].outcome == "missed" and fired[0].run_id is None
        assert runs_of(sdb, "m") == []
    with sdb.connect() as conn:
        row = store.get(conn, "m")
    assert row is not None and row.next_due_at == clock() + timedelta(minutes=10)


def test_a_job_that_cannot_start_is_recorded_and_the_schedule_moves_on(
    sdb: Database, world: SimWorld, tmp_path: Path
) -> None:
    clock = Clock(T0)
    j = job(world, tmp_path)
    add_schedule(sdb, "gone", j, Timing(every_s=60), now=clock())
    Path(j.params["ids_file"]).unlink()
    clock.advance(minutes=1)
    (fired,) = Scheduler(sdb, Settings(), "test", now=clock).tick()
    assert fired.outcome == "error" and "no such file" in (fired.note or "").lower()
    with sdb.connect() as conn:
        (f,) = store.fires(conn, "gone")
        row = store.get(conn, "gone")
    assert f.outcome == "error" and f.run_id is None
    assert row is not None and row.next_due_at == clock() + timedelta(minutes=1)


def test_disable_then_enable_counts_from_now(
    sdb: Database, world: SimWorld, tmp_path: Path
) -> None:
    clock = Clock(T0)
    add_schedule(sdb, "d", job(world, tmp_path), Timing(every_s=60), now=clock())
    set_enabled(sdb, "d", False)
    clock.advance(days=7)
    assert Scheduler(sdb, Settings(), "test", now=clock).tick() == []
    row = set_enabled(sdb, "d", True, now=clock())
    assert row.next_due_at == clock() + timedelta(minutes=1)
    with pytest.raises(ScheduleError, match="exists already"):
        add_schedule(sdb, "d", job(world, tmp_path), Timing(every_s=60))
    with pytest.raises(ScheduleError, match="use letters"):
        add_schedule(sdb, "no spaces", job(world, tmp_path), Timing(every_s=60))


def test_two_schedulers_on_one_postgresql_fire_each_due_time_once(
    pg_url: str, world: SimWorld, tmp_path: Path
) -> None:
    from engine.jobs import components

    dbs = [open_database(pg_url, components=components()) for _ in range(2)]
    try:
        clock = Clock(T0)
        add_schedule(dbs[0], "race", job(world, tmp_path, 10), Timing(every_s=60), now=clock())
        schedulers = [Scheduler(d, Settings(), f"s{i}", now=clock) for i, d in enumerate(dbs)]
        for _ in range(12):
            clock.advance(minutes=1)
            end_runs(dbs[0])  # each round's previous run is over: every round may fire
            barrier = threading.Barrier(2)
            results: list[Any] = [None, None]

            def go(i: int, b: threading.Barrier = barrier, out: list[Any] = results) -> None:
                b.wait(10)
                out[i] = schedulers[i].tick()

            threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sum(len(r) for r in results) == 1, results
        assert len(runs_of(dbs[0], "race")) == 12
    finally:
        for d in dbs:
            d.dispose()


# --- the CLI, end to end -------------------------------------------------------------------


def test_cli_add_list_run_now_and_scheduler_once(
    world: SimWorld, tmp_path: Path, db_url: str
) -> None:
    ids = subset(world, tmp_path, 60)
    rel = os.path.relpath(ids, ROOT)  # made absolute: the scheduler may run elsewhere
    job_argv = ["backfill", "--ids", rel, "--url-template", world.api_template,
                "--rate-limit", "200/1s", "--header", "Authorization=env:SIM_API_TOKEN",
                "--rate-margin", "0.5"]  # fmt: skip
    db = ["--db", db_url]
    bad = cli_here("schedule", "add", "b", "--every", "1m", *db, "--", "backfill", "--ids", rel,
              "--url-template", "nope", "--rate-limit", "200/1s")  # fmt: skip
    assert bad.returncode == 2 and "--url-template" in bad.stderr, bad.stderr
    not_a_job = cli_here(
        "schedule", "add", "x", "--every", "1m", *db, "--", "export", "--table", "runs"
    )
    assert not_a_job.returncode == 2 and "is not a job" in not_a_job.stderr
    resume = cli_here(
        "schedule", "add", "x", "--every", "1m", *db, "--", "backfill", "--resume", "3"
    )
    assert resume.returncode == 2 and "resume one by hand" in resume.stderr

    added = cli("schedule", "add", "nightly", "--cron", "0 3 * * *", "--tz", "Europe/Berlin",
                *db, "--json", "--", *job_argv)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["when"] == "cron 0 3 * * * (Europe/Berlin)"
    listed = json.loads(cli_here("schedule", "list", *db, "--json").stdout)
    assert [s["name"] for s in listed] == ["nightly"]
    assert str(ids) in listed[0]["command"] or rel in listed[0]["command"]

    now = cli("schedule", "run-now", "nightly", *db, "--workers", "1", "--json", timeout=180)
    assert now.returncode == 0, now.stderr
    summary = json.loads(now.stdout)
    assert summary["status"] == "completed"
    assert_exactly_the_input(db_url, summary["run_id"], ids.read_text().split())

    # an interval schedule that is due: `scheduler --once` fires it and waits for the run
    quick = cli_here("schedule", "add", "quick", "--every", "1s", *db, "--", *job_argv)
    assert quick.returncode == 0, quick.stderr
    deadline = time.monotonic() + 30
    while True:  # due one second after it was added (the database's rows say when)
        listed = json.loads(cli_here("schedule", "list", *db, "--json").stdout)
        due = {s["name"]: s["next_due_at"] for s in listed}["quick"]
        if datetime.fromisoformat(due.rstrip("Z")) <= utcnow():
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    once = cli("scheduler", "--once", *db, "--workers", "1", "--json", timeout=180)
    assert once.returncode == 0, once.stderr
    (fired,) = json.loads(once.stdout)
    assert fired["schedule"] == "quick" and fired["outcome"] == "started"
    assert_exactly_the_input(db_url, fired["run_id"], ids.read_text().split())
    listed = {s["name"]: s for s in json.loads(cli_here("schedule", "list", *db, "--json").stdout)}
    assert listed["quick"]["last_fires"][0]["run_status"] == "completed"
    assert listed["nightly"]["last_fires"][0]["note"] == "run now"
    assert cli_here("schedule", "disable", "quick", *db).returncode == 0
    assert cli_here("schedule", "remove", "quick", *db).returncode == 0
    gone = cli_here("schedule", "remove", "quick", *db)
    assert gone.returncode == 2 and "no schedule 'quick'" in gone.stderr


def test_scheduler_killed_mid_fire_leaves_exactly_one_run_failed_with_why(
    pg_url: str, world: SimWorld, tmp_path: Path
) -> None:
    """kill -9 while the fired run is planning (a large ID file): the fire and its one run
    exist; the next scheduler marks that run failed with the reason and starts no other."""
    from engine.jobs import components

    big = tmp_path / "big.txt"
    big.write_text("".join(f"u{i}\n" for i in range(400_000)))
    argv = ["backfill", "--ids", str(big), "--url-template", world.api_template,
            "--rate-limit", "200/1s"]  # fmt: skip
    assert (
        cli("schedule", "add", "big", "--every", "1s", "--db", pg_url, "--", *argv).returncode == 0
    )
    db = open_database(pg_url, components=components())
    try:
        deadline = time.monotonic() + 30
        while True:
            with db.connect() as conn:
                row = store.get(conn, "big")
            if row is not None and row.next_due_at is not None and row.next_due_at <= utcnow():
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.run", "scheduler", "--db", pg_url, "--workers", "0"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not runs_of(db, "big"):  # the fire and its run are committed: planning
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the schedule did not fire"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(30)
        ((run_id, _),) = runs_of(db, "big")
        with db.connect() as conn:
            status = fetch_all(
                conn, sa.text("SELECT status FROM runs WHERE id = :r"), {"r": run_id}
            )
        assert status[0][0] == "queued"  # cut off while planning
        recovered = Scheduler(db, Settings(), "next").recover()
        assert recovered == [run_id]
        with db.connect() as conn:
            status, error = fetch_all(
                conn, sa.text("SELECT status, error FROM runs WHERE id = :r"), {"r": run_id}
            )[0]
            n_runs = fetch_all(conn, sa.text("SELECT count(*) FROM runs"))[0][0]
        assert status == "failed" and "planning was cut off" in error
        assert n_runs == 1
    finally:
        db.dispose()


# --- the console's Schedules page ----------------------------------------------------------


def test_console_schedules_page_adds_runs_now_disables_and_deletes(
    world: SimWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from console.resources import get_console, shutdown_all
    from console.testing import run_page, use_fresh_database
    from engine.api import wait_run

    monkeypatch.setenv("FETCHFLEET_HEARTBEAT_S", "0.5")
    url = use_fresh_database(tmp_path, monkeypatch, workers=1)
    ids = subset(world, tmp_path, 30)
    try:
        at = run_page("pages/schedules.py")
        assert "No schedule yet" in at.info[0].value
        at.text_input(key="sched_name").set_value("bad name")
        at.text_input(key="sched_when").set_value("61 * * * *")
        at.text_input(key="sched_cmd").set_value("backfill --ids nowhere.txt")
        at.form_submit_button(key="sched_add").click().run()
        errors = " | ".join(e.value for e in at.error)
        assert "When: cron '61 * * * *' is not a cron expression" in errors
        assert "Job: " in errors and "--url-template" in errors  # the kind's own message

        command = (
            f"backfill --ids {ids} --url-template {world.api_template} --rate-limit 200/1s "
            "--header Authorization=env:SIM_API_TOKEN --rate-margin 0.5"
        )
        at.text_input(key="sched_when").set_value("0 3 * * *")
        at.text_input(key="sched_cmd").set_value(command)
        at.form_submit_button(key="sched_add").click().run()
        assert "Name: schedule name 'bad name'" in " | ".join(e.value for e in at.error)
        at.text_input(key="sched_name").set_value("nightly")
        at.form_submit_button(key="sched_add").click().run()
        assert at.success[0].value == "added schedule nightly"
        table = at.dataframe[0].value
        assert list(table["name"]) == ["nightly"] and table["when"][0] == "cron 0 3 * * * (UTC)"

        at.button(key="sched_run_now").click().run()
        started = [s.value for s in at.success if "started" in s.value]
        assert started, [s.value for s in at.success]
        run_id = int(started[0].split()[1])
        c = get_console(url)
        summary = wait_run(c.db, run_id, timeout_s=120, sleep=c.coordinator.wait_settled)
        assert summary["status"] == "completed"
        assert summary["counts"]["total"] == summary["counts"]["done"] == 30

        at.button(key="sched_toggle").click().run()
        assert at.dataframe[0].value["enabled"][0] == False  # noqa: E712
        at.run()
        fires = at.dataframe[1].value
        assert list(fires["run"]) == [run_id] and fires["note"][0] == "run now"
        at.button(key="sched_delete").click().run()
        assert "No schedule yet" in at.info[0].value
    finally:
        shutdown_all()

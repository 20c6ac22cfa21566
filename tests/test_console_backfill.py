"""The console's Backfill page (AppTest) against the sim's rate-limited API: bad input is
refused field by field, Start creates a run that completes under the limit, the report and
the live rate against the limit line are shown, a secret given by variable name never shows.

Skipped while the engine has no ``backfill`` job kind (the page then says it arrives later).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console import reads
from console.resources import get_console, shutdown_all
from console.testing import run_page, use_fresh_database
from engine.api import wait_run
from sim.world import SimWorld, WorldConfig

TOKEN = "console-s3cret-4711"
VAR = "FF_CONSOLE_API_TOKEN"
PAGE = "pages/backfill.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    from sim.api import ApiConfig

    out = tmp_path_factory.mktemp("api")
    api = ApiConfig(limit=100, window_s=1.0, token=TOKEN, seed=9)
    with SimWorld(WorldConfig(n_proxies=0, api=api, ids=120, seed=9, out_dir=out)) as w:
        yield w


@pytest.fixture
def console_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("FETCHFLEET_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("FETCHFLEET_CONCURRENCY", "20")
    monkeypatch.setenv(VAR, f"Bearer {TOKEN}")  # pool workers inherit it at spawn
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=1)
    finally:
        shutdown_all()


def errors_of(at: Any) -> str:
    return " | ".join(e.value for e in at.error)


def start(at: Any) -> Any:
    return at.form_submit_button(key="bf_start").click().run()


def test_backfill_form_refuses_bad_input(console_env: str, world: SimWorld) -> None:
    at = run_page(PAGE)
    assert not at.exception and at.title[0].value == "Backfill"
    at.radio(key="bf_source").set_value("Paste IDs").run()
    at.text_input(key="bf_template").set_value("http://127.0.0.3:1/users")
    at.text_input(key="bf_rate").set_value("abc")
    at.text_area(key="bf_headers").set_value("Authorization=Bearer abc\n")
    at.number_input(key="bf_timeout").set_value(0)
    start(at)
    errs = errors_of(at)
    assert "the ID list is empty" in errs
    assert "put {id} where the ID goes" in errs
    assert "write N/period" in errs
    assert "env:VARIABLE" in errs  # a literal credential is refused
    assert "the timeout must be more than 0" in errs
    at.text_area(key="bf_headers").set_value("X-Api-Key=env:FF_CONSOLE_UNSET\n")
    start(at)
    assert "FF_CONSOLE_UNSET is not set" in errors_of(at)

    at.radio(key="bf_source").set_value("Upload an ID file").run()
    at.file_uploader(key="bf_upload").set_value(("ids.bin", b"\x00\x01\x02\x03", "x"))
    start(at)
    assert "is not text" in errors_of(at)
    at.file_uploader(key="bf_upload").set_value(("ids.csv", b"name,did\nx,1\n", "text/csv"))
    at.text_input(key="bf_template").set_value(world.api_template)
    at.text_input(key="bf_rate").set_value("50/1s")
    at.text_area(key="bf_headers").set_value(f"Authorization=env:{VAR}")
    at.number_input(key="bf_timeout").set_value(5.0)
    start(at)
    assert "name the column that holds the IDs" in errors_of(at)
    at.text_input(key="bf_id_column").set_value("id")
    start(at)  # the job's own check: the column is not in the header
    assert "not in the header" in errors_of(at)
    assert not at.exception
    with get_console(console_env).db.connect() as conn:
        from storage import dashboard as dash

        assert dash.runs_by_status(conn) == {}  # nothing started


def test_backfill_start_runs_under_the_limit_and_reports(console_env: str, world: SimWorld) -> None:
    world.api_reset()
    ids = world.ids_file.read_bytes()
    n = len(ids.split())
    at = run_page(PAGE)
    at.file_uploader(key="bf_upload").set_value(("ids.txt", ids, "text/plain"))
    at.text_input(key="bf_template").set_value(world.api_template)
    at.text_input(key="bf_rate").set_value("80/1s")
    at.text_area(key="bf_headers").set_value(f"Authorization=env:{VAR}")
    at.number_input(key="bf_batch").set_value(20)
    at.number_input(key="bf_timeout").set_value(5.0)
    start(at)
    assert not errors_of(at), errors_of(at)
    assert "Run 1 started" in at.success[0].value
    db = get_console(console_env).db
    summary = wait_run(db, 1, poll_s=0.2, timeout_s=90)
    assert summary["status"] == "completed", summary
    assert summary["counts"]["total"] == summary["counts"]["done"] == n
    assert world.api_stats()["rate_limited"] == 0, "the API never answered 429"

    reads.st.cache_data.clear()
    at.run()
    shown = {m.label: m.value for m in at.metric}
    assert shown["fetched"] == f"{n:,} / {n:,}"
    assert shown["ok"] == f"{summary['counts']['ok']:,}"
    report = at.code[0].value
    assert "run 1 (backfill): completed" in report and "80/1s" in report
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert chart["layout"]["shapes"][0]["y0"] == 80.0  # the limit line
    everything = " ".join(str(getattr(e, "value", "")) for e in at.main)
    assert TOKEN not in everything and os.environ[VAR] not in everything
    with db.connect() as conn:
        from storage.runs import get_run

        run = get_run(conn, 1)
    assert run is not None and TOKEN not in json.dumps(run.params)
    assert run.params["headers"] == [{"name": "Authorization", "env": VAR}]


def test_schedule_this_keeps_the_checked_job_and_its_fire_completes(
    console_env: str, world: SimWorld
) -> None:
    """Backfill page → "Schedule this…" → Schedules page with the job pending → a schedule;
    the uploaded list outlives a run that used it (it moved out of data/uploads), so a
    second fire still has it."""
    from engine.schedules.scheduler import Scheduler

    world.api_reset()
    ids = world.ids_file.read_bytes()
    at = run_page(PAGE)
    at.file_uploader(key="bf_upload").set_value(("ids.txt", ids, "text/plain"))
    at.text_input(key="bf_template").set_value(world.api_template)
    at.text_input(key="bf_rate").set_value("80/1s")
    at.text_area(key="bf_headers").set_value(f"Authorization=env:{VAR}")
    at.form_submit_button(key="bf_schedule").click().run()
    assert not errors_of(at), errors_of(at)
    assert at.title[0].value == "Schedules"
    at.switch_page("pages/schedules.py").run()  # AppTest's next run would be the old page's
    assert "Scheduling the job from its page: backfill (from the console)" in at.info[-1].value
    at.text_input(key="sched_name").set_value("nightly-ids")
    at.text_input(key="sched_when").set_value("0 3 * * *")
    at.form_submit_button(key="sched_add").click().run()
    assert at.success and at.success[0].value == "added schedule nightly-ids", (
        at.title[0].value,
        errors_of(at),
        [i.value for i in at.info],
    )
    assert not [i for i in at.info if "Scheduling the job" in i.value]  # no longer pending

    c = get_console(console_env)
    with c.db.connect() as conn:
        from storage import dashboard as dash
        from storage.schedules import get

        assert dash.runs_by_status(conn) == {}  # scheduled, not started
        row = get(conn, "nightly-ids")
    assert row is not None and "/scheduled/" in row.params["ids_file"]
    assert TOKEN not in json.dumps(row.params)
    for expected_run in (1, 2):  # the list is still there for the second fire
        fired = Scheduler(c.db, c.settings, c.coordinator.name).fire("nightly-ids", True)
        assert fired is not None and fired.run_id == expected_run, fired
        summary = wait_run(c.db, expected_run, poll_s=0.2, timeout_s=90)
        assert summary["status"] == "completed", summary
        assert summary["counts"]["done"] == len(ids.split())
    assert Path(row.params["ids_file"]).exists()

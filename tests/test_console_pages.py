"""Every console page under Streamlit's AppTest: empty and with data, forms that refuse bad
input field by field, Start creating real runs against the sim world, run and pool commands.

Each test has its own DuckDB file; the console's engine is released after each test (no
worker process outlives it). The sim world is shared by the module.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from console import reads
from console.resources import get_console, shutdown_all
from console.testing import PAGES, run_page, seed_history, use_fresh_database
from engine.api import wait_run
from sim.world import SimWorld, WorldConfig
from storage import dashboard as dash
from storage import queue as q
from storage import runs as run_store
from storage.bulk import fetch_all
from storage.db import open_database


@pytest.fixture
def console_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=0)
    finally:
        shutdown_all()


@pytest.fixture
def pool_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A console with a real local pool (one worker, quick heartbeats)."""
    monkeypatch.setenv("FETCHFLEET_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("FETCHFLEET_CONCURRENCY", "50")
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=1)
    finally:
        shutdown_all()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("world")
    with SimWorld(WorldConfig(n_proxies=30, mix="demo", seed=11, out_dir=out)) as w:
        yield w


def seeded(url: str, **kw: Any) -> dict[str, int]:
    db = open_database(url)
    try:
        return seed_history(db, **{"proxies": 300, "runs": 3, "errors": 40, **kw})
    finally:
        db.dispose()


def errors_of(at: Any) -> list[str]:
    return [e.value for e in at.error]


def run_count(url: str) -> int:
    with get_console(url).db.connect() as conn:
        return sum(dash.runs_by_status(conn).values())


# --- every page ----------------------------------------------------------------------------


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_on_an_empty_database(console_env: str, page: str) -> None:
    at = run_page(PAGES[page])
    assert not at.exception, at.exception
    assert at.title[0].value in (page, "Fleet at a glance")
    assert not errors_of(at)


EXPECTED_WITH_DATA = {
    "Home": lambda at: {m.label: m.value for m in at.metric}["proxies"] == "300",
    "Validation": lambda at: (
        "300 proxies match" in at.caption[0].value
        and len(at.dataframe[0].value) == 50
        and "password_enc" not in at.dataframe[0].value.columns
        # each proxy's history: the seed's 3 checks of every proxy, and one proxy's chart
        and set(at.dataframe[0].value["checks_n"]) == {3}
        and at.dataframe[0].value["reliability"].notna().all()
        and at.selectbox(key="pool_history_proxy").value == at.dataframe[0].value["key"][0]
        and any("last checks and uses" in str(c.proto.spec) for c in at.get("plotly_chart"))
    ),
    "Workers": lambda at: set(at.dataframe[0].value["worker"]) == {f"w-{i}" for i in range(4)},
    "Runs & errors": lambda at: (
        list(at.dataframe[0].value["run"]) == [3, 2, 1]
        and any("bad_input" in e.label for e in at.expander)
    ),
    "Data & export": lambda at: (
        len(at.dataframe[0].value) == 50 and "password_enc" not in at.dataframe[0].value.columns
    ),
    "Settings": lambda at: "console.duckdb" in at.code[0].value,
    # The seed has no schedules: the page lists none and offers its form.
    "Schedules": lambda at: (
        any("No schedule yet" in i.value for i in at.info)
        and "Add schedule" in [b.label for b in at.get("form_submit_button")]
    ),
    "Alerts": lambda at: (
        any("No alert yet" in i.value for i in at.info)
        and "Add alert" in [b.label for b in at.get("form_submit_button")]
    ),
    # Not started: the page offers its Start form.
    "Gateway": lambda at: (
        at.title[0].value == "Gateway"
        and "Start gateway" in [b.label for b in at.get("form_submit_button")]
    ),
    # Seeded with validate runs only: the job pages offer their Start form and say so.
    "Scraping": lambda at: (
        at.title[0].value == "Scraping"
        and any("No scrape run yet" in i.value for i in at.info)
        and "Start" in [b.label for b in at.get("form_submit_button")]
    ),
    "Backfill": lambda at: (
        at.title[0].value == "Backfill"
        and any("No backfill run yet" in i.value for i in at.info)
        and "Start" in [b.label for b in at.get("form_submit_button")]
    ),
}


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_with_data(console_env: str, page: str) -> None:
    seeded(console_env)
    at = run_page(PAGES[page])
    assert not at.exception, at.exception
    assert EXPECTED_WITH_DATA[page](at)


# --- validation: bad input -----------------------------------------------------------------


def start(at: Any) -> Any:
    return at.form_submit_button(key="val_start").click().run()


def test_validation_form_refuses_bad_input_field_by_field(console_env: str) -> None:
    at = run_page("pages/validation.py")
    at.text_input(key="val_judge").set_value("http://127.0.0.1:9/get")
    start(at)  # nothing pasted
    assert any("the proxy list is empty" in e for e in errors_of(at))
    assert any("Nothing was started" in e for e in errors_of(at))

    at.text_area(key="val_paste").input("1.2.3.4:8080")
    at.text_input(key="val_judge").set_value("")
    start(at)
    assert any("a judge URL is required" in e for e in errors_of(at))
    at.text_input(key="val_judge").set_value("ftp://judge")
    start(at)
    assert any("is not an http(s) URL" in e for e in errors_of(at))
    at.text_input(key="val_judge").set_value("http://127.0.0.1:9/get")
    at.text_input(key="val_canary").set_value("https://canary.example/")
    start(at)
    assert any("is not a plain http:// URL (or 'off')" in e for e in errors_of(at))
    at.text_input(key="val_canary").set_value("off")

    at.number_input(key="val_timeout").set_value(0)
    at.number_input(key="val_batch").set_value(0)
    at.number_input(key="val_workers").set_value(0)
    at.number_input(key="val_conc").set_value(0)
    start(at)
    errs = " | ".join(errors_of(at))
    assert "the timeout must be more than 0 seconds" in errs
    assert "batch size must be between 1" in errs
    assert "with DuckDB at least one local worker" in errs
    assert "concurrency must be between 1" in errs

    at.number_input(key="val_timeout").set_value(1.0)
    at.number_input(key="val_batch").set_value(10)
    at.number_input(key="val_workers").set_value(0 + 1)
    at.number_input(key="val_conc").set_value(10)
    at.text_area(key="val_paste").input("hello world\nnot a proxy either\n")
    start(at)
    assert any("no proxy found in the list: line 1" in e for e in errors_of(at))

    at.text_area(key="val_paste").input("1.2.3.4:8080\n")
    start(at)  # every field right, but the judge does not answer: prepare() says so
    assert any("did not answer a direct request" in e for e in errors_of(at))
    assert not at.exception
    assert run_count(console_env) == 0, "nothing may start on bad input"
    assert get_console(console_env).coordinator.pool.target == 0  # pool untouched


def test_validation_upload_refuses_what_is_not_a_text_list(console_env: str) -> None:
    at = run_page("pages/validation.py")
    at.radio(key="val_source").set_value("Upload a file").run()
    at.text_input(key="val_judge").set_value("http://127.0.0.1:9/get")
    start(at)
    assert any("choose a file to upload" in e for e in errors_of(at))
    at.file_uploader(key="val_upload").set_value(("list.bin", b"\x00\x01\x02PK\x03\x04", "x"))
    start(at)
    assert any("is not text" in e for e in errors_of(at))
    at.file_uploader(key="val_upload").set_value(("empty.txt", b"  \n\n", "text/plain"))
    start(at)
    assert any("is empty" in e for e in errors_of(at))

    at.radio(key="val_source").set_value("Revalidate stored proxies").run()
    at.number_input(key="val_minutes").set_value(-5)
    at.number_input(key="val_limit").set_value(-1)
    start(at)
    errs = " | ".join(errors_of(at))
    assert "minutes must be 0 or more" in errs and "the limit must be 0" in errs
    assert run_count(console_env) == 0


# --- validation: Start -----------------------------------------------------------------------


def wait_done(url: str, run_id: int) -> dict[str, Any]:
    summary = wait_run(get_console(url).db, run_id, poll_s=0.2, timeout_s=60)
    assert summary["status"] == "completed", summary
    reads.st.cache_data.clear()  # the next render reads fresh numbers
    return summary


def test_validation_start_creates_runs_that_complete(pool_env: str, world: SimWorld) -> None:
    n = len(world.truth)
    at = run_page("pages/validation.py")
    at.text_area(key="val_paste").input(world.proxies_file.read_text())
    at.text_input(key="val_judge").set_value(world.judge_url)
    at.number_input(key="val_timeout").set_value(2.0)
    at.number_input(key="val_batch").set_value(5)
    start(at)
    assert not at.exception and not errors_of(at), errors_of(at)
    assert "Run 1 started" in at.success[0].value
    uploads = list((get_console(pool_env).uploads_dir).glob("*pasted.txt"))
    assert len(uploads) == 1 and uploads[0].read_text() == world.proxies_file.read_text()

    summary = wait_done(pool_env, 1)
    at.run()
    shown = {m.label: m.value for m in at.metric}
    counts = summary["counts"]
    assert shown["checked"] == f"{n} / {n}" == f"{counts['done']} / {counts['total']}"
    assert shown["alive"] == str(counts["ok"]) and shown["status"] == "completed"
    assert f"{n} proxies match" in at.caption[0].value
    csv = reads.export_bytes(pool_env, "proxies", "csv", get_console(pool_env).exports_dir)
    lines = csv.decode().strip().splitlines()
    assert len(lines) == n + 1 and "password_enc" not in lines[0]
    active = reads.export_bytes(
        pool_env,
        "proxies",
        "parquet",
        get_console(pool_env).exports_dir,
        where={"status": "active"},
    )
    assert pq.read_table(io.BytesIO(active)).num_rows == counts["ok"]

    # the same list uploaded: a second run over the same (deduplicated) pool
    at.radio(key="val_source").set_value("Upload a file").run()
    at.file_uploader(key="val_upload").set_value(
        ("my proxies.txt", world.proxies_file.read_bytes(), "text/plain")
    )
    start(at)
    assert "Run 2 started" in at.success[0].value, errors_of(at)
    assert wait_done(pool_env, 2)["counts"]["total"] == n

    # revalidate what is alive, by filter
    at.radio(key="val_source").set_value("Revalidate stored proxies").run()
    at.number_input(key="val_minutes").set_value(0.0)
    at.selectbox(key="val_status").set_value("active")
    start(at)
    assert "Run 3 started" in at.success[0].value, errors_of(at)
    alive_before = wait_done(pool_env, 2)["counts"]["ok"]
    assert wait_done(pool_env, 3)["counts"]["total"] == alive_before


# --- runs: commands --------------------------------------------------------------------------


def test_runs_page_stop_pause_resume_cancel(console_env: str) -> None:
    db = open_database(console_env)
    with db.begin() as conn:
        run_id = run_store.create_run(conn, "validate", {"judge_url": "x"}, "t")
        q.add_tasks(conn, run_id, [[1, 2], [3, 4]], 0, 3)
        run_store.add_planned(conn, run_id, 4, 2)
        run_store.start_run(conn, run_id)
    db.dispose()
    at = run_page("pages/runs.py")
    assert at.button(key="run_stop").disabled is False
    assert at.button(key="run_resume").disabled is True

    def status() -> str:
        with get_console(console_env).db.connect() as conn:
            return fetch_all(conn, sa.text("SELECT status FROM runs WHERE id = 1"))[0][0]

    at.button(key="run_pause").click().run()
    assert status() == "paused" and "pause → paused" in at.success[0].value
    reads.st.cache_data.clear()
    at.run()
    at.button(key="run_resume").click().run()
    assert status() == "running"
    reads.st.cache_data.clear()
    at.run()
    at.button(key="run_stop").click().run()
    deadline = time.monotonic() + 10  # no task is leased: the watchdog settles it
    while status() != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status() == "stopped"
    reads.st.cache_data.clear()
    at.run()
    assert at.button(key="run_pause").disabled is True
    at.button(key="run_cancel").click().run()
    assert status() == "cancelled"
    with get_console(console_env).db.connect() as conn:
        tasks = dict(fetch_all(conn, sa.text("SELECT status, count(*) FROM tasks GROUP BY 1")))
        cmds = fetch_all(conn, sa.text("SELECT action, source FROM commands ORDER BY id"))
    assert tasks == {"cancelled": 2}
    assert [tuple(c) for c in cmds] == [
        ("pause", "console"),
        ("resume", "console"),
        ("stop", "console"),
        ("cancel", "console"),
    ]


# --- workers: pool controls ------------------------------------------------------------------


def test_workers_page_resizes_the_pool_and_stops_a_worker(pool_env: str) -> None:
    coord = get_console(pool_env).coordinator
    at = run_page("pages/workers.py")
    at.number_input(key="pool_size").set_value(0)
    at.number_input(key="pool_conc").set_value(0)
    at.form_submit_button(key="pool_apply").click().run()
    errs = " | ".join(errors_of(at))
    assert "keep at least 1" in errs and "concurrency must be between 1" in errs
    assert coord.pool.target == 1 and coord.settings.concurrency == 50

    at.number_input(key="pool_size").set_value(2)
    at.number_input(key="pool_conc").set_value(20)
    at.form_submit_button(key="pool_apply").click().run()
    assert "pool: 2 worker(s) × 20 concurrent" in at.success[0].value
    assert coord.pool.target == 2 and coord.settings.concurrency == 20
    assert len(coord.pool.active()) == 2

    deadline = time.monotonic() + 30  # workers register and heartbeat
    while time.monotonic() < deadline:
        reads.st.cache_data.clear()
        at.run()
        frame = at.dataframe[0].value if at.dataframe else None
        if frame is not None and (frame["status"].isin(["idle", "busy"])).sum() >= 2:
            break
        time.sleep(0.3)
    alive = [w for w in frame["worker"] if w in coord.pool.active()]
    assert len(alive) == 2, frame
    at.selectbox(key="workers_pick").set_value(alive[0])
    at.button(key="workers_stop").click().run()
    assert any("asked " + alive[0] in s.value for s in at.success)
    deadline = time.monotonic() + 30
    while alive[0] in coord.pool.members and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive[0] not in coord.pool.members, "the stopped worker exits"
    assert any("the pool is now 1 worker(s)" in s.value for s in at.success)
    assert coord.pool.target == 1 and at.number_input(key="pool_size").value == 1
    time.sleep(2.5)  # two watchdog rounds: the stopped worker is not replaced
    assert len(coord.pool.active()) == 1


# --- data & settings -------------------------------------------------------------------------


def test_data_page_previews_tables_and_runs(console_env: str) -> None:
    seeded(console_env)
    at = run_page("pages/data.py")
    assert "300 rows in proxies (all runs)" in at.caption[0].value
    at.selectbox(key="data_run").set_value(2).run()
    assert "300 rows in proxies (run 2)" in at.caption[0].value
    at.selectbox(key="data_table").set_value("proxy_checks").run()
    assert "300 rows in proxy_checks (run 2)" in at.caption[0].value
    assert set(at.dataframe[0].value["run_id"]) == {2}
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download Parquet"]
    at.selectbox(key="data_table").set_value("workers").run()
    assert "has no run to filter by" in at.warning[0].value
    assert at.get("download_button") == [], "no download of a filter that cannot apply"


def test_pages_work_on_postgresql_and_hide_secrets(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.fernet import Fernet

    use_fresh_database(tmp_path, monkeypatch, workers=0)
    url = pg_url.replace("://postgres@", "://postgres:hunter2@")
    monkeypatch.setenv("FETCHFLEET_DB", url)
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("FETCHFLEET_SECRET_KEY", key)
    try:
        for page in PAGES.values():
            at = run_page(page)
            assert not at.exception, (page, at.exception)
            text = " ".join(str(getattr(e, "value", "")) for e in at.main)
            assert "hunter2" not in text and key not in text
        at = run_page("pages/settings.py")
        assert "***" in at.code[0].value and "hunter2" not in at.code[0].value
        rows = at.dataframe[0].value
        assert rows.loc[rows["setting"] == "secret_key", "value"].item() == "set (hidden)"
    finally:
        shutdown_all()

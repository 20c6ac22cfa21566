"""The console's Scraping page (AppTest) and the scrape parts of the Runs and Home pages:
renders empty and with data, refuses a spec that does not parse (with line and column) and a
country the spec has no source for, Start creates a scrape run that completes against the sim
shops, Stop / Resume act on the selected run, the entities table pages in SQL and exports with
attributes as columns, the Runs page shows a scrape run's fetch log statistics.

Skipped while the engine has no ``scrape`` job kind (the page then says it arrives later).
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from console import forms, reads
from console.resources import get_console, shutdown_all
from console.testing import ROOT, run_page, seed_history, seed_scrape_history, use_fresh_database
from engine.api import wait_run
from engine.jobs import item_logs
from storage import dashboard as dash
from storage import queue as q
from storage import runs as run_store
from storage.bulk import fetch_all
from storage.db import open_database
from storage.export import export, export_entities

PAGE = "pages/scraping.py"
EXAMPLE = ROOT / "specs" / "sim_shops.toml"


@pytest.fixture
def console_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=0)
    finally:
        shutdown_all()


@pytest.fixture
def pool_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("FETCHFLEET_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("FETCHFLEET_CONCURRENCY", "8")
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=1)
    finally:
        shutdown_all()


@pytest.fixture(scope="module")
def shops() -> Iterator[Any]:
    from sim.shops import ShopsConfig, ShopSpec, ShopWorld

    cfg = ShopsConfig(
        (
            ShopSpec("my-pharmacy", "Malaysia", "none", n_products=60, seed=3),
            ShopSpec("in-market", "India", "none", n_products=40, seed=3),
        )
    )
    with ShopWorld(cfg) as world:
        yield world


def seeded(url: str) -> None:
    db = open_database(url)
    try:
        seed_history(db, proxies=100, runs=2, errors=10)
        seed_scrape_history(db, runs=3, pages_per_run=100, entities=500, fetch_logs=1_000)
    finally:
        db.dispose()


def errors_of(at: Any) -> str:
    return " | ".join(e.value for e in at.error)


def start(at: Any) -> Any:
    return at.form_submit_button(key="sc_start").click().run()


def runs_of(url: str) -> list[tuple[Any, ...]]:
    with get_console(url).db.connect() as conn:
        return [tuple(r) for r in fetch_all(conn, sa.text("SELECT id, kind, status FROM runs"))]


def example_for(shops: Any) -> str:
    """specs/sim_shops.toml with the running shops' ports (as the README says to edit it)."""
    text = EXAMPLE.read_text()
    text = text.replace("http://127.0.0.4:8401", shops["my-pharmacy"].base_url)
    return text.replace("http://127.0.0.4:8403", shops["in-market"].base_url)


# --- renders ---------------------------------------------------------------------------------


def test_renders_on_an_empty_database_with_the_example_spec(console_env: str) -> None:
    at = run_page(PAGE)
    assert not at.exception, at.exception
    assert at.title[0].value == "Scraping"
    assert at.selectbox(key="sc_file").value == "sim_shops.toml"
    assert at.text_area(key="sc_text").value == EXAMPLE.read_text()
    assert at.selectbox(key="sc_country").options == [forms.EVERY_SOURCE, "India", "Malaysia"]
    assert "No scrape run yet" in at.info[0].value
    assert not errors_of(at)


def test_renders_a_run_with_progress_charts_and_entities(console_env: str) -> None:
    seeded(console_env)
    at = run_page(PAGE)
    assert not at.exception, at.exception
    run_id = at.selectbox(key="sc_pick").value
    with get_console(console_env).db.connect() as conn:
        progress = dash.scrape_progress(conn, run_id)
        mix = dash.method_mix(conn, run_id)
        seen = dash.entity_count(conn, run_id)
    shown = {m.label: m.value for m in at.metric}
    assert shown["pages"] == "100 / 100"
    assert shown["done"] == f"{progress.done:,}"
    assert shown["success"] == f"{progress.done / 100:.0%}"
    assert shown["entities"].startswith(f"{seen:,} (")
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 3
    mix_chart = next(s for s in specs if "method won" in s["layout"]["title"]["text"])
    by_method = {t["name"]: dict(zip(t["x"], t["y"], strict=True)) for t in mix_chart["data"]}
    for country, method, n in mix:
        assert by_method[method][country] == n
    blocked = next(s for s in specs if "Blocked" in s["layout"]["title"]["text"])
    assert sum(sum(t["y"]) for t in blocked["data"]) > 0

    domains = at.dataframe[0].value  # the run's cost per domain, then its entities
    with get_console(console_env).db.connect() as conn:
        attempts = fetch_all(
            conn, sa.text("SELECT count(*) FROM fetch_logs WHERE run_id = :r"), {"r": run_id}
        )[0][0]
    assert list(domains["requests"]) == [attempts] and "browser-s saved" in domains
    frame = at.dataframe[-1].value
    assert len(frame) == 50
    assert {"external_id", "name", "price", "sku", "country"} <= set(frame.columns)
    assert f"{seen:,} entities seen last by run {run_id}" in at.caption[-1].value
    first_page = list(frame["entity_id"])
    at.session_state["sc_ent_page"] = 2
    at.run()
    second = list(at.dataframe[-1].value["entity_id"])
    assert len(second) == 50 and not set(first_page) & set(second)
    countries = at.selectbox(key="sc_ent_country").options[1:]
    assert len(countries) == 6
    at.selectbox(key="sc_ent_country").set_value(countries[1]).run()
    assert set(at.dataframe[-1].value["country"]) == {countries[1]}
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download Parquet"]


def test_entities_export_with_attributes_as_columns(console_env: str, tmp_path: Path) -> None:
    seeded(console_env)
    db = open_database(console_env)
    try:
        with db.connect() as conn:
            run_id = dash.run_stats(conn, item_logs(), limit=1, kind="scrape")[0].id
            n = dash.entity_count(conn, run_id, "FR")
        out = tmp_path / "e.csv"
        assert export_entities(db, "csv", out, run_id=run_id, country="FR") == n
        table = pacsv.read_csv(out)
        assert table.num_rows == n and set(table.column("country").to_pylist()) == {"FR"}
        assert {"entity_id", "external_id", "id", "name", "price", "sku"} <= set(table.column_names)
        assert table.column("id").to_pylist() == table.column("external_id").to_pylist()
        out = tmp_path / "e.parquet"
        export_entities(db, "parquet", out, run_id=run_id)
        with db.connect() as conn:
            seen = dash.entity_count(conn, run_id)
        assert pq.read_table(out).num_rows == seen
        # the plain tables filter by run too (Data & export)
        assert export(db, "entities", "csv", tmp_path / "x.csv", run_id=run_id) == seen
        attrs = export(db, "entity_attributes", "csv", tmp_path / "a.csv", run_id=run_id)
        assert attrs == 5 * seen
    finally:
        db.dispose()
    data = reads.entities_export_bytes(console_env, "csv", tmp_path / "exp", run_id, None)
    assert pacsv.read_csv(io.BytesIO(data)).num_rows > 0


# --- bad input -------------------------------------------------------------------------------


def test_refuses_a_spec_that_does_not_parse_with_line_and_column(console_env: str) -> None:
    at = run_page(PAGE)
    at.text_area(key="sc_text").set_value('name = "x"\ncountry = \nstart_urls = []\n').run()
    start(at)
    errs = errors_of(at)
    assert "not valid TOML" in errs and re.search(r"line \d+, column \d+", errs), errs
    assert "specs/sim_shops.toml: not valid TOML" in errs and "(at line 2, column 11)" in errs
    assert "Nothing was started" in errs

    bad_field = EXAMPLE.read_text().replace('type = "float"', 'type = "money"')
    at.text_area(key="sc_text").set_value(bad_field).run()
    start(at)
    assert "extract[0].fields.price: type 'money'" in errors_of(at)

    at.text_area(key="sc_text").set_value("").run()
    at.number_input(key="sc_batch").set_value(0)
    at.number_input(key="sc_workers").set_value(0)
    start(at)
    errs = errors_of(at)
    assert "the spec is empty" in errs and "batch size must be between" in errs
    assert "at least one local worker" in errs
    assert runs_of(console_env) == []
    assert not at.exception


def test_an_uploaded_spec_is_loaded_into_the_editor(console_env: str) -> None:
    at = run_page(PAGE)
    at.radio(key="sc_source").set_value("Upload a spec").run()
    assert at.text_area(key="sc_text").value == ""
    at.file_uploader(key="sc_upload").set_value(("spec.toml", b"\x00\x01\x02\x03", "x")).run()
    assert "is not text" in errors_of(at)
    text = EXAMPLE.read_text().replace('"Malaysia"', '"Brazil"')
    at.file_uploader(key="sc_upload").set_value(("mine.toml", text.encode(), "text/plain")).run()
    assert at.text_area(key="sc_text").value == text
    assert at.selectbox(key="sc_country").options == [forms.EVERY_SOURCE, "Brazil", "India"]
    assert not errors_of(at)


def test_refuses_a_country_the_spec_has_no_source_for(console_env: str) -> None:
    at = run_page(PAGE)
    box = at.selectbox(key="sc_country")
    box.options.append("Atlantis")  # what the browser sends when a new option is typed
    box.set_value("Atlantis")
    start(at)
    errs = errors_of(at)
    assert "'Atlantis' is not a country of this spec" in errs, errs
    assert "India, Malaysia" in errs
    assert runs_of(console_env) == []


def test_prepare_errors_are_shown_next_to_their_field(console_env: str) -> None:
    at = run_page(PAGE)
    at.number_input(key="sc_workers").set_value(1)
    at.selectbox(key="sc_proxies").set_value("stored proxies: active")
    start(at)  # the spec parses; there is no stored proxy
    assert "no stored proxy is active" in errors_of(at)
    assert runs_of(console_env) == []


# --- start, stop, resume -----------------------------------------------------------------------


def test_start_creates_a_scrape_run_that_completes(pool_env: str, shops: Any) -> None:
    at = run_page(PAGE)
    at.text_area(key="sc_text").set_value(example_for(shops)).run()
    at.multiselect(key="sc_methods").select("http")
    at.number_input(key="sc_batch").set_value(2)
    start(at)
    assert not errors_of(at), errors_of(at)
    assert "Run 1 started" in at.success[0].value
    db = get_console(pool_env).db
    summary = wait_run(db, 1, poll_s=0.2, timeout_s=120)
    assert summary["status"] == "completed", summary
    assert runs_of(pool_env) == [(1, "scrape", "completed")]
    pages = shops["my-pharmacy"].spec.pages + shops["in-market"].spec.pages
    assert summary["counts"]["done"] == summary["counts"]["ok"] == pages
    with db.connect() as conn:
        assert dash.entity_count(conn, 1) == 100
        assert {m for _, m, _ in dash.method_mix(conn, 1)} == {"http"}
        run = run_store.get_run(conn, 1)
    assert run is not None and run.params["methods"] == ["http"]

    reads.st.cache_data.clear()
    at.run()
    shown = {m.label: m.value for m in at.metric}
    assert shown["pages"] == f"{pages} / {pages}" and shown["success"] == "100%"
    assert shown["entities"] == "100 (100 new)"
    assert "100 entities seen last by run 1" in at.caption[-1].value
    assert at.button(key="sc_stop").disabled and at.button(key="sc_resume").disabled


def test_stop_and_resume_the_selected_run(console_env: str) -> None:
    db = open_database(console_env)
    with db.begin() as conn:
        run_id = run_store.create_run(conn, "scrape", {"spec_name": "t"}, "t")
        q.add_tasks(conn, run_id, [[1], [2]], 0, 3)
        run_store.add_planned(conn, run_id, 2, 2)
        run_store.start_run(conn, run_id)
    db.dispose()

    def status() -> str:
        with get_console(console_env).db.connect() as conn:
            return fetch_all(conn, sa.text("SELECT status FROM runs WHERE id = 1"))[0][0]

    at = run_page(PAGE)
    assert at.selectbox(key="sc_pick").value == run_id
    assert at.button(key="sc_stop").disabled is False
    assert at.button(key="sc_resume").disabled is True
    at.button(key="sc_stop").click().run()
    assert "stop →" in at.success[0].value
    deadline = time.monotonic() + 10  # no task is leased: the watchdog settles it
    while status() != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status() == "stopped"
    reads.st.cache_data.clear()
    at.run()
    assert at.button(key="sc_resume").disabled is False
    at.button(key="sc_resume").click().run()
    assert status() == "running"
    with get_console(console_env).db.connect() as conn:
        cmds = fetch_all(conn, sa.text("SELECT action, source FROM commands ORDER BY id"))
    assert [tuple(c) for c in cmds] == [("stop", "console"), ("resume", "console")]


# --- runs & home -------------------------------------------------------------------------------


def test_runs_page_shows_fetch_log_statistics_of_a_scrape_run(console_env: str) -> None:
    seeded(console_env)
    with get_console(console_env).db.connect() as conn:
        scrape_id = dash.run_stats(conn, item_logs(), limit=1, kind="scrape")[0].id
        validate_id = dash.run_stats(conn, item_logs(), limit=1, kind="validate")[0].id
        stats = dash.fetch_log_stats(conn, scrape_id)
    at = run_page("pages/runs.py")
    at.selectbox(key="runs_pick").set_value(scrape_id).run()
    assert not at.exception, at.exception
    assert any(f"{stats.attempts:,} attempt(s)" in m.value for m in at.markdown)
    frame = next(d.value for d in at.dataframe if "median ms" in d.value.columns)
    assert list(frame["method"]) == [m.method for m in stats.by_method]
    assert frame["attempts"].sum() == stats.attempts
    assert (frame["ok"] + frame["blocked"] + frame["other errors"] == frame["attempts"]).all()
    assert frame["median ms"].between(30, 3030).all()
    outcomes = next(
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if "method and outcome" in json.loads(c.proto.spec)["layout"]["title"]["text"]
    )
    assert {t["name"] for t in outcomes["data"]} >= {"ok", "blocked", "timeout"}
    runs = at.dataframe[0].value
    row = runs[runs["run"] == scrape_id].iloc[0]
    assert row["done"] == 100 and row["ok"] + row["failed"] == 100

    at.selectbox(key="runs_pick").set_value(validate_id).run()
    assert not any("Fetch log statistics" in m.value for m in at.markdown)


def test_home_counts_fetch_attempts_of_the_last_hour(console_env: str) -> None:
    seeded(console_env)
    with get_console(console_env).db.connect() as conn:
        hour = dash.fetch_activity(conn, dash.utcnow() - dash.timedelta(hours=1))
    at = run_page()
    assert not at.exception
    shown = {m.label: m.value for m in at.metric}
    assert shown["fetches last hour"] == f"{hour.attempts:,}" and hour.attempts > 0
    assert shown["blocked last hour"] == f"{hour.blocked:,}"
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in chart["data"]] == ["items/s", "fetch attempts/s"]
    assert len(chart["data"][1]["y"]) == 60


# --- the aggregates on both databases -----------------------------------------------------------


def test_scrape_aggregates_on_duckdb_and_postgresql(db: Any, tmp_path: Path) -> None:
    from storage.clock import utcnow
    from storage.schema import entities, entity_attributes, fetch_logs, urls

    now = utcnow()
    with db.begin() as conn:
        run_id = run_store.create_run(conn, "scrape", {"spec_name": "t"}, "t")
        conn.execute(
            sa.insert(urls),
            [
                {
                    "run_id": run_id,
                    "url": f"http://s/{i}",
                    "country": c,
                    "depth": 0,
                    "status": st,
                    "method": m,
                    "bytes": 100,
                    "fetched_at": None if st == "queued" else now,
                    "created_at": now,
                }
                for i, (c, st, m) in enumerate(
                    [
                        ("MY", "done", "http"),
                        ("MY", "done", "http"),
                        ("MY", "done", "playwright"),
                        ("IN", "done", "api"),
                        ("IN", "blocked", "http"),
                        ("IN", "queued", None),
                    ]
                )
            ],
        )
        ids = conn.execute(
            sa.insert(entities).returning(entities.c.id),
            [
                {
                    "entity_type": "product",
                    "country": "MY",
                    "external_id": f"P{i}",
                    "content_hash": "h",
                    "first_run_id": run_id,
                    "last_run_id": run_id,
                    "first_seen": now,
                    "last_seen": now,
                }
                for i in range(3)
            ],
        ).fetchall()
        conn.execute(
            sa.insert(entity_attributes),
            [
                {"entity_id": eid, "name": name, "value": f"{name}-{eid}", "value_type": "str"}
                for (eid,) in ids
                for name in ("id", "name", "country")
            ],
        )
        conn.execute(
            sa.insert(fetch_logs),
            [
                {
                    "run_id": run_id,
                    "url": "http://s/x",
                    "method": m,
                    "ms": ms,
                    "error_type": err,
                    "blocked_reason": reason,
                    "country": "MY",
                    "created_at": now,
                }
                for m, ms, err, reason in [
                    ("http", 10.0, None, None),
                    ("http", 20.0, None, None),
                    ("http", 30.0, "blocked", "captcha"),
                    ("http", 40.0, "blocked", "captcha"),
                    ("playwright", 100.0, None, None),
                    ("api", 5.0, "timeout", None),
                    ("playwright", 300.0, "blocked", "cf-challenge"),
                ]
            ],
        )
    with db.connect() as conn:
        p = dash.scrape_progress(conn, run_id)
        assert p.registered == 6 and p.fetched == 5 and p.done == 4
        assert p.success_ratio == 4 / 5 and p.pages_recent == 5
        assert p.entities_seen == p.entities_new == 3
        assert dash.method_mix(conn, run_id) == [
            ("IN", "api", 1), ("MY", "http", 2), ("MY", "playwright", 1)
        ]  # fmt: skip
        assert dash.blocked_reasons(conn, run_id) == [
            ("captcha", "http", 2), ("cf-challenge", "playwright", 1)
        ]  # fmt: skip
        stats = dash.fetch_log_stats(conn, run_id)
        assert stats.attempts == 7
        http = next(m for m in stats.by_method if m.method == "http")
        assert (http.attempts, http.ok, http.blocked, http.median_ms) == (4, 2, 2, 25.0)
        assert ("api", "timeout", 1) in stats.by_outcome
        activity = dash.fetch_activity(conn, now - dash.timedelta(minutes=5))
        assert (activity.attempts, activity.ok, activity.blocked) == (7, 3, 3)
        assert dash.entity_countries(conn, run_id) == ["MY"]
        cols, rows = dash.entity_page(conn, run_id, "MY", offset=1, limit=1)
        assert cols[:4] == ["entity_id", "entity_type", "country", "external_id"]
        assert "attr_country" in cols and "name" in cols  # an attribute named like a column
        assert len(rows) == 1 and rows[0][cols.index("external_id")] == "P1"
        stat = dash.run_stats(conn, item_logs(), kind="scrape")[0]
        assert (stat.done, stat.ok, stat.failed) == (5, 4, 1)  # the queued page is not counted
        assert {g.name for g in dash.outcome_groups(conn, item_logs()["scrape"], run_id)} == {
            "done",
            "blocked",
        }
    out = tmp_path / "e.parquet"
    assert export_entities(db, "parquet", out, run_id=run_id) == 3
    table = pq.read_table(out)
    assert table.column("attr_country").to_pylist()[0].startswith("country-")

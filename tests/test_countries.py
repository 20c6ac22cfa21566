"""Countries per worker: the normal form, the schema step, what planning stamps on tasks, the
"no live worker serves" warning, the fleet's flag, and end to end on PostgreSQL two
standalone workers serving disjoint countries of one scrape run.

The claim filter itself is a queue-contract case (``tests/test_queue_contract.py``), run
against every backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.countries import countries_text, normal_country, parse_countries
from engine.jobs.base import CountryBatch, batch_countries
from engine.queue.sql import SqlQueue
from engine.settings import Settings
from sim.shops import ShopsConfig, ShopSpec, ShopWorld, shop_products
from storage import queue as q
from storage import runs
from storage.bulk import fetch_all
from storage.coverage import country_gap
from storage.db import Database, open_database
from storage.scrape import entity_rows
from tests.keys import KEY_FILE

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 90.0
SECRET_FILE = str(KEY_FILE)


def test_names_and_codes_of_a_country_have_one_normal_form() -> None:
    for text in ("MY", "my", "Malaysia", "  malaysia ", "MALAYSIA"):
        assert normal_country(text) == "MY"
    assert normal_country("Argentina") == "AR" and normal_country("ru") == "RU"
    assert normal_country("United  Kingdom") == normal_country("uk") == "GB"
    assert normal_country("Atlantis  Major") == "ATLANTIS MAJOR"  # unknown: its own words
    assert normal_country(None) is None and normal_country("  ") is None
    assert parse_countries("India, Malaysia,IN") == ("IN", "MY")
    assert parse_countries(["russia", "Argentina"]) == ("AR", "RU")
    assert parse_countries("any") == parse_countries("") == parse_countries(None) == ()
    assert countries_text(("MY", "IN")) == "IN,MY" and countries_text(()) is None


def test_plain_batches_take_the_runs_country_parameter_when_the_kind_has_one() -> None:
    from engine.jobs import get_kind

    s = Settings()
    assert get_kind("scrape", s).task_country({"country": "malaysia"}) == "MY"
    assert get_kind("scrape", s).task_country({}) is None
    assert get_kind("backfill", s).task_country({"country": "India"}) is None  # no such param
    assert get_kind("validate", s).task_country({}) is None
    refs, countries = batch_countries([[1, 2], CountryBatch([3], "Argentina"), [4]], "IN")
    assert (refs, countries) == ([[1, 2], [3], [4]], ["IN", "AR", "IN"])


# --- the schema step ------------------------------------------------------------------------


def test_a_version_5_database_gains_the_country_columns(db_url: str) -> None:
    """A database migrated before step 6: its queued task (no country) is kept and any
    worker, of any countries, still claims it."""
    db = open_database(db_url)
    with db.begin() as conn:
        run_id = runs.create_run(conn, "backfill", {}, "t")
        q.add_tasks(conn, run_id, [["a"]], 0, 3)
        runs.start_run(conn, run_id)
        conn.execute(sa.text("ALTER TABLE tasks DROP COLUMN country"))
        conn.execute(sa.text("ALTER TABLE workers DROP COLUMN countries"))
        conn.execute(sa.text("DELETE FROM schema_version WHERE version = 6"))
    db.dispose()
    db = open_database(db_url)  # migrates
    try:
        with db.connect() as conn:
            versions = [r[0] for r in conn.execute(sa.text("SELECT version FROM schema_version"))]
            assert fetch_all(conn, sa.text("SELECT country FROM tasks")) == [(None,)]
        assert 6 in versions
        sql = SqlQueue(db, Settings())
        sql.register("w", "h", 1, "standalone", ("AR",))
        assert [t.items for t in sql.claim("w", 5, countries=("AR",)).tasks] == [["a"]]
        with db.connect() as conn:
            assert fetch_all(conn, sa.text("SELECT countries FROM workers")) == [("AR",)]
    finally:
        db.dispose()


# --- the warning --------------------------------------------------------------------------------


def _run_with(db: Database, countries: list[str | None], status: str = "running") -> int:
    with db.begin() as conn:
        run_id = runs.create_run(conn, "backfill", {}, "t")
        q.add_tasks(conn, run_id, [[f"{run_id}-{i}"] for i in range(len(countries))], 0, 3,
                    countries)  # fmt: skip
        runs.start_run(conn, run_id)
        if status != "running":
            runs.set_status(conn, run_id, status)
    return run_id


def test_the_gap_names_queued_countries_no_live_worker_serves(db: Database) -> None:
    def gap(run_id: int | None = None) -> Any:
        with db.connect() as conn:
            return country_gap(conn, fresh_s=30.0, run_id=run_id)

    sql = SqlQueue(db, Settings())
    run_id = _run_with(db, [None, "IN", "AR", "AR"])
    other = _run_with(db, ["RU"], status="paused")  # waits for its operator, not a worker
    assert gap().unserved == {"AR": 2, "IN": 1}  # no live worker at all
    assert "no live worker at all" in gap().message()
    sql.register("w0", "h0", 1, "standalone", ("IN", "MY"))
    sql.register("w1", "h0", 2, "standalone", ("IN", "MY"))  # same host and countries: once
    found = gap(run_id)
    assert found.unserved == {"AR": 2} and found.workers == [("h0", "IN,MY")]
    assert found.message().startswith(
        "tasks of country AR are queued but no live worker serves AR (workers: h0 [IN,MY]); "
    )
    assert gap(other) is None
    # a worker of AR whose heartbeat went stale does not count; a fresh one does
    sql.register("w2", "h1", 3, "standalone", ("AR",))
    with db.begin() as conn:
        conn.execute(sa.text(
            "UPDATE workers SET heartbeat_at = heartbeat_at - INTERVAL '1 hour' WHERE id = 'w2'"))  # fmt: skip
    assert gap(run_id).unserved == {"AR": 2}
    sql.heartbeat("w2", {}, "idle", 0, 0)
    assert gap(run_id) is None
    sql.unregister("w2", "stopped")  # exited: no longer live
    assert gap(run_id).unserved == {"AR": 2}
    sql.register("w3", "h2", 4, "local")  # serves any country: everything is served
    assert gap() is None
    # once the AR tasks are claimed, nothing of AR is queued any more
    sql.unregister("w3", "stopped")
    sql.register("w4", "h1", 5, "standalone", ("AR",))
    sql.claim("w4", 10, countries=("AR",))
    sql.unregister("w4", "stopped")  # hands them back: queued again, unserved again
    assert gap(run_id).unserved == {"AR": 2}


def test_console_shows_countries_and_the_gap(tmp_path: Path, monkeypatch: Any) -> None:
    """Workers page: each worker's countries and the warning; the run's detail on Runs &
    errors: the same warning (a console without a pool of its own, like one on PostgreSQL
    with standalone workers only)."""
    from console import reads
    from console.resources import get_console, shutdown_all
    from console.testing import run_page, use_fresh_database

    try:
        url = use_fresh_database(tmp_path, monkeypatch, workers=0)
        at = run_page("pages/workers.py")
        assert not at.warning  # nothing queued
        # the console's coordinator holds the DuckDB file: write through it, after it started
        # (on start it marks workers left by an earlier coordinator dead)
        db = get_console(url).db
        _run_with(db, ["IN", "AR"])
        with db.begin() as conn:
            q.register_worker(conn, "w0", "h0", 1, "standalone", ("IN", "MY"))
        reads.st.cache_data.clear()
        want = "tasks of country AR are queued but no live worker serves AR (workers: h0 [IN,MY])"
        at.run()
        frame = at.dataframe[0].value
        assert list(frame["countries"]) == ["IN,MY"]
        assert [w.value for w in at.warning if want in w.value], [w.value for w in at.warning]
        reads.st.cache_data.clear()
        at = run_page("pages/runs.py")
        assert [w.value for w in at.warning if want in w.value], [w.value for w in at.warning]
    finally:
        shutdown_all()


# --- the fleet's flag -----------------------------------------------------------------------------


class LocalShell:
    """The fleet's ssh boundary, run in a local shell: the start and stop commands are the
    real ones, the workers real processes on this machine (as on a host over ssh)."""

    def run(self, target: str, command: str, stdin: str | None = None) -> Any:
        return subprocess.run(
            ["bash", "-c", command], input=stdin, capture_output=True, text=True, timeout=60
        )

    def close(self, target: str) -> None:
        return None


def wait_for(cond: Callable[[], Any], within_s: float = WAIT_S, what: str = "") -> Any:
    deadline = time.monotonic() + within_s
    while not (got := cond()):
        assert time.monotonic() < deadline, f"not within {within_s:.0f}s: {what}"
        time.sleep(0.2)
    return got


@pytest.mark.postgres
def test_fleet_start_serves_the_hosts_countries_or_those_given(pg_url: str) -> None:
    from engine.fleet.hosts import add_host, list_hosts
    from engine.fleet.workers import fleet_status, start_workers, stop_workers
    from storage.hosts import HostRow

    db = open_database(pg_url, components=_components())
    ssh: Any = LocalShell()
    env = {"FETCHFLEET_DB": pg_url, "FETCHFLEET_SECRET_KEY_FILE": SECRET_FILE}
    try:
        add_host(db, HostRow("h0", "h0.example", sys.executable, str(ROOT), "Argentina, ru"))
        assert [h.countries for h in list_hosts(db)] == ["AR,RU"]  # stored in normal form

        def live() -> list[Any]:
            return [w for h in fleet_status(db) for w in h.workers]

        start_workers(db, ssh, "h0", 1, env)
        assert [w.countries for w in wait_for(live, what="a worker of h0")] == ["AR,RU"]
        stop_workers(db, ssh, "h0")
        start_workers(db, ssh, "h0", 1, env, countries="India")  # overrides the host's
        assert [w.countries for w in wait_for(live, what="a worker of h0")] == ["IN"]
        stop_workers(db, ssh, "h0")
        start_workers(db, ssh, "h0", 1, env, countries="any")
        assert [w.countries for w in wait_for(live, what="a worker of h0")] == [None]
        stop_workers(db, ssh, "h0")
        assert live() == []
    finally:
        db.dispose()


def _components() -> Any:
    from engine.jobs import components

    return components()


# --- end to end: two standalone workers, disjoint countries, one scrape run ---------------------

SHOPS = ShopsConfig(
    (
        ShopSpec("my-a", "Malaysia", "none", 100, seed=5),
        ShopSpec("in-b", "India", "none", 80, seed=5),
        ShopSpec("ar-c", "Argentina", "none", 60, seed=5),
    )
)
COUNTRY_OF = {"my-a": "MY", "in-b": "IN", "ar-c": "AR"}


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(SHOPS) as world:
        yield world


def spec_text(shops: ShopWorld) -> str:
    parts = ['name = "countries"', 'entity_type = "product"', 'methods = ["http"]']
    for shop in SHOPS.shops:
        url = shops[shop.name].catalog_url(1)
        parts += ["[[sources]]", f'country = "{shop.country}"', f'start_urls = ["{url}"]']
    parts += [
        "[follow]", 'css = ["a.next"]', "max_depth = 100",
        "[[extract]]", 'match = "/catalog"', 'list = "li.product"', "[extract.fields]",
        'id = { attr = "data-id" }', 'name = ".name"',
    ]  # fmt: skip
    return "\n".join(parts) + "\n"


class Lines:
    """A process's stderr, read line by line on a thread, waited on by content."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, within_s: float = WAIT_S) -> str:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next((ln for ln in self.lines if text in ln), None), within_s
            )
        assert found, f"no line with {text!r} within {within_s:.0f}s; got: {self.lines}"
        return found

    def with_text(self, text: str) -> list[str]:
        with self._cond:
            return [ln for ln in self.lines if text in ln]


def start_worker(pg_url: str, label: str, countries: str, log: Path) -> subprocess.Popen[str]:
    args = ["worker", "--db", pg_url, "--host-label", label, "--countries", countries]
    return subprocess.Popen(
        [sys.executable, "-m", "engine.run", *args, "--concurrency", "4"],
        cwd=ROOT,
        env={**os.environ, "FETCHFLEET_SECRET_KEY_FILE": SECRET_FILE},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def rows(pg_url: str, sql: str, **params: Any) -> list[Any]:
    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            return fetch_all(conn, sa.text(sql), params)
    finally:
        db.dispose()


@pytest.mark.postgres
def test_two_workers_of_disjoint_countries_each_claim_only_their_own(
    shops: ShopWorld, pg_url: str, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text(shops))
    open_database(pg_url).dispose()  # the schema, before two processes race to create it
    w_asia = start_worker(pg_url, "h0", "India,Malaysia", tmp_path / "h0.log")
    procs = [w_asia]
    try:
        wait_for(lambda: rows(pg_url, "SELECT id FROM workers WHERE host = 'h0' AND status "
                              "IN ('starting', 'idle', 'busy')"), what="worker h0")  # fmt: skip
        args = ["scrape", "--spec", str(spec), "--db", pg_url, "--workers", "0"]
        cli = subprocess.Popen(
            [sys.executable, "-m", "engine.run", *args, "--batch-size", "1", "--json"],
            cwd=ROOT,
            env={**os.environ, "FETCHFLEET_SECRET_KEY_FILE": SECRET_FILE},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(cli)
        err = Lines(cli.stderr)
        warning = err.wait_for("no live worker serves")
        assert "tasks of country AR are queued but no live worker serves AR" in warning
        assert "(workers: h0 [IN,MY])" in warning
        # meanwhile h0 works through Malaysia and India; not one task of Argentina is taken
        wait_for(lambda: not rows(pg_url, "SELECT 1 FROM tasks WHERE status <> 'done' AND "
                                  "country <> 'AR'"), what="MY and IN done")  # fmt: skip
        assert rows(pg_url, "SELECT status, worker_id FROM tasks WHERE country = 'AR'") == [
            ("queued", None)
        ]
        procs.append(start_worker(pg_url, "h1", "argentina", tmp_path / "h1.log"))
        err.wait_for("every queued country has a live worker now")
        out, _ = cli.communicate(timeout=WAIT_S)
        assert cli.returncode == 0, "\n".join(err.lines)
        summary = json.loads(out)
        assert summary["status"] == "completed"
        assert len(err.with_text("no live worker serves")) == 1  # said once, not every poll
    finally:
        for p in reversed(procs):
            stop(p)
    run_id = summary["run_id"]
    # every task was claimed only by a worker serving its country, and holds one country
    tasks = rows(
        pg_url,
        "SELECT t.country, t.status, w.host, w.countries, t.items FROM tasks t "
        "JOIN workers w ON w.id = t.worker_id WHERE t.run_id = :r",
        r=run_id,
    )
    pages = sum(shops[s.name].spec.pages for s in SHOPS.shops)
    assert len(tasks) == pages
    for country, status, host, serves, _ in tasks:
        assert status == "done" and country in serves.split(","), (country, host, serves)
        assert host == ("h1" if country == "AR" else "h0")
    url_country = dict(rows(pg_url, "SELECT id, country FROM urls WHERE run_id = :r", r=run_id))
    for country, _, _, _, items in tasks:
        assert {normal_country(url_country[i]) for i in json.loads(items)} == {country}
    # the exact stored set, each product once
    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            got = entity_rows(conn, "product")
    finally:
        db.dispose()
    want = {(COUNTRY_OF[s.name], p["id"]) for s in SHOPS.shops for p in shop_products(s)}
    stored = [(normal_country(r["country"]), r["external_id"]) for r in got]
    assert len(stored) == len(set(stored)) and set(stored) == want

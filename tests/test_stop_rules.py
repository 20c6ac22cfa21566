"""Automatic stop rules: parsed and checked like every run parameter, evaluated in the
coordinator's watchdog; a scrape that hits a blocked sim shop stops itself, says which rule
fired with its numbers (summary, `status`, Runs & errors) and resumes with a fresh window;
a run that makes no progress stops (an injected clock, no waiting)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.api import submit_run
from engine.jobs.backfill.params import BackfillParams
from engine.jobs.params import ParamError
from engine.jobs.scrape.params import ScrapeParams
from engine.jobs.validate.params import ValidateParams
from engine.settings import Settings
from engine.stop_rules import check_runs, parse_rule
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.db import open_database
from tests.conftest import cli_here, run_cli, start_cli
from tests.keys import KEY_FILE

pytestmark = pytest.mark.timeout(240)


# --- the rules as parameters -------------------------------------------------------------------


def test_defaults_per_kind_and_overrides_metric_by_metric() -> None:
    assert ScrapeParams.build({"spec": "s"}).stop_when == (
        "blocked_ratio>0.8/50",
        "no_progress>30m",
    )
    assert BackfillParams.default_stop_rules == (
        "error_ratio>0.5/200",
        "http_429>20/10m",
        "no_progress>15m",
    )
    assert ValidateParams.default_stop_rules == ("no_progress>15m",)
    given = ["blocked_ratio>0.5/10m", "error_ratio>0.3/100,browser_s>3600"]
    assert ScrapeParams.build({"spec": "s", "stop_when": given}).stop_when == (
        "blocked_ratio>0.5/10m",
        "no_progress>30m",
        "error_ratio>0.3/100",
        "browser_s>3600",
    )
    off = ScrapeParams.build({"spec": "s", "stop_when": ["no_progress=off"]}).stop_when
    assert off == ("none", "blocked_ratio>0.8/50")
    assert ScrapeParams.build({"spec": "s", "stop_when": off}).stop_when == off  # stored = given
    assert ScrapeParams.build({"spec": "s", "stop_when": ["none"]}).stop_when == ("none",)
    assert parse_rule("no_progress>90s").threshold == 90
    assert parse_rule("proxy_mb>500/1h").seconds == 3600


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("error_ratio>1.5/100", "a share"),
        ("blocked_ratio>0.5", "needs a window"),
        ("no_progress>10m/50", "no window"),
        ("latency>5", "unknown metric"),
        ("error_ratio>0.5/0", "whole number"),
        ("browser_s>10m", "a unit goes on the window"),
        ("error ratio above half", "METRIC>THRESHOLD"),
    ],
)
def test_bad_rules_are_refused_under_their_field(rule: str, says: str) -> None:
    with pytest.raises(ParamError) as err:
        ScrapeParams.build({"spec": "s", "stop_when": [rule]})
    assert says in err.value.by_field()["stop_when"]
    assert str(err.value).startswith(f"--stop-when {rule!r}")


def test_a_metric_the_kind_does_not_measure_is_refused_on_the_cli(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n")
    out = cli_here(
        "backfill", "--ids", str(ids), "--url-template", "http://127.0.0.1:1/{id}",
        "--rate-limit", "10/1s", "--stop-when", "browser_s>60", "--db", f"{tmp_path}/b.duckdb",
    )  # fmt: skip
    assert out.returncode == 2
    assert "--stop-when 'browser_s>60'" in out.stderr and "does not measure" in out.stderr


# --- a blocked site, end to end ------------------------------------------------------------------

BLOCKED = ShopsConfig((ShopSpec("walled", "Argentina", "socks_only", 800, seed=5),))  # 40 pages
RULE = "blocked_ratio>0.5/10"


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(BLOCKED) as world:
        yield world


ENV = {
    "FETCHFLEET_SECRET_KEY_FILE": str(KEY_FILE),
    "FETCHFLEET_STOP_RULES_EVERY_S": "0.2",
}


def wait_stopping(db: str, proc: subprocess.Popen[str], timeout_s: float = 60) -> None:
    """Until run 1 is stopping (asked through the running CLI's control socket)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        out = run_cli("status", "--db", db, "1", "--json", env=ENV, timeout=60)
        if out.returncode == 0 and json.loads(out.stdout)["status"] in ("stopping", "stopped"):
            return
    raise AssertionError(f"run 1 was not stopped by its rule (exit {proc.poll()})")


def run_held(shops: ShopWorld, db: str, *args: str) -> dict:
    """Run the CLI while the shop answers 12 pages and holds the rest: the rule fires on
    those 12; the held pages go out once it did, and the run settles stopped. (Give the run
    tasks of at least 8 pages: its worker's first claim then brings 16, so a 13th request is
    made whenever the coordinator answers the next claim, and one is held.)"""
    proc = None
    try:
        with shops.holding("walled", after=12):
            proc = start_cli(*args, "--db", db, "--json", env=ENV)
            try:
                shops.wait_held("walled", alive=lambda: proc.poll() is None)
            except RuntimeError as e:
                out, err = proc.communicate(timeout=60)
                pytest.fail(f"{e}; exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}")
            wait_stopping(db, proc)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    return json.loads(out)


def test_a_scrape_of_a_blocked_site_stops_itself_and_resumes(
    shops: ShopWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = shops["walled"]
    urls = ", ".join(f'"{shop.catalog_url(p)}"' for p in range(1, shop.spec.pages + 1))
    spec = tmp_path / "walled.toml"
    spec.write_text(
        'name = "walled"\nentity_type = "product"\n[[sources]]\ncountry = "Argentina"\n'
        f'start_urls = [{urls}]\n[[extract]]\nlist = "li.product"\n'
        '[extract.fields]\nid = { attr = "data-id" }\n'
    )
    db = f"duckdb:///{tmp_path / 'stop.duckdb'}"
    first = run_held(
        shops, db, "scrape", "--spec", str(spec), "--methods", "http", "--stop-when", RULE,
        "--workers", "1", "--concurrency", "4", "--batch-size", "8",
    )  # fmt: skip
    assert first["status"] == "stopped"
    stop = first["auto_stop"]
    assert stop["rule"] == RULE
    assert stop["numbers"]["items"] == 10 and stop["numbers"]["blocked"] == 10
    assert stop["numbers"]["ratio"] == 1.0 and stop["numbers"]["threshold"] == 0.5
    assert first["error"].startswith(f"auto-stopped by stop rule {RULE}: 10 of 10 items blocked")
    assert "resume 1" in first["error"]
    done_first = first["counts"]["done"]
    assert 10 <= done_first < first["counts"]["total"] == shop.spec.pages
    human = cli_here("status", "--db", db, "1")  # polled from other processes above
    assert f"stopped by rule {RULE}: auto-stopped" in human.stdout, human.stdout

    # resumable: the pages left are fetched, none twice; a fresh window fires again
    second = run_held(shops, db, "scrape", "--resume", "1", "--concurrency", "4")
    assert second["status"] == "stopped" and second["auto_stop"]["rule"] == RULE
    assert second["counts"]["done"] >= done_first + 10
    database = open_database(db)
    try:
        with database.connect() as conn:
            logged = fetch_all(
                conn, sa.text("SELECT count(*) FROM run_logs WHERE step = 'stop_rule'")
            )[0][0]
            attempts, urls_fetched, pages = fetch_all(
                conn,
                sa.text(
                    "SELECT count(*), count(DISTINCT url), "
                    "(SELECT count(*) FROM urls WHERE status <> 'queued') FROM fetch_logs"
                ),
            )[0]
            sources = dict(
                fetch_all(conn, sa.text("SELECT action, source FROM commands WHERE action='stop'"))
            )
    finally:
        database.dispose()
    assert logged == 2
    assert attempts == urls_fetched == pages == second["counts"]["done"]
    assert sources["stop"] == f"stop rule {RULE}"

    # Runs & errors shows the rule, its numbers and the run's cost
    from console import reads
    from console.resources import shutdown_all
    from console.testing import run_page

    monkeypatch.setenv("FETCHFLEET_DB", db)
    monkeypatch.setenv("FETCHFLEET_WORKERS", "0")
    monkeypatch.setenv("FETCHFLEET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FETCHFLEET_SECRET_KEY_FILE", str(KEY_FILE))
    reads.st.cache_data.clear()
    try:
        at = run_page("pages/runs.py")
        shown = " ".join(e.value for e in at.error)
        assert f"auto-stopped by stop rule {RULE}" in shown
        captions = " ".join(c.value for c in at.caption)
        assert f"stop rule {RULE} fired" in captions and "blocked 10" in captions
        assert "requests by method: http " in captions
        assert any(m.label == "requests" for m in at.metric)
    finally:
        shutdown_all()


# --- no progress: an injected clock --------------------------------------------------------------


def test_a_run_without_progress_stops_at_its_limit_and_not_before(
    shops: ShopWorld, tmp_path: Path, db_url: str
) -> None:
    """Nobody works on the run (no coordinator): the rule fires once the clock passes the
    limit, and only for the run that has the rule."""
    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "s"\nentity_type = "product"\n[[sources]]\ncountry = "Argentina"\n'
        f'start_urls = ["{shops["walled"].catalog_url(1)}"]\n[[extract]]\nlist = "li.product"\n'
        '[extract.fields]\nid = { attr = "data-id" }\n'
    )
    db = open_database(db_url)
    s = Settings(secret_key_file=KEY_FILE)
    try:
        ruled = submit_run(
            db, s, "scrape", {"spec": str(spec), "stop_when": ["no_progress>10m"]}, "t"
        )
        free = submit_run(db, s, "scrape", {"spec": str(spec), "stop_when": ["none"]}, "t")
        assert check_runs(db, s, now=utcnow() + timedelta(minutes=9)) == []
        fired = check_runs(db, s, now=utcnow() + timedelta(minutes=11))
        assert [run_id for run_id, _ in fired] == [ruled]
        firing = fired[0][1]
        assert firing.rule.text() == "no_progress>10m"
        assert firing.numbers["idle_s"] > 600 and firing.numbers["last_item_at"] is None
        with db.connect() as conn:
            status = dict(fetch_all(conn, sa.text("SELECT id, status FROM runs")))
        assert status == {ruled: "stopping", free: "running"}
        # evaluated again (another coordinator's round): a stopping run is not stopped twice
        assert check_runs(db, s, now=utcnow() + timedelta(minutes=20)) == []
    finally:
        db.dispose()

"""The metrics endpoint: a real scrape of ``engine.run metrics`` parsed with Prometheus' own
parser after a real run, and the collector's numbers against the rows they count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from engine.cli.common import open_database
from engine.metrics import WINDOW_S, registry_for
from sim.world import SimWorld
from storage import queue as q
from storage.bulk import fetch_all
from storage.clock import utcnow
from tests.test_backfill import ROOT, cli, params, subset
from tests.test_backfill import world as world


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served(db_url: str) -> Iterator[Any]:
    """``engine.run metrics --port 0`` on the database; yields a function that scrapes it."""
    procs: list[subprocess.Popen[str]] = []

    def start() -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.run", "metrics", "--db", db_url, "--port", "0"],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )  # fmt: skip
        procs.append(proc)
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "serving http://127.0.0.1:PORT/metrics …"
        assert line.startswith("serving http://127.0.0.1:"), line
        url = line.split()[1]
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            return resp.read().decode()

    yield start
    for proc in procs:
        proc.terminate()
        assert proc.wait(30) == 0  # SIGTERM ends it cleanly


def test_a_real_scrape_after_a_real_run(
    served: Any, db_url: str, world: SimWorld, tmp_path: Path
) -> None:
    ids = subset(world, tmp_path, 60)
    run = cli("backfill", "--db", db_url, "--ids", str(ids), "--url-template",
              world.api_template, "--rate-limit", "200/1s", "--header",
              "Authorization=env:SIM_API_TOKEN", "--rate-margin", "0.5", "--workers", "1",
              "--json", timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = samples(served())
    assert got[("fetchfleet_runs", (("kind", "backfill"), ("status", "completed")))] == 1
    # stored within the last minute (the run took seconds): all 60
    assert got[("fetchfleet_items_per_second", (("kind", "backfill"),))] * WINDOW_S == 60
    assert got[("fetchfleet_items_per_second", (("kind", "validate"),))] == 0
    assert not [k for k in got if k[0] == "fetchfleet_workers"]  # the CLI's pool is gone


def test_collector_counts_what_the_rows_say(pg_url: str, world: SimWorld, tmp_path: Path) -> None:
    from engine.api import submit_run
    from engine.jobs import components
    from engine.settings import Settings

    db = open_database(pg_url, components=components())
    try:
        settings = Settings(batch_size=20)
        run_id = submit_run(  # nobody works it: its 3 tasks stay queued
            db, settings, "backfill", params(world, subset(world, tmp_path, 60)), "test"
        )
        with db.begin() as conn:
            q.register_worker(conn, "h1-w", "h1", 4242, "backfill")
            q.register_worker(conn, "h2-w", "h2", 4243, "backfill")
            conn.execute(sa.text("UPDATE workers SET status = 'busy' WHERE id = 'h1-w'"))
            conn.execute(
                sa.text(
                    "INSERT INTO errors (run_id, error_type, message, created_at) VALUES "
                    "(:r, 'timeout', 'x', :now), (:r, 'timeout', 'y', :now), "
                    "(:r, 'bad_input', 'z', :old)"
                ),
                {"r": run_id, "now": utcnow(), "old": utcnow() - timedelta(hours=2)},
            )
            # 30 requests in the last minute on the run's key (its limit: 200/1s)
            conn.execute(
                sa.text(
                    "INSERT INTO backfill_items (run_id, item_id, status, outcome, attempts, "
                    "fetched_at) SELECT :r, 'i' || g, 'ok', 'ok', 3, :now "
                    "FROM generate_series(1, 10) g"
                ),
                {"r": run_id, "now": utcnow()},
            )
            key = json.loads(
                fetch_all(conn, sa.text("SELECT params FROM runs WHERE id = :r"), {"r": run_id})[0][
                    0
                ]
            )["rate_key"]
        now = utcnow() + timedelta(seconds=1)
        got = samples(_expose(registry_for(db, now=lambda: now)))
    finally:
        db.dispose()
    assert got[("fetchfleet_runs", (("kind", "backfill"), ("status", "running")))] == 1
    assert got[("fetchfleet_queue_tasks", (("kind", "backfill"), ("status", "queued")))] == 3
    assert got[("fetchfleet_workers", (("host", "h1"), ("status", "busy")))] == 1
    assert got[("fetchfleet_workers", (("host", "h2"), ("status", "starting")))] == 1
    ages = {k[1]: v for k, v in got.items() if k[0] == "fetchfleet_worker_heartbeat_age_seconds"}
    assert set(ages) == {(("host", "h1"), ("worker", "h1-w")), (("host", "h2"), ("worker", "h2-w"))}
    assert got[("fetchfleet_errors_recent", (("type", "timeout"),))] == 2
    assert ("fetchfleet_errors_recent", (("type", "bad_input"),)) not in got  # 2 h old
    assert got[("fetchfleet_items_per_second", (("kind", "backfill"),))] * WINDOW_S == 10
    assert got[("fetchfleet_ratelimit_utilisation", (("key", key),))] == pytest.approx(
        30 / (200 * WINDOW_S)
    )


def _expose(registry: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_the_console_server_serves_metrics_when_asked(tmp_path: Path) -> None:
    from console.resources import start_console
    from engine.settings import Settings

    console = start_console(
        f"duckdb:///{tmp_path / 'c.duckdb'}",
        Settings(workers=0, metrics_port=0, data_dir=tmp_path / "data"),
    )
    try:
        assert console.metrics_port
        url = f"http://127.0.0.1:{console.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            got = samples(resp.read().decode())
        assert not [k for k in got if k[0] == "fetchfleet_runs"]  # an empty database
        assert ("fetchfleet_items_per_second", (("kind", "scrape"),)) in got
    finally:
        console.close()

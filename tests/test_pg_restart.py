"""PostgreSQL goes away in the middle of a run and comes back: every process (the coordinator,
its pool workers, a standalone worker, the limiter, the CLI's wait) waits for it with backoff,
nothing is stored as failed because our own database was down, and the run completes with
exactly the input, each item once.

The outage is real: the server is stopped with ``pg_ctlcluster`` and started again (root
only; the suite runs as root on CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.api import submit_run, wait_run
from engine.cli.demo import compare_with_truth
from engine.runtime.coordinator import Coordinator
from engine.settings import Settings
from sim.api import ApiConfig, expected_outcome
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from sim.world import SimWorld, WorldConfig
from storage.bulk import fetch_all
from storage.db import open_database
from tests import test_validate_e2e
from tests.conftest import require_tool
from tests.keys import KEY_FILE
from tests.test_scrape import catalog_spec, stored, truth

ROOT = Path(__file__).resolve().parent.parent
OUTAGE_S = 3.0  # how long the database stays down: the scenario, not an assertion
TOKEN = "restart-token"

pytestmark = pytest.mark.postgres
slow_world = test_validate_e2e.slow_world  # the fixture: checks that take their whole timeout


def _cluster() -> list[str]:
    """``[version, name]`` of the cluster on port 5432."""
    require_tool("pg_ctlcluster", "postgresql-common")
    if os.geteuid() != 0:
        msg = "stopping PostgreSQL needs root (pg_ctlcluster)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        version, name, port, *_ = line.split()
        if port == "5432":
            return [version, name]
    pytest.fail("no PostgreSQL cluster on port 5432")


def _pg_ctl(action: str) -> None:
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", *_cluster(), action]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def outage() -> None:
    """Stop the server for OUTAGE_S, start it again, wait until it answers."""
    _pg_ctl("stop")
    try:
        time.sleep(OUTAGE_S)
    finally:
        _pg_ctl("start")
    for _ in range(120):
        ready = subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"])
        if ready.returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail("PostgreSQL did not come back within 60 s")


def wait_done(db: Any, run_id: int, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while wait_run(db, run_id, timeout_s=0)["counts"]["done"] < n:
        assert time.monotonic() < deadline, f"fewer than {n} items done in {timeout_s}s"
        time.sleep(0.1)


def through_an_outage(
    db: Any, s: Settings, kind: str, params: dict[str, Any], done_first: int, **kw: Any
) -> tuple[int, dict[str, Any], list[Any]]:
    """Run ``kind`` on a coordinator with a local pool; once ``done_first`` items are done,
    take the database away and back; wait for the end. (run id, summary, replaced workers)"""
    coord = Coordinator(db, s, **kw).start()
    try:
        run_id = submit_run(db, s, kind, params, coord.name)
        wait_done(db, run_id, done_first)
        outage()
        summary = wait_run(db, run_id, timeout_s=180)
        return run_id, summary, list(coord.replaced)
    finally:
        coord.shutdown()


def max_attempts(db: Any, run_id: int) -> int:
    with db.connect() as conn:
        q = sa.text("SELECT max(attempts) FROM tasks WHERE run_id = :r")
        return int(fetch_all(conn, q, {"r": run_id})[0][0] or 0)


def settings(**kw: Any) -> Settings:
    base = {
        "workers": 1,
        "heartbeat_s": 0.5,
        "lease_s": 30.0,  # longer than the outage: no lease expires because of it
        "retry_backoff_s": 0.2,
        "secret_key_file": KEY_FILE,
    }
    return Settings(**{**base, **kw})


def test_validate_survives_a_restart_with_local_and_standalone_workers(
    slow_world: SimWorld, pg_url: str
) -> None:
    db = open_database(pg_url)
    s = settings(concurrency=4, batch_size=4)
    # stopped with SIGTERM once the run completed (an idle exit would sit out its period)
    args = ["worker", "--db", pg_url, "--concurrency", "4", "--json"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine.run", *args],
        cwd=ROOT,
        env={**os.environ, "FETCHFLEET_SECRET_KEY_FILE": str(s.secret_key_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        params = {
            "proxies_file": str(slow_world.proxies_file),
            "judge_url": slow_world.judge_url,
            "timeout_s": 1.0,
            "batch_size": 4,
        }
        run_id, summary, replaced = through_an_outage(db, s, "validate", params, 12, workers=1)
        if worker.poll() is None:  # still up after the outage: asked to finish and sign off
            worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert replaced == [], "a worker died of the outage"
    assert worker.returncode == 0, err[-2000:]
    assert "cannot reach the queue" in err  # it waited, it said so
    assert summary["status"] == "completed", summary
    assert summary["counts"]["done"] == summary["counts"]["total"] == len(slow_world.truth)
    with db.connect() as conn:
        q = "SELECT count(*), count(DISTINCT proxy_id) FROM proxy_checks WHERE run_id = :r"
        total, distinct = fetch_all(conn, sa.text(q), {"r": run_id})[0]
    assert max_attempts(db, run_id) <= 1, "the outage cost a task an attempt"
    db.dispose()
    assert total == distinct == len(slow_world.truth)
    truth = compare_with_truth(pg_url, slow_world.truth, 1.0)
    assert truth["false_positives"] == truth["false_negatives"] == truth["too_slow"] == 0, truth


API = ApiConfig(limit=60, window_s=1.0, token=TOKEN, seed=12)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("api")
    with SimWorld(WorldConfig(n_proxies=0, api=API, ids=400, seed=12, out_dir=out)) as w:
        yield w


def test_backfill_survives_a_restart_and_stores_each_id_once(
    api: SimWorld, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESTART_API_TOKEN", f"Bearer {TOKEN}")  # pool workers inherit it
    ids = api.ids_file.read_text().split()
    db = open_database(pg_url)
    s = settings(workers=2, concurrency=10, batch_size=10)
    params = {
        "ids_file": str(api.ids_file),
        "url_template": api.api_template,
        "rate_limit": "50/1s",
        "headers": ["Authorization=env:RESTART_API_TOKEN"],
        "batch_size": 10,
        "retry_backoff_s": 0.1,
    }
    run_id, summary, replaced = through_an_outage(db, s, "backfill", params, 60)
    assert replaced == [], "a worker died of the outage"
    assert summary["status"] == "completed", summary
    assert max_attempts(db, run_id) <= 1, "the outage cost a task an attempt"
    with db.connect() as conn:
        rows = fetch_all(
            conn,
            sa.text("SELECT item_id, outcome, error FROM backfill_items WHERE run_id = :r"),
            {"r": run_id},
        )
    db.dispose()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) == len(ids) and set(keys) == set(ids)
    want = {i: expected_outcome(i, API) for i in ids}
    wrong = [
        (i, o, e) for i, o, e in rows if o != want[i] and not (want[i] == "flaky" and o == "ok")
    ]
    assert not wrong, f"stored other than the API answered (the outage?): {wrong[:5]}"
    assert api.api_stats()["rate_limited"] == 0


SLOW_SHOP = ShopSpec("restart-slow", "Indonesia", "slow", 400, seed=5, latency_ms=500)


@pytest.fixture(scope="module")
def shop() -> Iterator[ShopWorld]:
    with ShopWorld(ShopsConfig((SLOW_SHOP,))) as world:
        yield world


def test_scrape_survives_a_restart_and_stores_the_whole_shop(
    shop: ShopWorld, pg_url: str, tmp_path: Path
) -> None:
    """A catalog of 20 pages followed one after the other, half a second each."""
    spec = tmp_path / "spec.toml"
    spec.write_text(catalog_spec([("Indonesia", shop["restart-slow"].catalog_url(1))]))
    db = open_database(pg_url)
    s = settings(concurrency=4, batch_size=1)
    params = {"spec": str(spec), "files_dir": str(tmp_path / "files")}
    run_id, summary, replaced = through_an_outage(db, s, "scrape", params, 3)
    assert max_attempts(db, run_id) <= 1, "the outage cost a task an attempt"
    db.dispose()
    assert replaced == [], "a worker died of the outage"
    assert summary["status"] == "completed", summary
    assert summary["counts"]["failed"] == 0, summary
    assert set(stored(pg_url)) == set(truth(shop, "restart-slow"))

"""The console's Home page and its engine resource (Streamlit's AppTest, in-process).

Every test gets its own DuckDB file (FETCHFLEET_DB) and data directory; the console's
engine (coordinator + pool) is released after each test, so no worker process outlives it.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from console.resources import get_console, shutdown_all
from console.testing import run_page, use_fresh_database
from storage import proxies as proxy_store
from storage import runs
from storage.db import open_database
from storage.secrets import SecretBox


@pytest.fixture
def console_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database for the console (no pool: read-only pages); released afterwards."""
    try:
        yield use_fresh_database(tmp_path, monkeypatch, workers=0)
    finally:
        shutdown_all()


@dataclass
class Spec:
    key: str
    scheme: str | None
    host: str
    port: int
    username: str | None
    password: str | None


def test_home_renders_empty_database(console_env: str) -> None:
    at = run_page()
    assert not at.exception
    assert at.title[0].value == "Fleet at a glance"
    fleet = {m.label: m.value for m in at.metric}
    assert fleet["workers alive"] == "0" and fleet["items/s now"] == "0.0"
    assert fleet["runs"] == "0" and fleet["proxies"] == "0"
    assert "console.duckdb" in at.caption[0].value
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    spec = json.loads(charts[0].proto.spec)
    assert len(spec["data"][0]["y"]) == 60  # one point a minute over the last hour


def test_home_shows_runs_and_proxies(console_env: str, tmp_path: Path) -> None:
    db = open_database(console_env)
    with db.begin() as conn:
        proxy_store.upsert_proxies(
            conn,
            [Spec("socks5://u@1.2.3.4:1080", "socks5", "1.2.3.4", 1080, "u", "hunter2")],
            SecretBox.load(None, tmp_path / "k"),
            "t",
        )
        runs.create_run(conn, "validate", {"judge_url": "x"}, "t")
    db.dispose()
    at = run_page()
    assert not at.exception
    fleet = {m.label: m.value for m in at.metric}
    assert fleet["runs"] == "1" and fleet["proxies"] == "1" and fleet["untested"] == "1"
    assert fleet["tampering"] == "0"
    latest = at.dataframe[0].value
    assert list(latest["status"]) == ["queued"] and list(latest["kind"]) == ["validate"]
    runs_chart = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert runs_chart["data"][0]["x"] == ["queued"]


def test_one_engine_per_server_released_cleanly(
    console_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions share one console; releasing it stops the pool and frees the database."""
    monkeypatch.setenv("FETCHFLEET_WORKERS", "1")
    first = run_page()
    second = run_page("pages/workers.py")
    assert not first.exception and not second.exception
    console = get_console(console_env)
    assert get_console(console_env) is console
    assert console.coordinator.pool.target == 1
    assert len(multiprocessing.active_children()) >= 1
    shutdown_all()
    assert console.closed
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("local-")]
    db = open_database(console_env, wait_s=0)  # the file is free again
    db.dispose()


def test_locked_database_is_explained(console_env: str, tmp_path: Path) -> None:
    """Another process holding the DuckDB file: the page says who and what to do."""
    import subprocess
    import sys
    import time

    path = console_env.removeprefix("duckdb:///")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({path!r}); time.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 15
        while not Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        at = run_page()
        assert not at.exception
        assert at.error and f"in use by PID {holder.pid}" in at.error[0].value
    finally:
        holder.kill()
        holder.wait(10)

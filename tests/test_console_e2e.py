"""The console end to end, in a real browser: `streamlit run app.py` on a loopback port
against a temporary DuckDB and the sim world, driven by Playwright and the system Chromium.

Validation → paste the sim list → Start → the run completes on screen → the counts shown are
the database's → the CSV download is the pool. Screenshots of every page land in
test-artifacts/console/; with FETCHFLEET_UPDATE_SCREENSHOTS=1 (or when missing) the Home and
the Validation-during-a-run shots are copied to docs/screenshots/ for the README.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.api import wait_run
from engine.runtime.coordinator import Coordinator
from engine.settings import Settings
from sim.world import SimWorld, WorldConfig
from storage.bulk import fetch_all
from storage.db import open_database
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "console"
DOCS_SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = {  # sidebar label -> (screenshot name, heading)
    "Workers": ("workers", "Workers"),
    "Runs & errors": ("runs", "Runs & errors"),
    "Schedules": ("schedules", "Schedules"),
    "Data & export": ("data", "Data & export"),
    "Settings": ("settings", "Settings"),
    "Scraping": ("scraping", "Scraping"),
    "Backfill": ("backfill", "Backfill"),
}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.2)
    pytest.fail(
        f"streamlit did not answer /_stcore/health in {timeout}s:\n{log.read_text()[-3000:]}"
    )


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 45) -> int | None:
    """SIGTERM (graceful: the pool hands its tasks back), then kill the whole group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    code = proc.poll()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return code


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("world")
    with SimWorld(WorldConfig(n_proxies=30, mix="demo", seed=7, out_dir=out)) as w:
        yield w


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    port = free_port()
    db_url = f"duckdb:///{tmp_path / 'console.duckdb'}"
    log = tmp_path / "streamlit.log"
    env = {
        **os.environ,
        "FETCHFLEET_DB": db_url,
        "FETCHFLEET_DATA_DIR": str(tmp_path / "data"),
        "FETCHFLEET_SECRET_KEY_FILE": str(tmp_path / "data" / "secret.key"),
        "FETCHFLEET_WORKERS": "2",
        "FETCHFLEET_CONCURRENCY": "50",
        "FETCHFLEET_BATCH_SIZE": "5",
        "FETCHFLEET_HEARTBEAT_S": "0.5",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                "--server.headless",
                "true",
                "--server.port",
                str(port),
                "--server.address",
                "127.0.0.1",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the pool goes with it
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log, timeout=30)
        yield base, db_url, proc
    finally:
        stop_server(proc)


def metric_values(scope: Any) -> dict[str, str]:  # a Playwright Locator
    out = {}
    for m in scope.locator('[data-testid="stMetric"]').all():
        label = m.locator('[data-testid="stMetricLabel"]').inner_text().strip()
        out[label] = m.locator('[data-testid="stMetricValue"]').inner_text().strip()
    return out


def shoot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def publish(shot: Path, name: str) -> None:
    target = DOCS_SHOTS / name
    if os.environ.get("FETCHFLEET_UPDATE_SCREENSHOTS") == "1" or not target.exists():
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def publishing() -> bool:
    """Whether this session's shots go to docs/screenshots/ (see publish)."""
    return os.environ.get("FETCHFLEET_UPDATE_SCREENSHOTS") == "1" or not all(
        (DOCS_SHOTS / name).exists() for name in ("validation.png", "home.png")
    )


def settle(page: Any, ms: int = 800, for_shot: bool = True) -> None:
    """Let Streamlit finish a rerun (no element marked stale) and charts draw. A pause only
    for a picture's sake (``for_shot``) is short when no shot is published: what the test
    asserts waits on elements, not on the pause."""
    with contextlib.suppress(Exception):
        page.wait_for_selector('[data-stale="true"]', state="detached", timeout=10_000)
    page.wait_for_timeout(ms if publishing() or not for_shot else min(ms, 200))


def test_console_validation_in_a_browser(
    world: SimWorld, server: tuple[str, str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    require_tool(CHROMIUM, "chromium")
    from playwright.sync_api import expect, sync_playwright

    base, db_url, proc = server
    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(
                accept_downloads=True, viewport={"width": 1400, "height": 1700}
            )
            ctx.set_default_timeout(30_000)
            page = ctx.new_page()
            page.goto(base)
            expect(page.get_by_role("heading", name="Fleet at a glance")).to_be_visible()
            expect(page.locator(".st-key-home_fleet")).to_contain_text("workers alive")

            # Validation: paste the sim's list, Start
            page.get_by_role("link", name="Validation").click()
            expect(page.get_by_role("heading", name="Validation", exact=True)).to_be_visible()
            page.get_by_role("textbox", name="Proxy list").fill(world.proxies_file.read_text())
            page.get_by_role("textbox", name="Judge URL").fill(world.judge_url)
            page.get_by_role("spinbutton", name="Timeout per check (s)").fill("3")
            page.get_by_role("button", name="Start").click()
            run_box = page.locator(".st-key-val_run")
            expect(run_box).to_contain_text("status running", timeout=30_000)
            settle(page, 1200)
            during = shoot(page, "validation-running")
            expect(run_box).to_contain_text("status completed", timeout=90_000)
            settle(page, 1500, for_shot=False)  # the metrics read next
            shown = metric_values(run_box)
            shoot(page, "validation")

            # the CSV of the pool (no filter: every proxy)
            with page.expect_download(timeout=30_000) as dl:
                page.get_by_role("button", name="Download CSV").click()
            csv_path = tmp_path / "proxies.csv"
            dl.value.save_as(csv_path)

            page.get_by_role("link", name="Home").click()
            expect(page.get_by_role("heading", name="Fleet at a glance")).to_be_visible()
            settle(page, 2500)
            home = shoot(page, "home")
            for label, (name, heading) in PAGES.items():
                page.get_by_role("link", name=label, exact=True).click()
                expect(
                    page.get_by_role("heading", name=heading, exact=True, level=1)
                ).to_be_visible()
                settle(page)
                shoot(page, name)

            # a second run, left unfinished: black holes hold it for the 8 s timeout
            page.get_by_role("link", name="Validation").click()
            page.get_by_role("textbox", name="Proxy list").fill(world.proxies_file.read_text())
            page.get_by_role("textbox", name="Judge URL").fill(world.judge_url)
            page.get_by_role("spinbutton", name="Timeout per check (s)").fill("8")
            page.get_by_role("button", name="Start").click()
            expect(run_box).to_contain_text("Run 2 · status running", timeout=30_000)
        finally:
            browser.close()
    publish(during, "validation.png")
    publish(home, "home.png")

    # stop the server mid-run: graceful (in-flight checks finish, tasks are handed back)
    began = time.monotonic()
    assert stop_server(proc) is not None, "the server did not stop on SIGTERM"
    assert time.monotonic() - began < 40
    db = open_database(db_url)
    try:
        with db.connect() as conn:
            total, alive = fetch_all(
                conn,
                sa.text(
                    "SELECT count(*), count(*) FILTER (WHERE alive) FROM proxy_checks "
                    "WHERE run_id = 1"
                ),
            )[0]
            status = fetch_all(conn, sa.text("SELECT status FROM runs WHERE id = 1"))[0][0]
            pool = fetch_all(conn, sa.text("SELECT count(*) FROM proxies"))[0][0]
    finally:
        db.dispose()
    assert status == "completed"
    assert total == len(world.truth) == pool
    assert shown["checked"] == f"{total:,} / {total:,}", shown
    assert shown["alive"] == f"{alive:,}", shown
    assert shown["not alive"] == f"{total - alive:,}", shown
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == pool
    assert "password_enc" not in rows[0] and "key" in rows[0]
    assert sum(r["status"] == "active" for r in rows) == alive
    assert all(re.match(r"^[a-z0-9]+://|^[\w.\[\]:@-]+$", r["key"]) for r in rows)

    # run 2 was left resumable: nothing leased, no worker left busy; a new coordinator (what
    # the next server start runs) finishes it with every proxy stored once
    db = open_database(db_url)
    try:
        with db.connect() as conn:
            run2 = fetch_all(conn, sa.text("SELECT status FROM runs WHERE id = 2"))[0][0]
            leased = fetch_all(
                conn, sa.text("SELECT count(*) FROM tasks WHERE run_id = 2 AND status = 'leased'")
            )[0][0]
            busy = fetch_all(
                conn, sa.text("SELECT count(*) FROM workers WHERE status IN ('busy', 'idle')")
            )[0][0]
        assert run2 == "running" and leased == 0 and busy == 0, (run2, leased, busy)
        settings = Settings(
            workers=2,
            concurrency=50,
            heartbeat_s=0.5,
            secret_key_file=tmp_path / "data" / "secret.key",
        )
        coordinator = Coordinator(db, settings).start()
        try:
            summary = wait_run(db, 2, poll_s=0.3, timeout_s=90)
        finally:
            coordinator.shutdown()
        assert summary["status"] == "completed", summary
        assert summary["counts"]["done"] == summary["counts"]["total"] == len(world.truth)
        with db.connect() as conn:
            n, distinct = fetch_all(
                conn,
                sa.text(
                    "SELECT count(*), count(DISTINCT proxy_id) FROM proxy_checks WHERE run_id = 2"
                ),
            )[0]
        assert n == distinct == len(world.truth)
    finally:
        db.dispose()

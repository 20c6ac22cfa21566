"""Code versions on PostgreSQL with real standalone workers: a worker of another version
leaves a run alone and says why (in its log and in the run's CLI output), while it serves
runs of its own version; a scrape's proxy pool reaches workers through the database.

A worker "of another version" is a real one: the project seen through a directory of
symlinks that holds its own ``.fetchfleet-version`` (as ``deploy`` writes it), so its
``engine.version`` reads that file — the same code, another version, nothing patched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from engine.version import ROOT, VERSION_FILE, compute_version, git_version
from sim.api import ApiConfig
from sim.world import SimWorld, WorldConfig
from storage.bulk import fetch_all
from storage.db import open_database
from tests.keys import KEY_FILE as TEST_KEY_FILE

N_IDS = 120
KEY_FILE = str(TEST_KEY_FILE)


def project_copy(where: Path, version: str | None) -> Path:
    """The project as symlinks (a project directory of its own), with ``version`` in its
    version file."""
    where.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "data", VERSION_FILE):
            (where / entry.name).symlink_to(entry)
    if version:
        (where / VERSION_FILE).write_text(version + "\n")
    return where


def start(args: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.run", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, "FETCHFLEET_SECRET_KEY_FILE": KEY_FILE, **env},
    )


def wait_for(cond: Callable[[], bool], within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def rows(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    db = open_database(url)
    try:
        with db.connect() as conn:
            return [tuple(r) for r in fetch_all(conn, sa.text(sql), params)]
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimWorld, str]]:
    out = tmp_path_factory.mktemp("api")
    config = ApiConfig(limit=None, not_found_per_mille=0, server_error_per_mille=0,
                       flaky_per_mille=0, seed=5)  # fmt: skip
    with SimWorld(WorldConfig(n_proxies=0, api=config, ids=N_IDS, seed=5, out_dir=out)) as w:
        parts = urlsplit(w.api_url)
        yield w, f"http://{parts.hostname}:{parts.port}/users/{{id}}"


def backfill_args(world: SimWorld, template: str, db: str) -> list[str]:
    return ["backfill", "--ids", str(world.ids_file), "--url-template", template, "--db", db,
            "--workers", "0", "--batch-size", "10", "--rate-limit", "2000/1s", "--json"]  # fmt: skip


def test_a_worker_of_another_version_leaves_the_run_alone_and_says_why(
    api: tuple[SimWorld, str], pg_url: str, tmp_path: Path
) -> None:
    world, template = api
    here = compute_version(ROOT)
    other = project_copy(tmp_path / "other", "fake-version-1")
    old = start(["worker", "--db", pg_url, "--host-label", "oldhost"], other,
                tmp_path / "old.log", {})  # fmt: skip
    procs = [old]
    try:
        run1 = start(backfill_args(world, template, pg_url), ROOT, tmp_path / "run1.log", {})
        procs.append(run1)
        why = "run 1 was started by version "
        log1 = tmp_path / "run1.log"
        wait_for(lambda: why in log1.read_text() or run1.poll() is not None)
        assert run1.poll() is None, log1.read_text()
        # still waiting: nobody takes its tasks
        assert rows(pg_url, "SELECT count(*) FROM backfill_items") == [(0,)]

        # a worker of the run's version takes it
        same = start(["worker", "--db", pg_url, "--host-label", "samehost"], ROOT,
                     tmp_path / "same.log", {})  # fmt: skip
        procs.append(same)
        assert run1.wait(120) == 0, (tmp_path / "run1.log").read_text()

        # a run started from the other version's tree: its worker serves it, ours does not
        run2 = start(backfill_args(world, template, pg_url), other, tmp_path / "run2.log", {})
        procs.append(run2)
        assert run2.wait(120) == 0, (tmp_path / "run2.log").read_text()
    finally:
        for proc in reversed(procs):
            stop(proc)

    cli_out = (tmp_path / "run1.log").read_text()
    assert (
        f"run 1 was started by version {here[:12]}" in cli_out
        and "runs fake-version-1" in cli_out
        and "`deploy oldhost`" in cli_out
    ), cli_out
    old_log = (tmp_path / "old.log").read_text()
    assert old_log.count("run 1 was started by version") == 1, old_log  # said once
    assert rows(pg_url, "SELECT id, code_version, status FROM runs ORDER BY id") == [
        (1, here, "completed"),
        (2, "fake-version-1", "completed"),
    ]
    workers = dict(rows(pg_url, "SELECT host, code_version FROM workers"))
    assert workers == {"oldhost": "fake-version-1", "samehost": here}
    by_worker = rows(pg_url, """
        SELECT w.host, i.run_id, count(*) FROM backfill_items i JOIN workers w
        ON w.id = i.worker_id GROUP BY w.host, i.run_id ORDER BY 1, 2""")  # fmt: skip
    assert by_worker == [("oldhost", 2, N_IDS), ("samehost", 1, N_IDS)]


def test_ignore_version_serves_every_run(
    api: tuple[SimWorld, str], pg_url: str, tmp_path: Path
) -> None:
    world, template = api
    other = project_copy(tmp_path / "other", "fake-version-2")
    worker = start(["worker", "--db", pg_url, "--ignore-version"], other, tmp_path / "w.log", {})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine.run", *backfill_args(world, template, pg_url)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        stop(worker)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["done"] == N_IDS
    assert "was started by version" not in done.stderr


def test_a_dirty_version_is_the_commit_and_a_hash_of_the_change(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    commit = git_version(repo)
    assert commit and len(commit) == 40 and compute_version(repo) == commit
    (repo / "untracked.txt").write_text("not part of the version")
    assert compute_version(repo) == commit
    (repo / "a.py").write_text("x = 2\n")
    dirty = compute_version(repo)
    assert dirty.startswith(commit + "-dirty.") and compute_version(repo) == dirty  # stable
    (repo / "a.py").write_text("x = 3\n")
    assert compute_version(repo) not in (dirty, commit)  # other edits, another version
    (repo / VERSION_FILE).write_text("abc\n")  # a deployed tree: the file wins
    assert compute_version(repo) == "abc"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1.2"\n')
    assert compute_version(plain) == "package-1.2"


def test_scrape_proxies_reach_a_worker_elsewhere_through_the_database(
    pg_url: str, tmp_path: Path
) -> None:
    """A scrape through the stored proxy pool on PostgreSQL, done by a standalone worker
    started in another directory with another data directory: it routes through the run's
    pool, read from the database; no pool file is written anywhere."""
    from fetchers.proxy_parse import parse_proxy_line
    from sim.shops import ShopsConfig, ShopSpec, ShopWorld, shop_products
    from storage.proxies import upsert_proxies
    from storage.secrets import SecretBox
    from tests.test_scrape import catalog_spec

    shops = ShopsConfig((ShopSpec("ar-socks", "Argentina", "socks_only", 40, seed=3),))
    with ShopWorld(shops) as world:
        shop = world["ar-socks"]
        db = open_database(pg_url)
        box = SecretBox.load(None, Path(KEY_FILE))
        with db.begin() as conn:
            upsert_proxies(conn, [parse_proxy_line(world.socks_proxy)], box, source="test")
            conn.execute(sa.text("UPDATE proxies SET status = 'active', protocol = 'socks5'"))
        db.dispose()
        spec = tmp_path / "spec.toml"
        spec.write_text(catalog_spec([("Argentina", shop.catalog_url(1))]))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        worker = start(
            ["worker", "--db", pg_url, "--concurrency", "8"],
            elsewhere,
            tmp_path / "worker.log",
            {"PYTHONPATH": str(ROOT), "FETCHFLEET_DATA_DIR": str(elsewhere / "data")},
        )
        coordinator_data = tmp_path / "coordinator-data"
        try:
            done = subprocess.run(
                [sys.executable, "-m", "engine.run", "scrape", "--spec", str(spec), "--db",
                 pg_url, "--json", "--methods", "http", "--proxies", "active", "--strategy",
                 "round_robin", "--workers", "0"],
                cwd=ROOT, capture_output=True, text=True, timeout=180,
                env={**os.environ, "FETCHFLEET_SECRET_KEY_FILE": KEY_FILE,
                     "FETCHFLEET_DATA_DIR": str(coordinator_data)},
            )  # fmt: skip
        finally:
            stop(worker)
        assert done.returncode == 0, done.stderr + (tmp_path / "worker.log").read_text()
        assert json.loads(done.stdout)["counts"]["outcomes"] == {"done": shop.spec.pages}
        want = {p["id"] for p in shop_products(shop.spec)}
    got = {r[0] for r in rows(pg_url, "SELECT external_id FROM entities")}
    assert got == want
    proxies = rows(pg_url, "SELECT DISTINCT proxy FROM fetch_logs")
    assert len(proxies) == 1 and str(proxies[0][0]).startswith("socks5://127.0.0.5:")
    assert rows(pg_url, "SELECT count(*) FROM run_proxies WHERE run_id = 1") == [(1,)]
    assert not (coordinator_data / "pools").exists()  # no pool file: the database only

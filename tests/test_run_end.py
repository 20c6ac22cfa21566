"""Every way a run ends deletes its uploads (data/uploads), unless FETCHFLEET_KEEP_UPLOADS.

A pasted or uploaded list holds proxies and their passwords, or a customer's IDs: once its
run is over (planning copied the items into the database) it must not lie on disk. Runs end
in a coordinator (tasks settle: tests/test_validate_e2e.py), by an operator's command with a
coordinator (the console) or without one (`engine.run cancel` / `stop` in a terminal, which
opens the database itself), and when planning fails. Files named on the command line, outside
data/uploads, are never deleted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.api import submit_run
from engine.files import write_private
from engine.runtime.coordinator import Coordinator
from engine.settings import Settings
from storage import runs
from storage.db import open_database
from tests.keys import KEY_FILE

ROOT = Path(__file__).resolve().parent.parent
IDS = "".join(f"id-{i}\n" for i in range(40)).encode()


def backfill_params(ids_file: Path) -> dict[str, object]:
    # 127.0.0.9:9 answers nothing; these runs never send a request (no coordinator, no pool).
    return {"ids_file": str(ids_file), "url_template": "http://127.0.0.9:9/u/{id}",
            "rate_limit": "10/1s"}  # fmt: skip


def new_run(tmp_path: Path, data: bytes = IDS, keep: bool = False) -> tuple[str, Path, Settings]:
    """A DuckDB file with one running backfill run planned from an upload, no coordinator."""
    s = Settings(data_dir=tmp_path / "data", keep_uploads=keep)
    upload = write_private(s.data_dir / "uploads", "ids.txt", data)
    url = f"duckdb:///{tmp_path / 'r.duckdb'}"
    db = open_database(url)
    try:
        submit_run(db, s, "backfill", backfill_params(upload), "test")
    finally:
        db.dispose()
    return url, upload, s


def engine_run(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FETCHFLEET_DATA_DIR": str(s.data_dir),
        "FETCHFLEET_KEEP_UPLOADS": str(s.keep_uploads).lower(),
        "FETCHFLEET_SECRET_KEY_FILE": str(KEY_FILE),
    }
    return subprocess.run(
        [sys.executable, "-m", "engine.run", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip


def status_of(url: str, run_id: int = 1) -> str | None:
    db = open_database(url)
    try:
        with db.connect() as conn:
            return runs.get_status(conn, run_id)
    finally:
        db.dispose()


@pytest.mark.parametrize("keep", [False, True])
def test_cancel_in_a_terminal_without_a_coordinator_deletes_the_upload(
    tmp_path: Path, keep: bool
) -> None:
    url, upload, s = new_run(tmp_path, keep=keep)
    out = engine_run(s, "cancel", "--db", url, "1")
    assert out.returncode == 0, out.stderr
    assert status_of(url) == "cancelled"
    assert upload.exists() is keep


def test_stop_in_a_terminal_without_a_coordinator_deletes_the_upload(tmp_path: Path) -> None:
    url, upload, s = new_run(tmp_path)
    out = engine_run(s, "stop", "--db", url, "1")
    assert out.returncode == 0, out.stderr
    assert status_of(url) == "stopped"  # nothing was leased: it is stopped at once
    assert not upload.exists()


def test_cancel_through_a_coordinator_deletes_the_upload(tmp_path: Path) -> None:
    """The console's Cancel: ``Coordinator.command``."""
    url, upload, s = new_run(tmp_path)
    elsewhere = tmp_path / "mine.txt"  # named on the command line: never deleted
    elsewhere.write_bytes(IDS)
    db = open_database(url)
    coord = Coordinator(db, s.model_copy(update={"workers": 0})).start()
    try:
        second = submit_run(db, s, "backfill", backfill_params(elsewhere), coord.name)
        assert coord.command(1, "cancel") == "cancelled"
        assert coord.command(second, "cancel") == "cancelled"
        assert not upload.exists()
        assert elsewhere.exists()
    finally:
        coord.shutdown()
        db.dispose()


def test_a_run_whose_planning_failed_deletes_the_upload(tmp_path: Path) -> None:
    url, upload, s = new_run(tmp_path)  # run 1, only for the database
    bad = write_private(s.data_dir / "uploads", "blank.txt", b"\n\n\n")
    db = open_database(url)
    try:
        with pytest.raises(ValueError, match="no valid ID"):
            submit_run(db, s, "backfill", backfill_params(bad), "test")
        with db.connect() as conn:
            assert runs.get_status(conn, 2) == "failed"
    finally:
        db.dispose()
    assert not bad.exists()
    assert upload.exists()  # run 1 is still running

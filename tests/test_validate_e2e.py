"""Proxy validation end to end: the CLI, the pool, crashes, stop/resume, both databases.

Real traffic against sim/ on loopback; real worker processes; real DuckDB and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
from sim.world import SimWorld, WorldConfig
from storage.bulk import fetch_all
from storage.db import open_database
from tests.conftest import cli_here, require_tool, run_cli, start_cli

ROOT = Path(__file__).resolve().parent.parent
# Checks compared with the ground truth wait this long per attempt: twice the sim's slowest
# live proxy (2 s), so a loaded machine cannot turn one into a false negative.
TRUTH_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("world")
    with SimWorld(WorldConfig(n_proxies=120, mix="demo", seed=3, out_dir=out)) as w:
        yield w


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    """Mostly black holes: each check takes the full timeout, so runs last long enough to
    kill a worker or stop the run in the middle."""
    out = tmp_path_factory.mktemp("slow")
    mix = {"elite": 0.5, "blackhole": 0.5}
    with SimWorld(WorldConfig(n_proxies=200, mix=mix, seed=5, out_dir=out)) as w:
        yield w


def checks_of_run(db_url: str, run_id: int) -> tuple[int, int]:
    """(stored checks, distinct proxies) of a run."""
    db = open_database(db_url)
    with db.connect() as conn:
        total, distinct = fetch_all(
            conn,
            sa.text(
                "SELECT count(*), count(DISTINCT proxy_id) FROM proxy_checks WHERE run_id = :r"
            ),
            {"r": run_id},
        )[0]
    db.dispose()
    return int(total), int(distinct)


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The secret key of the in-process runs (and of the worker that decrypts their proxies):
    in this session's own directory, not a path other runs share."""
    return tmp_path_factory.mktemp("key") / "secret.key"


def settings(key_file: Path, **kw: Any) -> Settings:
    base = {
        "workers": 2,
        "concurrency": 50,
        "batch_size": 10,
        "check_timeout_s": 2.0,
        "heartbeat_s": 0.5,
        "lease_s": 10.0,
        "retry_backoff_s": 0.2,
        "secret_key_file": key_file,
    }
    return Settings(**{**base, **kw})


# --- the CLI -------------------------------------------------------------------------------


def test_cli_validate_json_matches_ground_truth(world: SimWorld, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'v.duckdb'}"
    # The sim's `slow` proxies answer after 1-2 s: a 4 s timeout must count them alive.
    out = run_cli(
        "validate",
        "--db",
        db,
        "--proxies",
        str(world.proxies_file),
        "--judge",
        world.judge_url,
        "--timeout",
        str(TRUTH_TIMEOUT_S),
        "--batch-size",
        "10",
        "--workers",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one object"
    summary = json.loads(lines[0])
    assert summary["status"] == "completed" and summary["kind"] == "validate"
    assert summary["counts"]["total"] == summary["counts"]["done"] == len(world.truth)
    assert set(summary) >= {"run_id", "counts", "duration_s", "items_per_s"}
    truth = compare_with_truth(db, world.truth, TRUTH_TIMEOUT_S)
    assert truth["false_positives"] == 0 and truth["false_negatives"] == 0, truth
    assert truth["anonymity_wrong"] == 0 and truth["protocol_wrong"] == 0, truth
    assert truth["too_slow"] == 0 and truth["judged"] > 0, truth
    # status and export see the same numbers
    status = json.loads(run_cli("status", "--db", db, "1", "--json").stdout)
    assert status["counts"] == summary["counts"]
    csv_path = tmp_path / "active.csv"
    exp = run_cli(
        "export",
        "--db",
        db,
        "--table",
        "proxies",
        "--format",
        "csv",
        "--out",
        str(csv_path),
        "--where",
        "status=active",
    )
    assert exp.returncode == 0, exp.stderr
    rows = csv_path.read_text().strip().splitlines()
    assert len(rows) - 1 == summary["counts"]["ok"]
    assert "password" not in rows[0]
    secrets = [t.password for t in world.truth if t.password]
    assert secrets and not any(s in csv_path.read_text() for s in secrets)


def test_cli_rejects_bad_input_clearly(world: SimWorld, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'bad.duckdb'}"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    cases = {
        str(empty): "empty",
        str(binary): "binary",
        str(tmp_path / "missing.txt"): "no such file",
    }
    for i, (path, message) in enumerate(cases.items()):
        run = run_cli if i == 0 else cli_here  # one real process (its exit code); the rest here
        out = run("validate", "--db", db, "--proxies", path, "--judge", world.judge_url)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr
    out = cli_here("validate", "--db", db, "--proxies", str(empty))
    assert out.returncode == 2 and "judge" in out.stderr
    out = cli_here(
        "validate",
        "--db",
        db,
        "--proxies",
        str(world.proxies_file),
        "--judge",
        "http://127.0.0.1:9/get",
        "--timeout",
        "1",
    )
    assert out.returncode == 2 and "did not answer" in out.stderr


def test_malformed_lines_reported_by_number_rest_loaded(world: SimWorld, tmp_path: Path) -> None:
    alive = [t for t in world.truth if t.scheme == "http" and t.behaviour == "elite"][:3]
    lines = [t.line for t in alive] + [
        "10.0.0.1:0",
        "10.0.0.1:70000",
        "[::1]:8080",
        "proxy.example.com:3128",
        "garbage line",
        alive[0].line,  # duplicate
        "10.0.0.9:0:bob:topsecret",  # malformed, with a password that must not leak
    ]
    src = tmp_path / "mixed.txt"
    src.write_text("\n".join(lines) + "\n")
    db = f"duckdb:///{tmp_path / 'm.duckdb'}"
    out = run_cli(
        "validate",
        "--db",
        db,
        "--proxies",
        str(src),
        "--judge",
        world.judge_url,
        "--timeout",
        "1",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["counts"]["total"] == 5  # 3 alive + IPv6 literal + hostname
    assert summary["counts"]["ok"] == 3
    assert "line 4" in out.stderr and "line 5" in out.stderr and "line 8" in out.stderr
    assert "line 10" in out.stderr and "topsecret" not in out.stderr
    assert "Traceback" not in out.stderr
    errors_csv = tmp_path / "errors.csv"
    run_cli("export", "--db", db, "--table", "errors", "--out", str(errors_csv))
    assert "bob:***" in errors_csv.read_text() and "topsecret" not in errors_csv.read_text()


# --- reliability ---------------------------------------------------------------------------


def submit_slow_run(db: Any, s: Settings, coord: Coordinator, world: SimWorld) -> int:
    params = {
        "proxies_file": str(world.proxies_file),
        "judge_url": world.judge_url,
        "timeout_s": 1.0,
        "batch_size": 10,
    }
    return submit_run(db, s, "validate", params, coord.name)


def wait_until_done(db: Any, run_id: int, n: int, timeout_s: float = 30) -> None:
    """Until at least ``n`` items of the run are stored (bounded)."""
    deadline = time.monotonic() + timeout_s
    while wait_run(db, run_id, timeout_s=0)["counts"]["done"] < n:
        assert time.monotonic() < deadline, f"fewer than {n} items done in {timeout_s}s"
        time.sleep(0.2)


def test_kill_9_worker_mid_run_completes_exactly_once(
    slow_world: SimWorld, tmp_path: Path, key_file: Path
) -> None:
    url = f"duckdb:///{tmp_path / 'k.duckdb'}"
    db = open_database(url)
    s = settings(key_file, concurrency=20)
    coord = Coordinator(db, s).start()
    try:
        run_id = submit_slow_run(db, s, coord, slow_world)
        wait_until_done(db, run_id, 20)
        victim, pid = next(iter(coord.pool.pids().items()))
        os.kill(pid, signal.SIGKILL)
        summary = wait_run(db, run_id, timeout_s=120)
        assert summary["status"] == "completed", summary
        assert [r[0] for r in coord.replaced] == [victim]
        assert len(coord.pool.pids()) == 2
    finally:
        coord.shutdown()
        db.dispose()
    total, distinct = checks_of_run(url, run_id)
    assert total == distinct == len(slow_world.truth)


def test_stop_then_resume_loses_nothing_and_checks_nothing_twice(
    slow_world: SimWorld, tmp_path: Path, key_file: Path
) -> None:
    url = f"duckdb:///{tmp_path / 's.duckdb'}"
    db = open_database(url)
    s = settings(key_file, concurrency=10)
    coord = Coordinator(db, s).start()
    try:
        run_id = submit_slow_run(db, s, coord, slow_world)
        wait_until_done(db, run_id, 15)
        assert coord.command(run_id, "stop") == "stopping"
        stopped = wait_run(db, run_id, timeout_s=60)
        assert stopped["status"] == "stopped"
        assert 15 <= stopped["counts"]["done"] < len(slow_world.truth)
        assert coord.command(run_id, "resume") == "running"
        done = wait_run(db, run_id, timeout_s=120)
        assert done["status"] == "completed"
    finally:
        coord.shutdown()
        db.dispose()
    total, distinct = checks_of_run(url, run_id)
    assert total == distinct == len(slow_world.truth)


def start_slow_validate(db: str, world: SimWorld) -> subprocess.Popen[str]:
    """A CLI validate run slow enough (5 at a time, black holes) to reach mid-run."""
    args = ["--db", db, "--proxies", str(world.proxies_file), "--judge", world.judge_url]
    return start_cli(
        "validate", *args, "--timeout", "1", "--concurrency", "5", "--batch-size", "5", "--json"
    )


def wait_for_status_done(db: str, n: int, timeout_s: float = 40) -> None:
    """Poll `engine.run status` from another process until run 1 has ``n`` items stored."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = run_cli("status", "--db", db, "1", "--json")
        if st.returncode == 0 and json.loads(st.stdout)["counts"]["done"] >= n:
            return
        assert time.monotonic() < deadline, st.stderr
        time.sleep(0.3)


def test_ctrl_c_stops_then_status_and_resume_from_other_terminals(
    slow_world: SimWorld, tmp_path: Path
) -> None:
    db = f"duckdb:///{tmp_path / 'c.duckdb'}"
    proc = start_slow_validate(db, slow_world)
    try:
        # While it runs, another terminal reaches it through the control socket.
        wait_for_status_done(db, 5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "stopped"
    resumed = run_cli("resume", "--db", db, "1", "--json", "--timeout", "1", "--concurrency", "100")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    total, distinct = checks_of_run(db, 1)
    assert total == distinct == len(slow_world.truth)


def test_stop_from_another_terminal_reaches_the_coordinator(
    slow_world: SimWorld, tmp_path: Path
) -> None:
    db = f"duckdb:///{tmp_path / 'o.duckdb'}"
    proc = start_slow_validate(db, slow_world)
    try:
        deadline = time.monotonic() + 40
        while (out := run_cli("stop", "--db", db, "1")).returncode != 0:
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.5)
        assert "stopping" in out.stdout
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert json.loads(stdout)["status"] == "stopped"


# --- PostgreSQL: every process connects --------------------------------------------------


@pytest.mark.postgres
def test_postgres_local_pool_and_standalone_worker(
    world: SimWorld, pg_url: str, key_file: Path
) -> None:
    db = open_database(pg_url)
    s = settings(key_file)
    # The coordinator's own pool works straight against PostgreSQL.
    coord = Coordinator(db, s, workers=1).start()
    try:
        run_id = submit_run(
            db,
            s,
            "validate",
            {
                "proxies_file": str(world.proxies_file),
                "judge_url": world.judge_url,
                "timeout_s": TRUTH_TIMEOUT_S,
                "batch_size": 10,
            },
            coord.name,
        )
        assert wait_run(db, run_id, timeout_s=120)["status"] == "completed"
    finally:
        coord.shutdown()
    truth = compare_with_truth(pg_url, world.truth, TRUTH_TIMEOUT_S)
    assert truth["false_positives"] == truth["false_negatives"] == truth["too_slow"] == 0, truth
    # A second run served only by a standalone worker process (`engine.run worker`).
    coord = Coordinator(db, s, workers=0).start()
    try:
        run2 = submit_run(
            db,
            s,
            "validate",
            {
                "status": "active",
                "judge_url": world.judge_url,
                "timeout_s": TRUTH_TIMEOUT_S,
                "batch_size": 5,
            },
            coord.name,
        )
        env = {"FETCHFLEET_SECRET_KEY_FILE": str(s.secret_key_file)}
        worker = run_cli("worker", "--db", pg_url, "--idle-exit", "3", "--json", env=env)
        assert worker.returncode == 0, worker.stderr
        summary = wait_run(db, run2, timeout_s=30)
    finally:
        coord.shutdown()
        db.dispose()
    assert summary["status"] == "completed"
    assert summary["counts"]["total"] >= sum(1 for t in world.truth if t.alive_expected)
    assert summary["counts"]["ok"] >= sum(1 for t in world.truth if t.alive_expected)
    total, distinct = checks_of_run(pg_url, run2)
    assert total == distinct == summary["counts"]["total"]


def test_worker_processes_exit_1_when_one_of_them_failed() -> None:
    """``--processes 2`` used to exit 0 whatever became of its processes."""
    nowhere = "postgresql+psycopg://postgres@127.0.0.1:9/none"  # nothing listens on port 9
    out = run_cli("worker", "--db", nowhere, "--processes", "2")
    assert out.returncode == 1, out.stderr[-1000:]
    assert "2 of 2 worker processes failed" in out.stderr


def test_worker_command_refuses_duckdb(tmp_path: Path) -> None:
    out = run_cli("worker", "--db", str(tmp_path / "x.duckdb"))
    assert out.returncode == 2 and "PostgreSQL" in out.stderr


def test_demo_runs_offline(tmp_path: Path) -> None:
    # The demo scrapes the sim's JS-challenge shop, which only a real browser passes.
    require_tool("chromium", "chromium")
    out = run_cli(
        "demo", "--db", str(tmp_path / "demo.duckdb"), "--proxies", "60", "--json", timeout=180
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "completed" and summary["counts"]["done"] == 60
    assert summary["truth"]["false_positives"] == summary["truth"]["false_negatives"] == 0
    assert summary["truth"]["too_slow"] == 0, summary["truth"]
    scraped = summary["scrape_run"]  # one sim shop per country through its cascade
    assert scraped["status"] == "completed"
    assert scraped["truth"]["missing"] == scraped["truth"]["unexpected"] == 0
    assert scraped["methods"]["Argentina"] == {"tor": 2}  # the SOCKS-only shop, via "tor"
    assert "playwright" in scraped["methods"]["Malaysia"]  # the JS-challenge shop


def test_revalidate_on_a_schedule(world: SimWorld, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'e.duckdb'}"
    elite = [t.line for t in world.truth if t.scheme == "http" and t.behaviour == "elite"][:4]
    src = tmp_path / "few.txt"
    src.write_text("\n".join(elite) + "\n")
    out = run_cli(
        "validate",
        "--db",
        db,
        "--proxies",
        str(src),
        "--judge",
        world.judge_url,
        "--every",
        "1s",
        "--rounds",
        "3",
        "--minutes-old",
        "0",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    rounds = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["run_id"] for r in rounds] == [1, 2, 3]
    assert all(
        r["counts"] == {"total": 4, "done": 4, "ok": 4, "failed": 0, "outcomes": {"alive": 4}}
        for r in rounds
    )
    dbh = open_database(db)
    with dbh.connect() as conn:
        counts = fetch_all(conn, sa.text("SELECT success_count FROM proxies"))
    dbh.dispose()
    assert [c[0] for c in counts] == [3, 3, 3, 3]


@pytest.mark.slow
def test_100_mb_list_streams_with_flat_memory(world: SimWorld, tmp_path: Path) -> None:
    """5.9M lines (a handful of distinct proxies, some malformed) load without holding the
    file: the coordinator's peak RSS stays far below the file size."""
    elite = [t.line for t in world.truth if t.scheme == "http" and t.behaviour == "elite"][:4]
    block = "\n".join([*elite[:3], "127.0.0.1:0", "# comment", "10.1.2.3:1"] * 2000) + "\n"
    src = tmp_path / "big.txt"
    with src.open("w") as fh:
        while fh.tell() < 100_000_000:
            fh.write(block)
        fh.write(elite[3] + "\n")  # a new proxy after millions of duplicates still loads
    db = f"duckdb:///{tmp_path / 'big.duckdb'}"
    args = ["validate", "--db", db, "--proxies", str(src), "--judge", world.judge_url]
    proc = start_cli(*args, "--timeout", "1", "--json")
    peak_kb = 0
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))  # the CLI process's own peak RSS
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["counts"]["total"] == 5 and summary["counts"]["ok"] == 4
    assert "malformed line(s) skipped" in stderr
    assert 0 < peak_kb / 1024 < 400, f"peak RSS {peak_kb / 1024:.0f} MB for a 100 MB file"


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_kill_9_whole_cli_then_resume_takes_over(slow_world: SimWorld, tmp_path: Path) -> None:
    """The coordinator itself dies: `resume` re-queues its orphaned leases at once (DuckDB:
    nobody else can hold them) and finishes the run, each proxy stored once."""
    db = f"duckdb:///{tmp_path / 'k9.duckdb'}"
    proc = start_slow_validate(db, slow_world)
    try:
        wait_for_status_done(db, 10)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    started = time.monotonic()
    resumed = run_cli("resume", "--db", db, "1", "--json", "--timeout", "1", "--concurrency", "100")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    assert time.monotonic() - started < 25, "orphaned leases must not wait for expiry (30 s)"
    total, distinct = checks_of_run(db, 1)
    assert total == distinct == len(slow_world.truth)


@pytest.mark.parametrize("keep", [False, True])
def test_an_uploaded_list_is_deleted_when_its_run_is_done(
    world: SimWorld, tmp_path: Path, keep: bool
) -> None:
    """Pasted and uploaded lists (data/uploads) hold proxies and their passwords: once the
    run is over they are deleted, unless FETCHFLEET_KEEP_UPLOADS asks to keep them; a list
    elsewhere (named on the command line) is never touched."""
    from engine.files import write_private

    data = tmp_path / "data"
    lines = "\n".join(t.line for t in world.truth[:10]) + "\n"
    upload = write_private(data / "uploads", "pasted.txt", lines.encode())
    elsewhere = tmp_path / "mine.txt"
    elsewhere.write_text(lines)
    db = open_database(f"duckdb:///{tmp_path / 'u.duckdb'}")
    s = Settings(workers=1, data_dir=data, keep_uploads=keep, concurrency=20)
    coord = Coordinator(db, s).start()
    try:
        for source in (upload, elsewhere):
            params = {"proxies_file": str(source), "judge_url": world.judge_url, "timeout_s": 2.0}
            run_id = submit_run(db, s, "validate", params, coord.name)
            summary = wait_run(db, run_id, timeout_s=120, sleep=coord.wait_settled)
            assert summary["status"] == "completed" and summary["counts"]["done"] == 10
        deadline = time.monotonic() + 10  # the watchdog's next round, at the latest
        while upload.exists() != keep and time.monotonic() < deadline:
            time.sleep(0.1)
        assert upload.exists() is keep
        assert elsewhere.exists()
    finally:
        coord.shutdown()
        db.dispose()

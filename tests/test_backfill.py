"""The backfill job end to end: CLI against the sim's API, crashes, resume, both databases.

The sim's API enforces its own sliding-window limit and counts every request that broke it,
so "zero 429s" is measured by the server, not by us. Its ID outcomes are a pure function of
the ID (``sim.api.expected_outcome``), so each test knows which IDs must end as failures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.api import submit_run, wait_run
from engine.ratelimit.base import Rate
from engine.runtime.coordinator import Coordinator
from engine.settings import Settings
from sim.api import ApiConfig, expected_outcome
from sim.world import SimWorld, WorldConfig
from storage.bulk import fetch_all
from storage.db import open_database
from tests.conftest import run_cli, start_cli

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "Bearer sim-s3cret-token-4711"
API = ApiConfig(limit=200, window_s=1.0, token=TOKEN.split(" ", 1)[1], seed=4)
ENV = {"SIM_API_TOKEN": TOKEN}
AUTH = "Authorization=env:SIM_API_TOKEN"
# The margin of a test that sends at the API's own limit (200/1s). The limit holds only if
# every request reaches the server less than margin + T after its slot
# (engine/ratelimit/base.py). The sim API stamps a request when its process gets to it, and
# on a loaded machine that process was measured descheduled for 150 ms: with the default
# margin (0.1 s for a 1 s window) the requests of that pause were stamped together and
# the server answered 429. Half the window is several times any pause seen on two busy
# cores; it costs throughput (0.66 of the limit), not coverage.
BUSY_MARGIN_S = 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("api")
    os.environ.update(ENV)  # pool workers inherit it at spawn
    try:
        with SimWorld(WorldConfig(n_proxies=0, api=API, ids=2000, seed=4, out_dir=out)) as w:
            yield w
    finally:
        for key in ENV:
            os.environ.pop(key, None)


def cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with the API's token (tests/test_schedules.py and others
    import it)."""
    return run_cli(*args, timeout=timeout, env={**ENV, **(env or {})})


def ids_of(path: Path) -> list[str]:
    return path.read_text().split()


def stored(db_url: str, run_id: int) -> list[tuple[str, str, str, int | None]]:
    db = open_database(db_url)
    with db.connect() as conn:
        rows = fetch_all(
            conn,
            sa.text(
                "SELECT item_id, status, outcome, http_status FROM backfill_items WHERE run_id = :r"
            ),
            {"r": run_id},
        )
    db.dispose()
    return [tuple(r) for r in rows]


def expected(ids: list[str]) -> Counter[str]:
    """Final outcomes the sim's API will produce (flaky IDs succeed on their retry)."""
    out = Counter(expected_outcome(i, API) for i in ids)
    out["ok"] += out.pop("flaky", 0)
    return out


def assert_exactly_the_input(db_url: str, run_id: int, ids: list[str]) -> None:
    rows = stored(db_url, run_id)
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)), "an ID was stored twice"
    assert set(keys) == set(ids), "the stored set is not the input set"
    assert Counter(r[2] for r in rows) == expected(ids)


def settings(**kw: Any) -> Settings:
    base = {
        "workers": 2,
        "concurrency": 20,
        "batch_size": 20,
        "heartbeat_s": 0.5,
        "lease_s": 10.0,
        "retry_backoff_s": 0.2,
    }
    return Settings(**{**base, **kw})


def params(world: SimWorld, ids_file: Path, rate: str = "200/1s", **kw: Any) -> dict[str, Any]:
    return {
        "ids_file": str(ids_file),
        "url_template": world.api_template,
        "rate_limit": rate,
        "headers": [AUTH],
        "batch_size": 20,
        "retry_backoff_s": 0.1,
        **kw,
    }


def subset(world: SimWorld, tmp_path: Path, n: int, name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(ids_of(world.ids_file)[:n]) + "\n")
    return path


# --- the whole path through the CLI ---------------------------------------------------------


def test_cli_backfill_2000_ids_zero_429_each_once_failures_reported(
    world: SimWorld, tmp_path: Path
) -> None:
    ids = ids_of(world.ids_file)
    db = f"duckdb:///{tmp_path / 'b.duckdb'}"
    world.api_reset()
    out = cli(
        "backfill",
        "--db",
        db,
        "--ids",
        str(world.ids_file),
        "--url-template",
        world.api_template,
        "--rate-limit",
        "200/1s",
        "--rate-margin",
        str(BUSY_MARGIN_S),
        "--header",
        AUTH,
        "--workers",
        "2",
        "--concurrency",
        "50",
        "--batch-size",
        "50",
        "--json",
    )
    assert out.returncode == 0, out.stderr  # completed: permanent failures are counted, not fatal
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    want = expected(ids)
    assert summary["status"] == "completed"
    assert summary["counts"]["total"] == summary["counts"]["done"] == 2000
    assert summary["counts"]["failed"] == want["not_found"] + want["server_error"] > 0
    assert summary["counts"]["outcomes"] == dict(sorted(want.items()))
    stats = world.api_stats()
    assert stats["rate_limited"] == 0, stats  # the server saw no request over its limit
    assert stats["unauthorized"] == 0  # the env header reached the API
    assert stats["peak_window"] <= API.limit
    assert_exactly_the_input(db, summary["run_id"], ids)

    # The report: every ID accounted for, failures by kind with examples, workers' shares.
    rep = cli("report", "--db", db, str(summary["run_id"]), "--json")
    assert rep.returncode == 0, rep.stderr
    report = json.loads(rep.stdout)
    assert report["missing"] == 0
    assert report["input"] == {
        "lines": 2000,
        "blank": 0,
        "duplicates": 0,
        "malformed": 0,
        "unique_ids": 2000,
    }
    kinds = {(e["outcome"], e["http_status"]): e["items"] for e in report["errors"]}
    assert kinds == {
        ("not_found", 404): want["not_found"],
        ("server_error", 500): want["server_error"],
    }
    assert sum(w["items"] for w in report["workers"]) == 2000 and len(report["workers"]) == 2
    # The limit as the client sent: never over it (its stamps follow its slots). Throughput is
    # the schedule's (0.66 of 200/1s with this margin) only when the machine keeps up, so
    # the lower bounds are loose: a busy machine drops late slots, which costs throughput.
    limit = report["limit"]
    assert limit["schedule_max"] == round(Rate(200, 1.0, jitter_s=BUSY_MARGIN_S).utilisation, 4)
    assert 0.5 * limit["schedule_max"] <= limit["peak_window_fraction"] <= 1.0
    assert 0.3 * limit["schedule_max"] <= limit["utilisation"] <= 1.0
    human = cli("report", "--db", db, str(summary["run_id"]))
    assert "not_found (HTTP 404)" in human.stdout and "workers:" in human.stdout

    # Secrets: the run keeps the variable's name; the value is nowhere in the database.
    dbh = open_database(db)
    with dbh.connect() as conn:
        params_json = fetch_all(conn, sa.text("SELECT params FROM runs"))[0][0]
        dump = " ".join(
            str(r)
            for table in ("runs", "tasks", "errors", "workers", "backfill_items")
            for r in fetch_all(conn, sa.text(f"SELECT * FROM {table}"))
        )
        body = fetch_all(
            conn, sa.text("SELECT item_id, body FROM backfill_items WHERE status = 'ok' LIMIT 1")
        )[0]
    dbh.dispose()
    assert json.loads(params_json)["headers"] == [{"name": "Authorization", "env": "SIM_API_TOKEN"}]
    assert TOKEN.split()[1] not in dump and TOKEN.split()[1] not in out.stderr
    assert json.loads(body[1])["id"] == body[0]


def test_cli_rejects_bad_input_with_clear_messages(world: SimWorld, tmp_path: Path) -> None:
    db = str(tmp_path / "bad.duckdb")
    ids = subset(world, tmp_path, 5)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    csv_file = tmp_path / "ids.csv"
    csv_file.write_text("name,did\nx,did:plc:abc\n")
    base = ["--url-template", world.api_template, "--rate-limit", "10/1s"]
    cases: list[tuple[list[str], str]] = [
        (["--ids", str(ids), "--url-template", "http://x/users", "--rate-limit", "10/1s"], "{id}"),
        (["--ids", str(ids), "--url-template", "ftp://x/{id}", "--rate-limit", "1/s"], "http"),
        (
            ["--ids", str(ids), "--url-template", world.api_template, "--rate-limit", "abc"],
            "N/period",
        ),
        (
            ["--ids", str(ids), "--url-template", world.api_template, "--rate-limit", "10/5x"],
            "3000/5m",
        ),
        (["--ids", str(ids), *base, "--header", "Authorization"], "Name=value"),
        (
            ["--ids", str(ids), *base, "--header", "X-Key=env:FF_UNSET_VAR"],
            "FF_UNSET_VAR is not set",
        ),
        (["--ids", str(ids), *base, "--header", "Authorization=Bearer abc"], "env:"),
        (["--ids", str(tmp_path / "missing.txt"), *base], "no such file"),
        (["--ids", str(empty), *base], "empty"),
        (["--ids", str(csv_file), *base], "--id-column"),
        (["--ids", str(csv_file), *base, "--id-column", "id"], "not in the header"),
        (["--url-template", world.api_template], "--ids FILE"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # each is a fresh interpreter: run them side by side
        outs = list(pool.map(lambda case: cli("backfill", "--db", db, *case[0]), cases))
    for (args, message), out in zip(cases, outs, strict=True):
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_lines_blanks_duplicates_and_malformed_reported_by_number(
    world: SimWorld, tmp_path: Path
) -> None:
    good = ids_of(world.ids_file)[:6]
    lines = [
        good[0],
        "",
        good[1],
        "   ",
        "bad id with spaces",  # line 5
        good[0],  # duplicate
        "# a comment",
        good[2],
        "x" * 600,  # line 9: too long
        good[3] + "\x07",  # line 10: control character
        good[4],
        good[5],
        good[1],  # duplicate
    ]
    src = tmp_path / "mixed.txt"
    src.write_text("\n".join(lines) + "\n")
    db = f"duckdb:///{tmp_path / 'm.duckdb'}"
    out = cli(
        "backfill",
        "--db",
        db,
        "--ids",
        str(src),
        "--url-template",
        world.api_template,
        "--rate-limit",
        "50/1s",
        "--header",
        AUTH,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["counts"]["total"] == summary["counts"]["done"] == 5
    cost = summary["cost"]  # every request is an API call; the bodies are what was stored
    dbh = open_database(db)
    with dbh.connect() as conn:
        calls, body, ok = fetch_all(
            conn,
            sa.text(
                "SELECT sum(attempts), sum(strlen(body)), "
                "count(*) FILTER (WHERE status = 'ok') FROM backfill_items"
            ),
        )[0]
    dbh.dispose()
    assert cost["api_calls"] == cost["requests"]["api"] == calls >= 5
    assert cost["bytes"] == {"direct": body, "proxy": 0, "tor": 0} and cost["stored"] == ok
    for n in (5, 9, 10):
        assert f"line {n}:" in out.stderr, out.stderr
    report = json.loads(cli("report", "--db", db, "1", "--json").stdout)
    assert report["input"] == {
        "lines": 13,
        "blank": 3,
        "duplicates": 2,
        "malformed": 3,
        "unique_ids": 5,
    }
    assert_exactly_the_input(db, 1, [good[0], good[1], good[2], good[4], good[5]])


def test_csv_column_with_pattern(world: SimWorld, tmp_path: Path) -> None:
    good = ids_of(world.ids_file)[:3]
    src = tmp_path / "users.csv"
    rows = [
        "name,did,n",
        f"a,{good[0]},1",
        f'"b, quoted",{good[1]},2',
        "c,not-a-did,3",
        f"d,{good[2]}",
    ]
    src.write_text("\n".join(rows) + "\n")
    db = f"duckdb:///{tmp_path / 'c.duckdb'}"
    out = cli(
        "backfill",
        "--db",
        db,
        "--ids",
        str(src),
        "--id-column",
        "did",
        "--id-pattern",
        r"did:plc:[a-z2-7]{24}",
        "--url-template",
        world.api_template,
        "--rate-limit",
        "50/1s",
        "--header",
        AUTH,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["counts"]["total"] == 3
    assert "line 4:" in out.stderr and "id-pattern" in out.stderr
    assert_exactly_the_input(db, 1, good)


# --- crashes and resume ---------------------------------------------------------------------


def test_kill_9_worker_mid_run_then_exact_set(world: SimWorld, tmp_path: Path) -> None:
    ids_file = subset(world, tmp_path, 600)
    url = f"duckdb:///{tmp_path / 'k.duckdb'}"
    db = open_database(url)
    s = settings()
    world.api_reset()
    coord = Coordinator(db, s).start()
    try:
        run_id = submit_run(db, s, "backfill", params(world, ids_file, rate="150/1s"), coord.name)
        deadline = time.monotonic() + 30
        while wait_run(db, run_id, timeout_s=0)["counts"]["done"] < 150:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim, pid = next(iter(coord.pool.pids().items()))
        os.kill(pid, signal.SIGKILL)
        summary = wait_run(db, run_id, timeout_s=60)
        assert summary["status"] == "completed", summary
        assert [r[0] for r in coord.replaced] == [victim]
    finally:
        coord.shutdown()
        db.dispose()
    assert world.api_stats()["rate_limited"] == 0
    assert_exactly_the_input(url, run_id, ids_of(ids_file))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.parametrize(
    "backend", ["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_kill_9_whole_cli_then_resume_finishes_exactly_once(
    world: SimWorld, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The CLI (coordinator and pool) is killed mid-run; `resume` finishes the run. On
    PostgreSQL the orphaned pool workers could still store: they stop on their own, and the
    resume joins the run left `running` (it used to exit 2, "run is running")."""
    ids_file = subset(world, tmp_path, 800)
    db = (
        f"duckdb:///{tmp_path / 'r.duckdb'}"
        if backend == "duckdb"
        else request.getfixturevalue("pg_url")
    )
    world.api_reset()
    proc = start_cli(
        "backfill", "--db", db, "--ids", str(ids_file), "--url-template", world.api_template,
        "--rate-limit", "150/1s", "--header", AUTH, "--workers", "2", "--concurrency", "20",
        "--batch-size", "20", "--json", env=ENV,
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 40
        while world.api_stats()["requests"] < 250:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.1)
        workers = _children(proc.pid)
        proc.kill()  # SIGKILL: no cleanup, the run stays `running` in the database
        proc.wait(10)  # not communicate(): orphaned workers may still hold its pipes
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Orphaned pool workers notice their coordinator is gone and stop sending (on
    # PostgreSQL after finishing what is in flight and handing their tasks back).
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() and _is_running(w) for w in workers):
        assert time.monotonic() < deadline, "pool workers outlived their coordinator"
        time.sleep(0.1)
    before = world.api_stats()["requests"]
    assert before < 800 + 40  # it was killed mid-run
    resumed = cli("backfill", "--db", db, "--resume", "1", "--json", "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed" and summary["counts"]["done"] == 800
    assert world.api_stats()["rate_limited"] == 0  # across the crash too (shared file)
    assert_exactly_the_input(db, 1, ids_of(ids_file))
    again = cli("backfill", "--db", db, "--resume", "1", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "completed"


def test_wrong_token_then_retry_failed_fetches_them_again(world: SimWorld, tmp_path: Path) -> None:
    """Every ID refused (401) is a completed run with every ID failed; after fixing the token,
    `--resume --retry-failed` fetches the failed IDs again and each is stored once."""
    ids_file = subset(world, tmp_path, 120)
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    args = ["--url-template", world.api_template, "--rate-limit", "200/1s", "--header", AUTH]
    wrong = cli(
        "backfill", "--db", db, "--ids", str(ids_file), *args, "--json",
        env={"SIM_API_TOKEN": "Bearer wrong-token"},
    )  # fmt: skip
    assert wrong.returncode == 0, wrong.stderr
    first = json.loads(wrong.stdout)
    assert first["counts"]["failed"] == 120 and first["counts"]["outcomes"] == {"client_error": 120}
    again = cli("backfill", "--db", db, "--resume", "1", "--retry-failed", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["status"] == "completed" and summary["counts"]["done"] == 120
    assert_exactly_the_input(db, 1, ids_of(ids_file))
    assert "wrong-token" not in json.dumps(stored(db, 1))


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_then_resume_loses_nothing(world: SimWorld, tmp_path: Path) -> None:
    ids_file = subset(world, tmp_path, 300)
    url = f"duckdb:///{tmp_path / 's.duckdb'}"
    db = open_database(url)
    s = settings(workers=1)
    coord = Coordinator(db, s).start()
    try:
        run_id = submit_run(db, s, "backfill", params(world, ids_file, rate="100/1s"), coord.name)
        deadline = time.monotonic() + 60
        while wait_run(db, run_id, timeout_s=0)["counts"]["done"] < 50:
            assert time.monotonic() < deadline, "50 IDs were not stored within 60 s"
            time.sleep(0.1)
        assert coord.command(run_id, "stop") == "stopping"
        stopped = wait_run(db, run_id, timeout_s=30)
        assert stopped["status"] == "stopped"
        assert 50 <= stopped["counts"]["done"] < 300
        assert coord.command(run_id, "resume") == "running"
        assert wait_run(db, run_id, timeout_s=60)["status"] == "completed"
    finally:
        coord.shutdown()
        db.dispose()
    assert_exactly_the_input(url, run_id, ids_of(ids_file))


# --- the job against the API: retries, 429 ----------------------------------------------------


def test_429_honours_retry_after_and_slows_the_shared_limiter(
    world: SimWorld, tmp_path: Path
) -> None:
    """A client limit far above the server's: the first 429 pushes the shared schedule back
    by Retry-After, so refusals stop instead of repeating, and every ID still succeeds."""
    import asyncio

    from engine.jobs.backfill.kind import BackfillExecutor, BackfillJob
    from engine.ratelimit.base import MemoryLimiter

    ids = [i for i in ids_of(world.ids_file)[:400] if expected_outcome(i, API) == "ok"][:300]
    prepared = BackfillJob(settings()).prepare(params(world, subset(world, tmp_path, 5), "5000/1s"))
    world.api_reset()

    async def main() -> list[tuple[bool, str, dict]]:
        ex = BackfillExecutor(prepared, 100, MemoryLimiter())
        try:
            return await asyncio.gather(*(ex.execute(i) for i in ids))
        finally:
            await ex.aclose()

    started = time.monotonic()
    results = asyncio.run(main())
    took = time.monotonic() - started
    assert all(ok for ok, _, _ in results), [r for r in results if not r[0]][:3]
    retried = [d["attempts"] for _, _, d in results if d["attempts"] > 1]
    stats = world.api_stats()
    assert stats["rate_limited"] == len(retried) > 0  # the refused ones were retried
    assert stats["rate_limited"] <= 100, stats  # one burst of refusals, then it waited
    assert took >= 1.0  # Retry-After (1 s) was honoured


# --- PostgreSQL: every process connects -----------------------------------------------------


@pytest.mark.postgres
def test_postgres_pool_shares_the_limit_through_the_database(
    world: SimWorld, pg_url: str, tmp_path: Path
) -> None:
    ids_file = subset(world, tmp_path, 500)
    db = open_database(pg_url)
    s = settings()
    world.api_reset()
    coord = Coordinator(db, s).start()
    try:
        run_id = submit_run(
            db, s, "backfill", params(world, ids_file, rate_margin_s=BUSY_MARGIN_S), coord.name
        )
        assert wait_run(db, run_id, timeout_s=60)["status"] == "completed"
    finally:
        coord.shutdown()
    with db.connect() as conn:
        keys = fetch_all(conn, sa.text("SELECT key, tat FROM rate_limits"))
    db.dispose()
    assert [k[0] for k in keys] == [world.api_url]  # one row: the API's origin
    assert world.api_stats()["rate_limited"] == 0
    assert_exactly_the_input(pg_url, run_id, ids_of(ids_file))


# --- storage ----------------------------------------------------------------------------------


def test_store_is_exactly_once_per_run_and_id(db_url: str) -> None:
    from engine.jobs.backfill.kind import BackfillJob
    from engine.model import ItemResult

    db = open_database(db_url)
    job = BackfillJob(Settings())

    def result(item: str, ok: bool = True) -> ItemResult:
        return ItemResult(
            run_id=1,
            task_id=1,
            ref=item,
            ok=ok,
            outcome="ok" if ok else "not_found",
            data={"http_status": 200 if ok else 404, "body": '{"a": 1}', "attempts": 1},
            worker_id="w",
        )

    try:
        with db.begin() as conn:
            assert job.store(conn, [result("a"), result("b"), result("a")]) == 2
        with db.begin() as conn:
            assert job.store(conn, [result("b", ok=False), result("c")]) == 1
            assert job.load_items(conn, 1, ["a", "b", "c", "d"]) == ["d"]
            assert job.outcome_counts(conn, 1) == {"ok": 3}
    finally:
        db.dispose()


def test_v1_database_upgrades_without_losing_data(db_url: str) -> None:
    """A database made by version 1 (before backfill) gains the new tables on open."""
    from datetime import datetime

    from storage import schema
    from storage.migrations import STEPS

    v1 = [
        "schema_version",
        "runs",
        "tasks",
        "workers",
        "commands",
        "errors",
        "proxies",
        "proxy_checks",
    ]
    v1_tables = [schema.TABLES[n] for n in v1]
    engine = sa.create_engine(db_url)
    exists = sa.text(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'backfill_items'"
    )
    with engine.begin() as conn:
        schema.metadata.create_all(conn, tables=v1_tables)
        conn.execute(
            sa.insert(schema.schema_version).values(
                version=1, description="initial", applied_at=datetime(2024, 1, 1)
            )
        )
        conn.execute(
            sa.insert(schema.runs).values(
                kind="validate", status="completed", params="{}", created_at=datetime(2024, 1, 1)
            )
        )
        assert conn.execute(exists).scalar() == 0  # a real version-1 database
    engine.dispose()
    db = open_database(db_url)
    try:
        with db.connect() as conn:
            versions = [
                r[0] for r in fetch_all(conn, sa.text("SELECT version FROM schema_version"))
            ]
            runs_rows = fetch_all(conn, sa.text("SELECT kind, status FROM runs"))
            for table in ("backfill_items", "backfill_inputs", "backfill_runs", "rate_limits"):
                fetch_all(conn, sa.text(f"SELECT count(*) FROM {table}"))
            assert conn.execute(exists).scalar() == 1
    finally:
        db.dispose()
    assert sorted(versions) == [v for v, _, _ in STEPS]  # every step, once
    assert runs_rows == [("validate", "completed")]


# --- planning a million IDs -------------------------------------------------------------------


@pytest.mark.slow
def test_a_million_ids_plan_without_holding_the_list(tmp_path: Path) -> None:
    """1,000,000 IDs (plus 1,000 duplicates) plan with the same peak Python heap as 50,000:
    the list is streamed in chunks and deduplicated in SQL. (The process's RSS also holds
    DuckDB's buffer cache, which its memory_limit bounds and which spills to disk.)"""
    from sim.api import generate_ids, write_ids

    big = write_ids(tmp_path / "big.txt", 1_000_000)
    with big.open("a") as fh:
        fh.write("\n".join(generate_ids(1000)) + "\n")
    small = write_ids(tmp_path / "small.txt", 50_000)
    code = (
        "import json, sys, time, tracemalloc\n"
        "from engine.api import submit_run\n"
        "from engine.settings import Settings\n"
        "from engine.summary import run_summary\n"
        "from storage.db import open_database\n"
        "import pyarrow, engine.jobs.backfill.kind\n"
        "db = open_database(sys.argv[1])\n"
        "tracemalloc.start()\n"
        "t = time.monotonic()\n"
        "run = submit_run(db, Settings(batch_size=50), 'backfill', {'ids_file': sys.argv[2],"
        " 'url_template': 'http://127.0.0.3:9/u/{id}', 'rate_limit': '10/1s'}, 'test')\n"
        "peak = tracemalloc.get_traced_memory()[1] / 2**20\n"
        "print(json.dumps({'peak_mb': peak, 'seconds': time.monotonic() - t,"
        " 'total': run_summary(db, run)['counts']['total']}))\n"
    )

    def plan(name: str, path: Path) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", code, f"duckdb:///{tmp_path / name}", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    small_run = plan("s.duckdb", small)
    big_run = plan("b.duckdb", big)
    print(f"\nplanning (traced): 50k {small_run}, 1M {big_run}")
    assert small_run["total"] == 50_000 and big_run["total"] == 1_000_000
    # A set of a million such strings alone would be ~110 MB.
    assert big_run["peak_mb"] < small_run["peak_mb"] + 10, (small_run, big_run)
    assert big_run["peak_mb"] < 80


# --- small pieces -----------------------------------------------------------------------------


def test_byte_order_mark_and_crlf_are_not_part_of_ids(tmp_path: Path) -> None:
    from engine.jobs.backfill.kind import _check_ids_file, iter_ids

    text = tmp_path / "ids.txt"
    text.write_bytes(b"\xef\xbb\xbfdid:plc:a\r\ndid:plc:b\r\n\r\n")
    assert [line.item_id for line in iter_ids(text)] == ["did:plc:a", "did:plc:b", None]
    table = tmp_path / "ids.csv"
    table.write_bytes(b"\xef\xbb\xbfdid,n\r\nx1,1\r\nx2,2\r\n")
    _check_ids_file(str(table), "did")  # the BOM is not part of the header's first name
    assert [line.item_id for line in iter_ids(table, "did")] == ["x1", "x2"]


def test_header_values_from_the_environment_are_masked_in_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import asyncio

    from engine.jobs.backfill.kind import BackfillExecutor, BackfillJob
    from engine.ratelimit.base import MemoryLimiter

    monkeypatch.setenv("FF_TEST_TOKEN", "Bearer abcdefgh12345678")
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    prepared = BackfillJob(Settings()).prepare(
        {
            "ids_file": str(ids),
            "url_template": "http://127.0.0.1:9/u/{id}",
            "rate_limit": "10/1s",
            "headers": ["Authorization=env:FF_TEST_TOKEN"],
        }
    )
    assert "abcdefgh" not in json.dumps(prepared)

    async def main() -> str:
        ex = BackfillExecutor(prepared, 1, MemoryLimiter())
        try:
            return ex.redact("HTTP 401: got Bearer abcdefgh12345678 (token abcdefgh12345678)")
        finally:
            await ex.aclose()

    assert asyncio.run(main()) == "HTTP 401: got *** (token ***)"

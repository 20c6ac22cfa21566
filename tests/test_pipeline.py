"""Pipelines (engine.pipelines.runner): steps in order, failure and resume, stop with saved state,
scripts as steps (environment, output, exit code, SIGTERM), and the CLI killed with -9 then
resumed — on real DuckDB and PostgreSQL, real subprocesses, the sim shops on loopback."""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.pipelines.cli import split_ref
from engine.pipelines.runner import (
    Pipeline,
    PipelineControl,
    PipelineError,
    PipelineResult,
    ScriptStep,
    Step,
    StepContext,
    entity_from,
    run_pipeline,
)
from engine.pipelines.script import script_db
from engine.summary import run_summary
from examples import pipelines as examples
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from storage import pipelines as ps
from storage import runs as run_store
from storage.bulk import fetch_all
from storage.db import Database, open_database
from tests.conftest import cli_here, run_cli, start_cli

REPO = Path(__file__).resolve().parents[1]
LEGACY = str(REPO / "examples" / "legacy_scraper.py")
N_PRODUCTS = 100  # 5 catalog pages


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(ShopsConfig((ShopSpec("plain", "Malaysia", n_products=N_PRODUCTS),))) as w:
        yield w


def steps_of(db: Database, run_id: int) -> list[ps.StepRow]:
    with db.connect() as conn:
        return ps.get_steps(conn, run_id)


def logs_of(db: Database, run_id: int, step: str | None = None) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return ps.read_logs(conn, run_id, step)


def count(db: Database, sql: str, **params: Any) -> int:
    with db.connect() as conn:
        return int(fetch_all(conn, sa.text(sql), params)[0][0])


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class InThread:
    """run_pipeline in a thread, so the test can stop it."""

    def __init__(self, db: Database, pipeline: Pipeline, **kw: Any) -> None:
        self.control = PipelineControl(db, poll_s=0.1)
        self.result: PipelineResult | None = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = run_pipeline(db, pipeline, control=self.control, **kw)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def run_id(self) -> int:
        return wait_for(lambda: self.control.run_id, what="the run to start")

    def join(self, timeout: float = 20.0) -> PipelineResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the pipeline did not end"
        if self.error:
            raise self.error
        assert self.result is not None
        return self.result


# --- Python steps ----------------------------------------------------------------------------


def test_steps_run_in_order_and_each_is_recorded(db: Database):
    seen: list[tuple[str, int, str]] = []
    urls: list[str] = []

    def make(name: str) -> Step:
        def fn(ctx: StepContext) -> None:
            seen.append((name, ctx.run_id, ctx.country))
            ctx.log(f"{name} ran")
            urls.append(ctx.db_url)

        return Step(name, fn)

    p = Pipeline("ordered", "Malaysia", [make("first"), make("second"), make("third")])
    result = run_pipeline(db, p)
    assert result.status == "completed" and result.error is None
    assert urls == [db.display_url] * 3  # never with a password
    assert seen == [(n, result.run_id, "Malaysia") for n in ("first", "second", "third")]
    rows = steps_of(db, result.run_id)
    assert [(r.position, r.name, r.status) for r in rows] == [
        (0, "first", "done"),
        (1, "second", "done"),
        (2, "third", "done"),
    ]
    for earlier, later in itertools.pairwise(rows):
        assert earlier.started_at <= earlier.finished_at <= later.started_at
    stdout = [(s, line) for s, stream, line in logs_of(db, result.run_id) if stream == "stdout"]
    assert stdout == [("first", "first ran"), ("second", "second ran"), ("third", "third ran")]
    summary = run_summary(db, result.run_id)
    assert summary["kind"] == "pipeline" and summary["status"] == "completed"
    assert summary["counts"]["total"] == 3 and summary["counts"]["ok"] == 3
    with db.connect() as conn:
        run = run_store.get_run(conn, result.run_id)
        # a watchdog's settle (any coordinator) must not touch a pipeline run
        assert run_store.settle(conn) == []
    assert run is not None and run.params["pipeline"] == "ordered"
    assert run.params["country"] == "Malaysia" and run.params["steps"] == [
        "first",
        "second",
        "third",
    ]


def test_a_failing_step_fails_the_run_and_resume_starts_at_it(db: Database):
    calls = {"a": 0, "b": 0, "c": 0}

    def a(ctx: StepContext) -> None:
        calls["a"] += 1
        ctx.store("item", [{"id": "x1", "n": 1}])

    def b(ctx: StepContext) -> None:
        calls["b"] += 1
        if calls["b"] == 1:
            raise RuntimeError("boom")

    def c(ctx: StepContext) -> None:
        calls["c"] += 1

    p = Pipeline("fails", "India", [Step("a", a), Step("b", b), Step("c", c)])
    first = run_pipeline(db, p)
    assert first.status == "failed"
    assert first.error == "step b failed: RuntimeError: boom"
    rows = steps_of(db, first.run_id)
    assert [r.status for r in rows] == ["done", "failed", "pending"]
    assert rows[1].error == "RuntimeError: boom"
    assert any("RuntimeError: boom" in line for _, _, line in logs_of(db, first.run_id, "b"))
    assert calls == {"a": 1, "b": 1, "c": 0}
    changed = Pipeline("fails", "India", [Step("a", a), Step("c", c)])
    with pytest.raises(PipelineError, match="started with"):
        run_pipeline(db, changed, first.run_id)

    again = run_pipeline(db, p, first.run_id)
    assert again.run_id == first.run_id and again.status == "completed"
    assert again.error is None
    assert calls == {"a": 1, "b": 2, "c": 1}  # a was not run again
    assert [r.status for r in steps_of(db, first.run_id)] == ["done", "done", "done"]
    assert count(db, "SELECT count(*) FROM entities WHERE entity_type = 'item'") == 1
    with pytest.raises(PipelineError, match="completed"):
        run_pipeline(db, p, first.run_id)


def test_stop_during_a_long_step_then_resume_continues_from_its_state(
    db: Database, db_url: str, shops: ShopWorld, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("EXAMPLE_SHOP_URL", shops["plain"].base_url)
    monkeypatch.setenv("EXAMPLE_PAGE_DELAY_S", "0.3")
    fetched: list[str] = []

    def walk(ctx: StepContext) -> None:
        real = ctx.fetch

        def counting(url: str, **kw: Any) -> Any:
            fetched.append(url)
            return real(url, method="http", **kw)

        ctx.fetch = counting  # type: ignore[method-assign]
        examples.catalog(ctx)

    p = Pipeline("walk", "Malaysia", [Step("catalog", walk)])
    running = InThread(db, p)
    run_id = running.run_id()
    wait_for(lambda: steps_of(db, run_id)[0].state.get("pages", 0) >= 2, what="two pages stored")
    with pytest.raises(PipelineError, match="already running"):
        run_pipeline(db, p, run_id)
    if db.is_duckdb:  # what the control socket does for `engine.run stop` in DuckDB mode
        running.control.command(run_id, "stop", "test")
    else:  # another terminal: `engine.run stop` writes the status, the runner polls it
        other = open_database(db_url)
        with other.begin() as conn:
            run_store.apply_command(conn, run_id, "stop", "another terminal")
        other.dispose()
    stopped = running.join()
    assert stopped.status == "stopped"
    step = steps_of(db, run_id)[0]
    assert step.status == "stopped"
    pages_before = step.state["pages"]
    assert 2 <= pages_before < 5
    stored = count(db, "SELECT count(*) FROM entities WHERE entity_type = 'product'")
    assert stored == 20 * pages_before

    monkeypatch.setenv("EXAMPLE_PAGE_DELAY_S", "0")
    resumed = run_pipeline(db, p, run_id)
    assert resumed.status == "completed"
    # every catalog page fetched once over both runs: the resume started at the saved cursor
    assert sorted(fetched) == sorted(shops["plain"].catalog_url(i) for i in range(1, 6))
    assert count(db, "SELECT count(*) FROM entities WHERE entity_type = 'product'") == N_PRODUCTS
    assert count(db, "SELECT count(*) FROM entity_attributes") == 4 * N_PRODUCTS
    assert count(db, "SELECT count(*) FROM fetch_logs WHERE run_id = :r", r=run_id) == 5
    pages = [line for _, _, line in logs_of(db, run_id, "catalog") if line.startswith("page ")]
    assert [p.split(":")[0] for p in pages] == [f"page {i}" for i in range(1, 6)]


def test_dict_entities_get_types_and_a_stable_hash():
    a = entity_from({"id": 7, "name": "Zinc", "price": 1.5, "stock": 3, "ok": True, "url": "u"})
    b = entity_from({"url": "u", "ok": True, "stock": 3, "price": 1.5, "name": "Zinc", "id": "7"})
    assert a.external_id == "7" and a.content_hash == b.content_hash and a.source_url == "u"
    assert ("ok", "true", "bool") in a.attributes and ("stock", "3", "int") in a.attributes
    with pytest.raises(ValueError, match="'id'"):
        entity_from({"name": "no id"})


# --- scripts as steps ------------------------------------------------------------------------


def test_script_step_gets_the_run_env_streams_output_and_records_exit_codes(db: Database):
    p = Pipeline(
        "scripts",
        "Russia",
        [
            ScriptStep("ok", [sys.executable, LEGACY, "--lines", "4"]),
            ScriptStep("bad", [sys.executable, LEGACY, "--lines", "4", "--exit", "3"]),
        ],
    )
    result = run_pipeline(db, p)
    run_id = result.run_id
    assert result.status == "failed"
    assert result.error == "step bad failed: exit code 3; last stderr: warning 3"
    ok, bad = steps_of(db, run_id)
    assert (ok.status, ok.exit_code) == ("done", 0)
    assert (bad.status, bad.exit_code) == ("failed", 3)
    lines = [(stream, line) for _, stream, line in logs_of(db, run_id, "ok")]
    stdout = [line for stream, line in lines if stream == "stdout"]
    expect_db = script_db(db.url)
    assert stdout == [
        f"legacy scraper: run {run_id} country Russia db {expect_db}",
        "line 0",
        "line 1",
        "line 2",
        "line 3",
        "legacy scraper: done",
    ]
    assert [line for stream, line in lines if stream == "stderr"] == ["warning 1", "warning 3"]
    assert ("engine", "step ok done (exit code 0)") in lines


def test_script_db_keeps_the_password_only_for_the_script(tmp_path: Path):
    url = "postgresql+psycopg://fleet:s3cret@db.example:5432/ff"
    assert script_db(url) == "postgresql://fleet:s3cret@db.example:5432/ff"
    assert script_db(f"duckdb:///{tmp_path}/x.duckdb") == str(tmp_path / "x.duckdb")


def test_a_stop_sends_sigterm_to_the_script_and_resume_runs_it_again(duckdb_url: str):
    db = open_database(duckdb_url)
    try:
        argv = [sys.executable, LEGACY, "--lines", "40", "--interval", "0.05"]
        p = Pipeline("slow-script", "Chile", [ScriptStep("legacy", argv, grace_s=5)])
        running = InThread(db, p)
        run_id = running.run_id()
        wait_for(
            lambda: any(line == "line 3" for _, _, line in logs_of(db, run_id)),
            what="the script's output",
        )
        running.control.command(run_id, "stop", "test")
        result = running.join()
        assert result.status == "stopped"
        step = steps_of(db, run_id)[0]
        assert step.status == "stopped" and step.exit_code == 143
        lines = [line for _, _, line in logs_of(db, run_id)]
        assert "stop requested: SIGTERM to the script" in lines
        assert "legacy scraper: got SIGTERM, saving and exiting" in lines
        assert "line 39" not in lines

        again = run_pipeline(db, p, run_id)
        assert again.status == "completed"
        assert steps_of(db, run_id)[0].exit_code == 0
        lines = [line for _, _, line in logs_of(db, run_id)]
        assert lines.count("line 0") == 2 and lines.count("line 39") == 1
    finally:
        db.dispose()


# --- the CLI ---------------------------------------------------------------------------------


class Cli:
    """`python -m engine.run …` as a subprocess whose stderr is collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = start_cli(*args, env=env)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 20.0) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"CLI exited: {self.lines[-20:]}")
            return next((line for line in self.lines if needle in line), None)

        return wait_for(found, timeout, f"{needle!r} on stderr ({self.lines[-5:]})")

    def run_id(self) -> int:
        line = self.wait_line("[run] run ")
        return int(line.removeprefix("[run] run ").split(":")[0])

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        # Not communicate(): it would read (and close) stderr under the reader thread's feet.
        # It prints one summary on stdout: far less than a pipe holds, so waiting first
        # cannot block it, and the wait is bounded.
        assert self.proc.stdout is not None
        self.proc.wait(timeout)
        out = self.proc.stdout.read()
        self._reader.join(5)
        return self.proc.returncode, out


def test_cli_killed_with_9_mid_step_then_resumed_stores_everything_once(
    tmp_path: Path, shops: ShopWorld
):
    path = tmp_path / "ff.duckdb"
    env = {"EXAMPLE_SHOP_URL": shops["plain"].base_url, "EXAMPLE_PAGE_DELAY_S": "0.4"}
    run = Cli("pipeline", "examples/pipelines.py:shop", "--db", str(path), env=env)
    run_id = run.run_id()
    run.wait_line("[catalog] page 2:")
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish()[0] == -signal.SIGKILL

    db = open_database(str(path))  # the lock went with the process
    try:
        catalog = steps_of(db, run_id)[0]
        assert catalog.status == "running" and 2 <= catalog.state["pages"] < 5
    finally:
        db.dispose()

    out = run_cli("pipeline", "--resume", str(run_id), "--db", str(path), "--json", env=env)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["run_id"] == run_id and summary["status"] == "completed"
    assert [s["status"] for s in summary["pipeline"]["steps"]] == ["done", "done", "done"]
    db = open_database(str(path))
    try:
        assert count(db, "SELECT count(*) FROM entities WHERE entity_type = 'product'") == 100
        assert count(db, "SELECT count(*) FROM entities WHERE entity_type = 'product_detail'") == (
            N_PRODUCTS
        )
        # product: name, price, sku, url; product_detail: in_stock, url — each stored once
        assert count(db, "SELECT count(*) FROM entity_attributes") == 6 * N_PRODUCTS
        lines = [line for _, _, line in logs_of(db, run_id)]
        assert f"run {run_id}: pipeline shop for Malaysia resumed at step catalog" in lines
        assert "legacy scraper: done" in lines
        legacy = steps_of(db, run_id)[2]
        assert legacy.exit_code == 0
    finally:
        db.dispose()


def test_cli_stop_from_another_terminal_and_ctrl_c_stop_the_script(tmp_path: Path):
    path = str(tmp_path / "ff.duckdb")
    run = Cli("pipeline", "examples/pipelines.py:legacy", "--country", "India", "--db", path)
    run_id = run.run_id()
    run.wait_line("[legacy] line 3")
    # the DuckDB file is held by the pipeline: `stop` goes through its control socket
    out = run_cli("stop", str(run_id), "--db", path)
    assert out.returncode == 0, out.stderr
    assert run.finish()[0] == 1
    assert any("got SIGTERM" in line for line in run.lines)
    status = cli_here("status", str(run_id), "--db", path, "--json")
    assert json.loads(status.stdout)["status"] == "stopped", status.stderr

    again = Cli("pipeline", "--resume", str(run_id), "--db", path)
    again.wait_line("[legacy] line 2")
    again.proc.send_signal(signal.SIGINT)
    code, out = again.finish()
    assert code == 1, again.lines
    assert "stopped" in out and "step 1 legacy: stopped, exit code 143" in out
    db = open_database(path)
    try:
        lines = [line for _, _, line in logs_of(db, run_id)]
        assert lines.count("legacy scraper: got SIGTERM, saving and exiting") == 2
        with db.connect() as conn:
            run_row = run_store.get_run(conn, run_id)
        assert run_row is not None and run_row.status == "stopped"
        assert run_row.params["ref"].endswith("examples/pipelines.py:legacy")
    finally:
        db.dispose()
    # `engine.run resume` points at the pipeline command instead of waiting for tasks
    out = cli_here("resume", str(run_id), "--db", path)
    assert out.returncode == 2 and "pipeline --resume" in out.stderr


def test_cli_list_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Listings and refusals in this process (the tests above run the real one), from the
    repository root as a user would type them."""
    monkeypatch.chdir(REPO)
    out = cli_here("pipeline", "examples/pipelines.py", "--list", "--json")
    assert out.returncode == 0, out.stderr
    assert {(p["name"], p["country"]) for p in json.loads(out.stdout)} == {
        ("shop", "Malaysia"),
        ("legacy", None),
    }
    path = str(tmp_path / "ff.duckdb")
    out = cli_here("pipeline", "examples/nope.py", "--db", path)
    assert out.returncode == 2 and "no such file" in out.stderr, out.stderr
    out = cli_here("pipeline", "examples/pipelines.py:legacy", "--db", path)
    assert out.returncode == 2 and "--country" in out.stderr, out.stderr
    out = cli_here("pipeline", "examples.pipelines:nothing", "--db", path)
    assert out.returncode == 2 and "shop (Malaysia)" in out.stderr, out.stderr
    out = cli_here("pipeline", "--resume", "99", "--db", path)
    assert out.returncode == 2 and "no run with id 99" in out.stderr, out.stderr
    assert split_ref("examples.pipelines:shop") == ("examples.pipelines", "shop")
    assert split_ref("/a/b/x.py") == ("/a/b/x.py", None)

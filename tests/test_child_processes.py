"""No child process outlives its owner (fetchers.lifeline): the browsers and chromedrivers of
a pool worker that is SIGKILLed (with its coordinator alive, and with nobody left to clean
up), what any dead or killed pool worker started, and a pipeline script's grandchildren —
one in a session of its own that ignores SIGTERM — after a stop or a kill -9 of the
pipeline, so that a resume never runs the script beside a leftover.

Processes are counted in /proc: a test-only variable in the environment marks every process
started below the test (it is inherited whatever the process group or parent), and a
process tree is snapshotted as (pid, start time) so a reused pid is never counted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.api import submit_run
from engine.pipelines.runner import Pipeline, ScriptStep, run_pipeline
from engine.queue.boot import WorkerBoot
from engine.runtime.coordinator import Coordinator
from engine.runtime.pool import LocalPool
from engine.settings import Settings
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from storage import pipelines as ps
from storage.db import open_database
from tests.conftest import require_tool, run_cli
from tests.test_pipeline import Cli, InThread, logs_of, wait_for

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
GONE_WITHIN_S = 20.0  # SIGKILLed trees end in well under a second; a loaded machine is slow
MARK = "FETCHFLEET_TEST_MARK"
pytestmark = pytest.mark.timeout(180)


# --- /proc ---------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, str, int] | None:
    """(parent pid, name, state, start time) of a process, None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    fields = rest.split()
    return int(fields[1]), head.partition("(")[2], fields[0], int(fields[19])


def _table() -> dict[int, tuple[int, str, str, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def tree(
    root: int, table: dict[int, tuple[int, str, str, int]] | None = None
) -> dict[int, tuple[str, int]]:
    """The live descendants of ``root``: pid → (name, start time)."""
    table = _table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        _, name, state, start = table[pid]
        if state != "Z":
            out[pid] = (name, start)
        stack.extend(children.get(pid, ()))
    return out


def still_running(snapshot: dict[int, tuple[str, int]]) -> dict[int, str]:
    """The processes of a snapshot still running (same pid and start time, not a zombie)."""
    out = {}
    for pid, (name, start) in snapshot.items():
        st = _stat(pid)
        if st is not None and st[3] == start and st[2] != "Z":
            out[pid] = name
    return out


def marked(mark: str) -> dict[int, str]:
    """Live processes (but this one) started with ``MARK=mark`` in their environment."""
    needle = f"{MARK}={mark}".encode()
    out = {}
    for pid, (_, name, state, _) in _table().items():
        if pid == os.getpid() or state == "Z":
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            out[pid] = name
    return out


def until_empty(
    probe: Callable[[], dict[int, str]], timeout_s: float = GONE_WITHIN_S
) -> dict[int, str]:
    """Poll ``probe`` until it finds nothing or the time is up; returns what it found last."""
    deadline = time.monotonic() + timeout_s
    while (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def kill_all(pids: list[int]) -> None:
    """Clean up after a failed test: never leave browsers running for the next one."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def browsers_of(root: int) -> tuple[int, int]:
    """(chromedrivers, Chromium browser processes) below ``root``: a browser process is a
    chromium whose parent is not one (Playwright's sits under its node driver)."""
    table = _table()
    snap = tree(root, table)
    drivers = sum(1 for name, _ in snap.values() if name == "chromedriver")
    browsers = sum(
        1
        for pid, (name, _) in snap.items()
        if name == "chromium" and table.get(table[pid][0], (0, ""))[1] != "chromium"
    )
    return drivers, browsers


# --- browsers of a worker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_shops() -> Iterator[ShopWorld]:
    """Two slow shops, so a worker's pages are in flight in both browsers for seconds."""
    config = ShopsConfig(
        (
            ShopSpec("pw-slow", "Malaysia", "slow", 40, seed=11, latency_ms=700),
            ShopSpec("se-slow", "India", "slow", 40, seed=11, latency_ms=700),
        )
    )
    with ShopWorld(config) as world:
        yield world


@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> str:
    """A value marking every process started below this test from now on (multiprocessing's
    resource tracker, which lives as long as this process, is started before)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARK, value)
    return value


def test_a_sigkilled_pool_worker_takes_its_browsers_and_drivers_along(
    slow_shops: ShopWorld, tmp_path: Path, mark: str
) -> None:
    """A pool worker with a live Playwright Chromium and a live chromedriver + Chromium is
    SIGKILLed: none of its processes survives it, while the coordinator lives on; after the
    pool is killed, no process started below this test is left at all."""
    require_tool(CHROMIUM, "chromium")
    require_tool(CHROMEDRIVER, "chromium-driver")
    spec = tmp_path / "spec.toml"
    spec.write_text(
        textwrap.dedent(
            f"""
            name = "two-browsers"
            entity_type = "product"
            [[sources]]
            country = "Malaysia"
            start_urls = ["{slow_shops["pw-slow"].catalog_url(1)}"]
            methods = ["playwright"]
            [[sources]]
            country = "India"
            start_urls = ["{slow_shops["se-slow"].catalog_url(1)}"]
            methods = ["selenium"]
            [follow]
            css = ["a.product-link"]
            max_depth = 1
            """
        )
    )
    db = open_database(f"duckdb:///{tmp_path / 'w.duckdb'}")
    s = Settings(workers=1, secret_key_file=tmp_path / "key", data_dir=tmp_path / "data")
    coord = Coordinator(db, s).start()
    try:
        submit_run(db, s, "scrape", {"spec": str(spec)}, coord.name)
        victim, pid = next(iter(coord.pool.pids().items()))
        assert pid is not None
        wait_for(
            lambda: browsers_of(pid) == (1, 2),
            timeout=60,
            what=f"a chromedriver and two browsers below the worker ({browsers_of(pid)})",
        )
        snapshot = tree(pid)
        os.kill(pid, signal.SIGKILL)
        left = until_empty(lambda: still_running(snapshot))
        assert not left, f"processes of the killed worker still run: {left}"
        wait_for(lambda: any(r[0] == victim for r in coord.replaced), what="a replacement")
    finally:
        coord.abort()
        db.dispose()
        left = until_empty(lambda: marked(mark))
        kill_all(list(left))
    assert not left, f"processes of the killed pool still run: {left}"


@dataclass(kw_only=True)
class StrayBoot(WorkerBoot):
    """A pool worker that starts a process no group kill or parent-death signal reaches (a
    session of its own), then hangs: only the pool can end that process."""

    def open_backend(self) -> Any:
        subprocess.Popen(["sleep", "3000"], start_new_session=True, stdin=subprocess.DEVNULL)
        time.sleep(600)
        raise AssertionError("a stray worker is killed long before this")

    def open_limiter(self) -> Any:
        raise AssertionError("never reached")


def test_the_pool_ends_what_its_dead_and_killed_workers_left(mark: str) -> None:
    def sleeps() -> dict[int, str]:
        return {pid: n for pid, n in marked(mark).items() if n == "sleep"}

    def boot(worker_id: str, settings: Settings, log_level: str) -> StrayBoot:
        return StrayBoot(worker_id=worker_id, settings=settings.model_dump(mode="json"))

    pool = LocalPool(Settings(), boot)
    try:
        pool.resize(2)
        wait_for(lambda: len(sleeps()) == 2, what="each worker's stray process")
        _, pid = next(iter(pool.pids().items()))
        os.kill(pid, signal.SIGKILL)
        wait_for(pool.reap, what="the pool to see its worker die")
        assert len(sleeps()) == 1, "the dead worker's stray is ended, the other one's not"
        pool.kill()
        assert not sleeps()
    finally:
        pool.kill()
        kill_all(list(marked(mark)))


BROWSERS_SCRIPT = """
import asyncio, os, sys
from concurrent.futures import ThreadPoolExecutor
from fetchers.config import FetchSettings
from fetchers.methods.playwright import PlaywrightMethod
from fetchers.methods.selenium import SeleniumMethod

async def main():
    settings = FetchSettings()
    pw, se = PlaywrightMethod(settings), SeleniumMethod(settings)
    pw._bind_loop()
    await pw._acquire()
    se._executor = ThreadPoolExecutor(1)
    await asyncio.get_running_loop().run_in_executor(se._executor, se._start_driver, None)
    print("ready", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_browsers_die_with_a_sigkilled_owner_even_with_nobody_to_clean_up(mark: str) -> None:
    """No coordinator here: the parent-death signal alone takes chromedriver, Chromium and
    their helpers along when the process that started them is SIGKILLed."""
    require_tool(CHROMIUM, "chromium")
    require_tool(CHROMEDRIVER, "chromium-driver")
    proc = subprocess.Popen(
        [sys.executable, "-c", BROWSERS_SCRIPT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert browsers_of(proc.pid) == (1, 2)
        snapshot = tree(proc.pid)
        proc.kill()
        proc.wait(10)
        left = until_empty(lambda: still_running(snapshot))
        assert not left, f"processes of the killed owner still run: {left}"
        left = until_empty(lambda: marked(mark))
        assert not left, f"processes started below the test still run: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_all(list(marked(mark)))


# --- a pipeline script's grandchildren ----------------------------------------------------

#: A script that spawns two grandchildren: `sh -c 'sleep 300 & wait'` in its own process
#: group, and a `sleep 3000` in a session of its own that ignores SIGTERM (a daemon-like
#: helper). It records each start in starts.log with the grandchildren of an earlier start
#: it finds still running, then exits 0 when a file `go` exists, else waits.
GRANDCHILDREN_SCRIPT = r"""
import os, subprocess, sys
from pathlib import Path

here = Path(sys.argv[1])
pids = here / "helpers.pids"
def helper_alive(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x003000\x00"
    except OSError:
        return False
earlier = [int(p) for p in pids.read_text().split()] if pids.exists() else []
with open(here / "starts.log", "a") as f:
    f.write(f"start with {sum(map(helper_alive, earlier))} earlier helper(s) running\n")
helper = subprocess.Popen(
    ["sh", "-c", "trap '' TERM; exec sleep 3000"],
    start_new_session=True,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
with open(pids, "a") as f:
    f.write(f"{helper.pid}\n")
print("helpers started", flush=True)
if (here / "go").exists():
    sys.exit(0)
subprocess.run(["sh", "-c", "sleep 300 & wait"])
"""


def grandchildren_step(tmp_path: Path, mark: str) -> ScriptStep:
    script = tmp_path / "grandchildren.py"
    script.write_text(GRANDCHILDREN_SCRIPT)
    return ScriptStep(
        "helpers", [sys.executable, str(script), str(tmp_path)], env={MARK: mark}, grace_s=2
    )


def starts(tmp_path: Path) -> list[str]:
    return (tmp_path / "starts.log").read_text().splitlines()


def test_a_stopped_script_leaves_no_process_and_a_resume_runs_it_once(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    db = open_database(f"duckdb:///{tmp_path / 'p.duckdb'}")
    try:
        p = Pipeline("grandchildren", "Chile", [grandchildren_step(tmp_path, mark)])
        running = InThread(db, p)
        run_id = running.run_id()
        wait_for(
            lambda: any(line == "helpers started" for _, _, line in logs_of(db, run_id)),
            what="the script's helpers",
        )
        assert len(marked(mark)) >= 4  # the script, its helper, sh and sleep
        running.control.command(run_id, "stop", "test")
        assert running.join().status == "stopped"
        left = until_empty(lambda: marked(mark), timeout_s=5)
        assert not left, f"the stopped script left processes running: {left}"

        (tmp_path / "go").touch()
        assert run_pipeline(db, p, run_id).status == "completed"
        assert starts(tmp_path) == ["start with 0 earlier helper(s) running"] * 2
        left = until_empty(lambda: marked(mark), timeout_s=5)
        assert not left, f"the finished script left processes running: {left}"
    finally:
        db.dispose()
        kill_all(list(marked(mark)))


def test_a_resume_after_kill_9_ends_the_scripts_leftovers_first(tmp_path: Path) -> None:
    """The pipeline process is SIGKILLed mid-script: the script gets its parent-death signal,
    its helper in a session of its own lives on; the resume ends it before it starts the
    script again, so the two never run side by side."""
    mark = uuid.uuid4().hex
    step = grandchildren_step(tmp_path, mark)
    module = tmp_path / "grandchildren_pipeline.py"
    module.write_text(
        "from engine.pipelines.runner import Pipeline, ScriptStep, register\n"
        f"p = register(Pipeline('grandchildren', 'Chile', [ScriptStep({step.name!r}, "
        f"{list(step.argv)!r}, env={dict(step.env or {})!r}, grace_s=2)]))\n"
    )
    path = tmp_path / "ff.duckdb"
    run = Cli("pipeline", f"{module}:grandchildren", "--db", str(path))
    try:
        run_id = run.run_id()
        run.wait_line("[helpers] helpers started")
        run.proc.send_signal(signal.SIGKILL)
        assert run.finish()[0] == -signal.SIGKILL
        assert marked(mark), "the helper outlives a SIGKILLed pipeline until the resume"

        (tmp_path / "go").touch()
        out = run_cli("pipeline", "--resume", str(run_id), "--db", str(path))
        assert out.returncode == 0, out.stderr
        assert starts(tmp_path) == ["start with 0 earlier helper(s) running"] * 2
        left = until_empty(lambda: marked(mark), timeout_s=5)
        assert not left, f"the script left processes running: {left}"
        db = open_database(str(path))
        try:
            lines = [line for _, _, line in logs_of(db, run_id)]
            assert any("left by an earlier start" in line for line in lines), lines
            with db.connect() as conn:
                assert ps.get_steps(conn, run_id)[0].status == "done"
        finally:
            db.dispose()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        kill_all(list(marked(mark)))

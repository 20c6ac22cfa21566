"""Correctness across machines (issue 13): faults on real separate hosts, through the CLI.

Two namespace hosts (tests/fleet_lab.py) run two workers each, started with `fleet start`; a
600-ID backfill runs with `backfill --workers 0` (only the remote workers execute). Each test
injects one fault mid-run — `kill -9` of a worker, a host's link cut, SIGSTOP, a PostgreSQL
restart — and then asserts the exact stored set: every ID once, the outcome the API gives it
(no ID `failed` because its lease was lost), the run `completed`.

Mid-run is made deterministic with the sim API's hold (``sim.hold``): past its first answers
the API holds every answer, so the workers sit with requests in flight, tasks leased, until
the test has acted and waited on what it needs to see (a task leased by the victim, its lease
taken back by the watchdog, its heartbeat back) and releases them. Leases are 3 s here
(heartbeat 0.5 s), so "past the lease" is seconds; every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from sim.api import ApiConfig, expected_outcome
from sim.world import SimWorld
from tests.fleet_lab import HOSTS, PASSWORD, TOKEN, Fleet, api_world, wait_for
from tests.netns import Lab

API = ApiConfig(limit=400, window_s=1.0, token=TOKEN, seed=7)
N_IDS = 600
FAST = {"lease_s": "3", "heartbeat_s": "0.5", "retry_backoff_s": "0.2", "concurrency": "10"}

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def api(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimWorld, str]]:
    with api_world(API, N_IDS, tmp_path_factory.mktemp("api")) as world:
        yield world


@pytest.fixture
def fleet(lab: Lab, pg_url: str) -> Iterator[Fleet]:
    f = Fleet(lab, pg_url, **FAST)
    try:
        f.start(workers=2)
        yield f
    finally:
        f.close()


def backfill(fleet: Fleet, world: SimWorld, template: str) -> subprocess.Popen[str]:
    world.api_reset()
    assert world.ids_file is not None
    return fleet.popen(
        "backfill", "--ids", str(world.ids_file), "--url-template", template,
        "--rate-limit", "300/1s", "--header", "Authorization=env:SIM_API_TOKEN",
        "--workers", "0", "--batch-size", "20", "--concurrency", "10",
        "--timeout", "60", "--json",
    )  # fmt: skip


def finish(run: subprocess.Popen[str], within_s: float = 240) -> dict[str, Any]:
    try:
        out, err = run.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        run.kill()
        out, err = run.communicate()
        pytest.fail(f"the backfill did not end within {within_s:.0f} s: {err[-3000:]}")
    assert run.returncode == 0, err[-3000:] + out
    summary: dict[str, Any] = json.loads(out)
    assert summary["status"] == "completed", summary
    return summary


def assert_exact(fleet: Fleet, world: SimWorld, run_id: int) -> list[Any]:
    """Every ID stored once with the outcome the API gives it; no task failed. Returns the
    rows (item id, outcome, worker id, task id, fetched at)."""
    assert world.ids_file is not None
    ids = world.ids_file.read_text().split()
    rows = fleet.sql(
        "SELECT item_id, outcome, worker_id, task_id, fetched_at FROM backfill_items "
        "WHERE run_id = :r", r=run_id)  # fmt: skip
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)), "an ID stored twice"
    assert set(keys) == set(ids), f"{len(set(ids) - set(keys))} ID(s) never stored"
    want = {i: expected_outcome(i, API) for i in ids}
    wrong = [(r[0], r[1]) for r in rows if r[1] != want[r[0]].replace("flaky", "ok")]
    assert not wrong, f"stored other than the API answers (a lost lease?): {wrong[:5]}"
    tasks = Counter(r[0] for r in fleet.sql("SELECT status FROM tasks WHERE run_id = :r",
                                            r=run_id))  # fmt: skip
    assert set(tasks) == {"done"}, tasks
    return rows


def victim(fleet: Fleet, host: str) -> tuple[str, int, list[int]]:
    """A worker of ``host`` that holds leased tasks while the API holds their answers:
    (worker id, pid, its tasks)."""

    def find() -> tuple[str, int, list[int]] | None:
        if not run_running(fleet):
            return None
        for worker_id, pid in fleet.workers(host):
            tasks = fleet.leased_by("w.id = :w", w=worker_id)
            if tasks:
                return worker_id, pid, tasks
        return None

    return wait_for(find, what=f"a worker of {host} holding tasks")  # type: ignore[no-any-return]


def run_running(fleet: Fleet) -> bool:
    return bool(fleet.sql("SELECT 1 FROM runs WHERE status = 'running'"))


def db_now(fleet: Fleet) -> datetime:
    return fleet.sql("SELECT now() AT TIME ZONE 'UTC'")[0][0]  # type: ignore[no-any-return]


def wait_taken_back(fleet: Fleet, where: str, tasks: list[int], **params: Any) -> None:
    """Wait until none of ``tasks`` is leased by the workers ``where`` (the watchdog took
    their expired leases back)."""
    wait_for(
        lambda: not set(tasks) & set(fleet.leased_by(where, **params)),
        within_s=60,
        what=f"leases of tasks {tasks} expired and taken back",
    )


def wait_heartbeat(fleet: Fleet, where: str, since: datetime, **params: Any) -> None:
    wait_for(
        lambda: all(
            r[0] > since
            for r in fleet.sql(f"SELECT heartbeat_at FROM workers w WHERE {where}", **params)
        ),
        within_s=120,
        what="the worker heartbeats again",
    )


class Fenced:
    """The victims' tasks at the fault (``at``, read just after it), and what the victims
    stored of them while they held their leases (``took_back``: read once the watchdog has
    re-queued them; a store serialises with that re-queue on the task rows)."""

    def __init__(self, fleet: Fleet, workers: set[str], tasks: list[int]) -> None:
        self.fleet, self.workers, self.tasks = fleet, workers, tasks
        self.at = db_now(fleet)
        self.before: set[str] = set()

    def took_back(self) -> None:
        fleet, workers, tasks = self.fleet, self.workers, self.tasks
        self.before = {r[0] for r in fleet.sql(
            "SELECT item_id FROM backfill_items WHERE worker_id = ANY(:w) AND task_id = ANY(:t)",
            w=sorted(workers), t=tasks)}  # fmt: skip

    def assert_nothing_stale(self, rows: list[Any]) -> None:
        """Nothing the victims fetched under the leases they lost was stored after the fault:
        what they stored of those tasks since, they fetched again under a new claim."""
        stale = [
            r[0]
            for r in rows
            if r[2] in self.workers and r[3] in self.tasks
            and r[0] not in self.before and r[4] < self.at
        ]  # fmt: skip
        assert not stale, f"stored from a lost lease: {stale[:5]}"


def test_kill_9_of_a_remote_worker_its_tasks_come_back(
    fleet: Fleet, api: tuple[SimWorld, str]
) -> None:
    world, template = api
    with world.api_holding(after=100):
        run = backfill(fleet, world, template)
        worker_id, pid, tasks = victim(fleet, "h1")
        fleet.on_host("h1", f"kill -9 {pid}")
    summary = finish(run)
    assert_exact(fleet, world, summary["run_id"])
    errors = fleet.sql("SELECT last_error FROM tasks WHERE id = ANY(:ids)",
                       ids=list(tasks))  # fmt: skip
    assert all(worker_id in (e[0] or "") for e in errors), errors  # back through the lease
    # `fleet stop` sees the dead worker's process gone (no watchdog needed)
    assert fleet.live_by_host() == {"h0": 2, "h1": 2}
    stopped = fleet.cli("fleet", "stop", "--all", "--wait", "20", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert fleet.live_by_host() == {"h0": 0, "h1": 0}


def test_a_host_cut_off_past_its_lease_is_fenced_and_comes_back(
    fleet: Fleet, api: tuple[SimWorld, str]
) -> None:
    """The issue's 5-in-14: the cut host has answers in flight when its link goes down; its
    leases expire and go back to the queue; it comes back before the run can end and its
    old answers arrive then: none of them is stored, nothing is completed by it, no ID is
    missing, and its workers go on working."""
    world, template = api
    veth = fleet.lab.hosts[1].veth
    with world.api_holding(after=100):
        run = backfill(fleet, world, template)
        wait_for(lambda: world.api_stats()["held"] >= 10, what="answers held")
        tasks = wait_for(lambda: fleet.leased_by("w.host = 'h1'"), what="h1 holding tasks")
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
        fenced = Fenced(fleet, {w for w, _ in fleet.workers("h1")}, tasks)
        try:
            wait_taken_back(fleet, "w.host = 'h1'", tasks)
            fenced.took_back()
        finally:
            subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        wait_heartbeat(fleet, "w.host = 'h1'", db_now(fleet))
        ps_during = [subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                    text=True).stdout, fleet.on_host("h1", "ps -eo args")]  # fmt: skip
    summary = finish(run)
    rows = assert_exact(fleet, world, summary["run_id"])
    fenced.assert_nothing_stale(rows)
    assert fleet.live_by_host() == {"h0": 2, "h1": 2}  # the cut workers are back
    assert_no_secrets(fleet, ps_during)


def test_sigstop_past_the_lease_then_sigcont(fleet: Fleet, api: tuple[SimWorld, str]) -> None:
    world, template = api
    with world.api_holding(after=100):
        run = backfill(fleet, world, template)
        worker_id, pid, tasks = victim(fleet, "h0")
        fleet.on_host("h0", f"kill -STOP {pid}")
        fenced = Fenced(fleet, {worker_id}, tasks)
        try:
            wait_taken_back(fleet, "w.id = :w", tasks, w=worker_id)
            fenced.took_back()
        finally:
            fleet.on_host("h0", f"kill -CONT {pid}")
        wait_heartbeat(fleet, "w.id = :w", db_now(fleet), w=worker_id)
    summary = finish(run)
    rows = assert_exact(fleet, world, summary["run_id"])
    fenced.assert_nothing_stale(rows)
    assert fleet.live_by_host() == {"h0": 2, "h1": 2}


def test_postgresql_restart_with_remote_workers(
    lab: Lab, pg_url: str, api: tuple[SimWorld, str]
) -> None:
    """As tests/test_pg_restart.py: the server stopped with pg_ctlcluster for a few seconds
    and started again. Leases of 30 s outlast it: no lease is lost, no attempt used."""
    from tests.test_pg_restart import max_attempts, outage

    world, template = api
    fleet = Fleet(lab, pg_url, **{**FAST, "lease_s": "30"})
    try:
        fleet.start(workers=2)
        with world.api_holding(after=150):
            run = backfill(fleet, world, template)
            wait_for(lambda: world.api_stats()["held"] >= 10, what="answers held")
        # answers flow again; take the database away while they do
        outage()
        restarted = db_now(fleet)
        summary = finish(run)
        assert_exact(fleet, world, summary["run_id"])
        from storage.db import open_database

        db = open_database(pg_url, create=False)
        try:
            assert max_attempts(db, summary["run_id"]) <= 1, "the restart cost an attempt"
        finally:
            db.dispose()
        wait_heartbeat(fleet, "w.host IN ('h0', 'h1')", restarted)  # all four reconnected
        assert fleet.live_by_host() == {"h0": 2, "h1": 2}
        assert_no_secrets(fleet, [])
    finally:
        fleet.close()


def assert_no_secrets(fleet: Fleet, ps_outputs: list[str]) -> None:
    """The database password and the API token: on no command line (here and on the hosts,
    during the run) and in no worker log."""
    ps = [*ps_outputs, fleet.on_host(HOSTS[0], "ps -eo args")]
    assert any("engine.run worker" in text for text in ps)
    for text in ps:
        assert PASSWORD not in text and TOKEN not in text
    logs = fleet.logs()
    assert logs, "no worker log found"
    for log in logs:
        text = log.read_text(errors="replace")
        assert PASSWORD not in text and TOKEN not in text, f"a secret in {log}"

"""The worker loop against the in-memory queue: no database, no processes, a toy kind.

What it shows: a worker executes every item once and completes its tasks, hands the
executors of every run the ``WorkerEnv`` it was given (the deployment's rate limiter), and
exits when asked.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest

from engine.jobs import registry
from engine.jobs.base import Executor, JobKind, WorkerEnv
from engine.model import ItemResult
from engine.queue.base import Directive
from engine.queue.memory import MemoryQueue
from engine.ratelimit.base import MemoryLimiter
from engine.runtime.worker import Worker
from engine.settings import Settings


class EchoExecutor(Executor):
    async def execute(self, item: Any) -> tuple[bool, str, dict[str, Any]]:
        await asyncio.sleep(0)
        return item != "bad", "ok" if item != "bad" else "error", {"len": len(item)}


class EchoKind(JobKind):
    name = "echo-test"
    envs: ClassVar[list[WorkerEnv]] = []

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        return params

    def plan(self, db: Any, run_id: int, params: dict[str, Any]) -> Iterator[Sequence[Any]]:
        yield from ()

    def load_items(self, conn: Any, run_id: int, refs: list[Any]) -> list[Any]:
        return refs

    def store(self, conn: Any, results: list[ItemResult]) -> int:
        return 0

    def outcome_counts(self, conn: Any, run_id: int) -> dict[str, int]:
        return {}

    def item_log(self) -> None:
        return None  # results live in MemoryQueue, not in a table the dashboards read

    def ok_outcomes(self) -> set[str]:
        return {"ok"}

    async def open_executor(self, params: dict[str, Any], env: WorkerEnv) -> Executor:
        EchoKind.envs.append(env)
        return EchoExecutor()


@pytest.fixture(autouse=True)
def echo_kind() -> Iterator[None]:
    registry.register(
        registry.KindInfo(name=EchoKind.name, title="Echo", job=f"{__name__}:EchoKind")
    )
    EchoKind.envs.clear()
    yield
    registry.reset()


def test_worker_runs_every_item_once_and_hands_its_env_to_executors() -> None:
    mq = MemoryQueue(lease_s=30)
    run_id = mq.add_run(EchoKind.name)
    refs = [[f"item-{i}-{j}" for j in range(5)] for i in range(6)] + [["bad"]]
    task_ids = mq.add_tasks(run_id, refs)
    settings = Settings(concurrency=8, batch_size=5, flush_s=0.05, heartbeat_s=0.05)
    env = WorkerEnv(limiter=MemoryLimiter())
    worker = Worker(mq, settings, "w1", idle_exit_s=0.3, env=env)

    assert asyncio.run(asyncio.wait_for(worker.run(), 30)).startswith("idle")
    assert all(mq.tasks[t].status == "done" for t in task_ids)
    assert sorted(ref for _, ref in mq.results) == sorted(r for batch in refs for r in batch)
    assert mq.results[(run_id, "bad")].outcome == "error"
    # one executor per run and process, given the worker's env (its limiter) and the run's
    # proxy pool through the queue backend
    (given,) = EchoKind.envs
    assert given.limiter is env.limiter and callable(given.proxy_pool)
    assert mq.workers["w1"] == "exited"


def test_worker_asked_to_exit_hands_its_tasks_back() -> None:
    mq = MemoryQueue(lease_s=30)
    run_id = mq.add_run(EchoKind.name)
    task_ids = mq.add_tasks(run_id, [["a"], ["b"]])
    mq.request_exit("w1")
    worker = Worker(mq, Settings(), "w1")
    assert asyncio.run(asyncio.wait_for(worker.run(), 30)) == "asked to exit"
    assert [mq.tasks[t].status for t in task_ids] == ["queued", "queued"]
    assert mq.results == {}
    assert worker.env.limiter is not None  # alone: an in-memory limiter


class FlakyQueue(MemoryQueue):
    """A MemoryQueue whose ``submit`` fails (a database restarting) until ``healthy``;
    it keeps what each failed submit carried and counts heartbeats."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.healthy = False
        self.refused: list[int] = []  # items per failed submit
        self.heartbeats = 0

    def submit(self, worker_id: str, results: list[Any]) -> None:
        if not self.healthy:
            self.refused.append(len(results))
            raise ConnectionError("server closed the connection unexpectedly")
        super().submit(worker_id, results)

    def heartbeat(self, *args: Any) -> Any:
        self.heartbeats += 1
        return super().heartbeat(*args)


async def until(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def test_a_failed_flush_is_retried_and_loses_nothing() -> None:
    """The database fails every flush for a while: the worker keeps what it held, keeps
    the finished tasks' leases through its heartbeats (none expires, none runs again),
    and hands everything over once the database is back; each item is stored once."""
    now = [0.0]
    mq = FlakyQueue(lease_s=10, clock=lambda: now[0])
    run_id = mq.add_run(EchoKind.name)
    refs = [[f"item-{i}-{j}" for j in range(5)] for i in range(4)]
    task_ids = mq.add_tasks(run_id, refs)
    settings = Settings(concurrency=8, batch_size=5, flush_s=0.01, heartbeat_s=0.01)
    worker = Worker(mq, settings, "w1")

    async def scenario() -> None:
        runner = asyncio.create_task(worker.run())
        await until(lambda: len(mq.refused) >= 2 and max(mq.refused) == 20, "all 20 refused")
        now[0] += 100  # far past every lease: only heartbeats keep them
        seen = mq.heartbeats
        await until(lambda: mq.heartbeats >= seen + 2, "two more heartbeats")
        assert mq.requeue_expired() == []
        mq.healthy = True
        await until(lambda: all(mq.tasks[t].status == "done" for t in task_ids), "all done")
        worker.request_exit()
        await asyncio.wait_for(runner, 30)

    asyncio.run(scenario())
    assert sorted(ref for _, ref in mq.results) == sorted(r for batch in refs for r in batch)
    assert [mq.tasks[t].attempts for t in task_ids] == [1] * len(task_ids)


class GateExecutor(Executor):
    """Each item waits for ``go``; counts what it started."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started: list[Any] = []

    async def execute(self, item: Any) -> tuple[bool, str, dict[str, Any]]:
        self.started.append(item)
        await self.go.wait()
        return True, "ok", {"len": len(item)}


def executes_with(monkeypatch: pytest.MonkeyPatch, executor: Executor) -> None:
    """The toy kind's runs execute their items with ``executor``."""

    async def open_executor(params: dict[str, Any], env: WorkerEnv) -> Executor:
        return executor

    monkeypatch.setattr(EchoKind, "open_executor", staticmethod(open_executor))


class Unreachable(MemoryQueue):
    """A queue whose heartbeats fail once ``cut`` (the worker's host partitioned): they
    raise, or, as on a link that drops every packet, they hang until ``healed``."""

    cut = False
    hangs = False
    healed = threading.Event()
    completed: ClassVar[list[int]] = []

    def heartbeat(self, *args: Any) -> Any:
        if self.cut and self.hangs:
            self.healed.wait(30)
        elif self.cut:
            raise ConnectionError("no route to host")
        return super().heartbeat(*args)

    def complete(self, worker_id: str, leases: Any) -> None:
        self.completed.extend(leases)
        super().complete(worker_id, leases)


@pytest.mark.parametrize("hangs", [False, True], ids=["heartbeat-raises", "heartbeat-hangs"])
def test_a_worker_cut_off_for_a_lease_stops_its_tasks_on_its_own(
    monkeypatch: pytest.MonkeyPatch, hangs: bool
) -> None:
    """Self-fencing: after a lease without a heartbeat the watchdog may have handed the task
    to another worker; this one starts none of its remaining items and completes nothing.
    Also when the heartbeat neither answers nor fails (a cut link drops packets: the call
    waits on TCP retransmissions for minutes)."""
    mq = Unreachable(lease_s=30)
    mq.hangs, mq.healed = hangs, threading.Event()
    run_id = mq.add_run(EchoKind.name)
    [task] = mq.add_tasks(run_id, [["a", "b", "c", "d", "e"]])
    gate = GateExecutor()

    settings = Settings(concurrency=1, batch_size=5, flush_s=0.01, heartbeat_s=0.01, lease_s=0.2)
    worker = Worker(mq, settings, "w1")

    async def scenario() -> None:
        runner = asyncio.create_task(worker.run())
        await until(lambda: gate.started == ["a"], "the first item started")
        mq.cut = True
        await until(
            lambda: [h.directive for h in worker._held.values()] == [Directive.ABANDON],
            "the task abandoned",
        )
        gate.go.set()
        mq.healed.set()
        worker.request_exit()
        await asyncio.wait_for(runner, 30)

    executes_with(monkeypatch, gate)
    asyncio.run(scenario())
    assert gate.started == ["a"]  # b..e never started once the lease was gone
    assert task not in mq.completed


class CountingExecutor(GateExecutor):
    """A gate executor whose result says which execution of the item produced it."""

    async def execute(self, item: Any) -> tuple[bool, str, dict[str, Any]]:
        self.started.append(item)
        execution = self.started.count(item)
        await self.go.wait()
        return True, "ok", {"execution": execution}


def test_a_task_claimed_again_before_its_loss_is_heard_stores_only_the_new_execution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fencing hole a cut host found: its lease expires and the task is queued again;
    the link comes back and the same worker claims the task again *before* a heartbeat
    tells it the old lease is lost. The old execution's answers, arriving afterwards, are
    of a lost lease: they are never stored, and the old execution completes nothing. Only
    the new execution's results count."""
    now = [0.0]
    mq = Unreachable(lease_s=10, clock=lambda: now[0], retry_backoff_s=0)
    mq.cut, mq.hangs, mq.healed = False, True, threading.Event()
    run_id = mq.add_run(EchoKind.name)
    [task] = mq.add_tasks(run_id, [["a", "b", "c"]])
    gate = CountingExecutor()

    # the worker's own lease (its self-fencing) is long: it never hears of the loss here
    settings = Settings(concurrency=3, batch_size=3, flush_s=0.01, heartbeat_s=0.01, lease_s=600)
    worker = Worker(mq, settings, "w1")

    async def scenario() -> None:
        runner = asyncio.create_task(worker.run())
        await until(lambda: sorted(gate.started) == ["a", "b", "c"], "the first execution")
        mq.cut = True  # heartbeats hang from now on: the loss is not heard
        now[0] += 100
        assert mq.requeue_expired() == [(task, "w1")]
        await until(lambda: mq.tasks[task].status == "leased", "claimed again by w1")
        assert mq.tasks[task].worker_id == "w1"
        gate.go.set()  # the old execution's answers arrive, then the new one runs
        await until(lambda: len(gate.started) == 6, "the second execution")
        await until(lambda: mq.tasks[task].status == "done", "the task done")
        mq.healed.set()
        worker.request_exit()
        await asyncio.wait_for(runner, 30)

    executes_with(monkeypatch, gate)
    asyncio.run(scenario())
    stored = {ref: r.data["execution"] for (_, ref), r in mq.results.items()}
    assert stored == {"a": 2, "b": 2, "c": 2}, "stored from a lost lease"


class CutQueue(FlakyQueue):
    """Submits fail and heartbeats hang until ``healed`` (a link that drops packets);
    claims go through (the link came back and the claim went first)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.healed = threading.Event()

    def heartbeat(self, *args: Any) -> Any:
        self.healed.wait(30)
        return super().heartbeat(*args)


def test_results_buffered_before_a_lost_lease_are_not_stored_after_a_new_claim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other way an old execution's answers met a new claim: they were fetched, but
    every hand-over failed (the link was down) and stayed buffered; the lease expired, the
    worker claimed the task again, and the link came back. The buffered answers belong to
    the lost lease: only the new execution's are stored, and the task is done once."""
    now = [0.0]
    mq = CutQueue(lease_s=10, clock=lambda: now[0], retry_backoff_s=0)
    run_id = mq.add_run(EchoKind.name)
    [task] = mq.add_tasks(run_id, [["a", "b", "c"]])
    gate = CountingExecutor()
    gate.go.set()

    settings = Settings(concurrency=3, batch_size=3, flush_s=0.01, heartbeat_s=0.01, lease_s=600)
    worker = Worker(mq, settings, "w1")

    async def scenario() -> None:
        runner = asyncio.create_task(worker.run())
        await until(lambda: sum(mq.refused) >= 3, "the first execution's hand-over refused")
        now[0] += 100
        assert mq.requeue_expired() == [(task, "w1")]
        await until(lambda: len(gate.started) == 6, "the second execution")
        mq.healthy = True
        await until(lambda: mq.tasks[task].status == "done", "the task done")
        mq.healed.set()
        worker.request_exit()
        await asyncio.wait_for(runner, 30)

    executes_with(monkeypatch, gate)
    asyncio.run(scenario())
    stored = {ref: r.data["execution"] for (_, ref), r in mq.results.items()}
    assert stored == {"a": 2, "b": 2, "c": 2}, "stored from a lost lease"
    assert mq.tasks[task].attempts == 1  # the lost lease cost none; the new claim one

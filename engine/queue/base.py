"""The queue contract every worker talks to, whatever the deployment.

Two backends implement it: ``SqlQueue`` (the database itself: PostgreSQL for every process,
or DuckDB inside the coordinator) and ``PipeQueue`` (a pool worker's proxy to its
coordinator over multiprocessing queues, because only the coordinator may open DuckDB).
The worker loop is the same code for both. Calls are blocking; the worker runs them in a
thread so its event loop keeps executing items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from engine.model import ItemResult, ResultBatch, TaskWork

# What a worker does with a held task, by its run's status (see storage.queue.heartbeat).
CONTINUE = "continue"
RELEASE = "release"  # run paused / stopping: finish in-flight items, hand the rest back
ABANDON = "abandon"  # lease lost or run over: stop working on it, hand nothing back


def directive_for(run_status: str) -> str:
    if run_status == "running":
        return CONTINUE
    if run_status in ("paused", "stopping", "stopped", "cancelled"):
        return RELEASE
    return ABANDON


@dataclass(slots=True)
class Reply:
    """A coordinator's answer; ``worker_action`` is ``exit`` when the worker must stop."""

    tasks: list[TaskWork] = field(default_factory=list)
    directives: dict[int, str] = field(default_factory=dict)
    worker_action: str | None = None


class QueueBackend(Protocol):
    def register(self, worker_id: str, host: str, pid: int, kind: str) -> None: ...

    def claim(self, worker_id: str, max_tasks: int, run_id: int | None = None) -> Reply: ...

    def heartbeat(
        self, worker_id: str, task_ids: list[int], status: str, done: int, failed: int
    ) -> Reply: ...

    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None: ...

    def complete(self, worker_id: str, task_ids: list[int]) -> None: ...

    def release(self, worker_id: str, task_ids: list[int]) -> None: ...

    def fail(self, worker_id: str, task_ids: list[int], error: str) -> None: ...

    def unregister(self, worker_id: str, reason: str) -> None: ...

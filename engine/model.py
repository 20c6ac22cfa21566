"""Typed values that cross process boundaries (they are pickled over multiprocessing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.CANCELLED}


@dataclass(slots=True)
class ItemResult:
    """One executed item. ``ok`` feeds the ok/failed counters; ``outcome`` the per-outcome
    ones; ``data`` is what the job kind stores."""

    run_id: int
    task_id: int
    ref: Any
    ok: bool
    outcome: str
    data: dict[str, Any] = field(default_factory=dict)
    worker_id: str = ""
    # the lease token of the claim it was executed under: the store fences it with that,
    # so a result of a lost lease is dropped even when its worker holds the task again
    lease: str = ""


@dataclass(slots=True)
class ResultBatch:
    """Results of one run, column by column: how a worker hands over the results of a kind
    that declares ``columns`` (``JobKind.columns``), and how the coordinator merges what its
    workers handed over before one store. A handful of lists pickle and store far cheaper
    than one ``ItemResult`` per item. ``columns`` holds, for each declared key, the items'
    ``data[key]`` in item order."""

    run_id: int
    columns: dict[str, list[Any]]
    task_ids: list[int] = field(default_factory=list)
    refs: list[Any] = field(default_factory=list)
    oks: list[bool] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)  # per item, as ``ItemResult.lease``

    @classmethod
    def empty(cls, run_id: int, keys: tuple[str, ...]) -> ResultBatch:
        return cls(run_id=run_id, columns={k: [] for k in keys})

    def __len__(self) -> int:
        return len(self.refs)

    def add(
        self,
        task_id: int,
        ref: Any,
        ok: bool,
        outcome: str,
        data: dict[str, Any],
        worker_id: str,
        lease: str = "",
    ) -> None:
        self.leases.append(lease)
        self.task_ids.append(task_id)
        self.refs.append(ref)
        self.oks.append(ok)
        self.outcomes.append(outcome)
        self.worker_ids.append(worker_id)
        for key, values in self.columns.items():
            values.append(data.get(key))

    def extend(self, other: ResultBatch) -> None:
        """Append a batch of the same run with the same columns."""
        self.task_ids += other.task_ids
        self.refs += other.refs
        self.oks += other.oks
        self.outcomes += other.outcomes
        self.worker_ids += other.worker_ids
        self.leases += other.leases
        for key, values in self.columns.items():
            values += other.columns[key]

    def part(self, start: int, stop: int) -> ResultBatch:
        """Items ``start:stop`` as a batch of their own (a flush isolating a poison result)."""
        return ResultBatch(
            run_id=self.run_id,
            columns={k: v[start:stop] for k, v in self.columns.items()},
            task_ids=self.task_ids[start:stop],
            refs=self.refs[start:stop],
            oks=self.oks[start:stop],
            outcomes=self.outcomes[start:stop],
            worker_ids=self.worker_ids[start:stop],
            leases=self.leases[start:stop],
        )

    def keep(self, indices: list[int]) -> ResultBatch:
        """The items at ``indices`` as a batch of their own (results of fenced-off leases
        dropped)."""
        return ResultBatch(
            run_id=self.run_id,
            columns={k: [v[i] for i in indices] for k, v in self.columns.items()},
            task_ids=[self.task_ids[i] for i in indices],
            refs=[self.refs[i] for i in indices],
            oks=[self.oks[i] for i in indices],
            outcomes=[self.outcomes[i] for i in indices],
            worker_ids=[self.worker_ids[i] for i in indices],
            leases=[self.leases[i] for i in indices],
        )

    def to_results(self) -> list[ItemResult]:
        """One ``ItemResult`` per item: what ``JobKind.store`` takes."""
        keys = list(self.columns)
        return [
            ItemResult(
                run_id=self.run_id,
                task_id=task_id,
                ref=ref,
                ok=ok,
                outcome=outcome,
                data={k: self.columns[k][i] for k in keys},
                worker_id=worker_id,
                lease=lease,
            )
            for i, (task_id, ref, ok, outcome, worker_id, lease) in enumerate(
                zip(
                    self.task_ids,
                    self.refs,
                    self.oks,
                    self.outcomes,
                    self.worker_ids,
                    self.leases,
                    strict=True,
                )
            )
        ]


@dataclass(slots=True)
class TaskWork:
    """A claimed task with its items ready to execute (already-stored items removed)."""

    id: int
    run_id: int
    kind: str
    params: dict[str, Any]
    items: list[Any]
    attempts: int
    # the token of the claim that leased it: the worker hands it back with every result,
    # heartbeat, completion, release and failure of this execution (``QueueBackend``)
    lease: str = ""


def item_ref(item: Any) -> Any:
    """An executable item's reference as stored in its task: its ``id`` (a proxy row), or
    the item itself (an ID string)."""
    return getattr(item, "id", item)

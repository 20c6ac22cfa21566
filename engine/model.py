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


@dataclass(slots=True)
class TaskWork:
    """A claimed task with its items ready to execute (already-stored items removed)."""

    id: int
    run_id: int
    kind: str
    params: dict[str, Any]
    items: list[Any]
    attempts: int


def item_ref(item: Any) -> Any:
    """An executable item's reference as stored in its task: its ``id`` (a proxy row), or
    the item itself (an ID string)."""
    return getattr(item, "id", item)

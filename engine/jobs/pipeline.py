"""The ``pipeline`` kind, so summaries, ``status`` and the console can show pipeline runs.

A pipeline run has no tasks: its steps run in the process that started it
(``engine.pipeline.run_pipeline``), so this kind plans nothing and executes nothing; its
outcomes are the steps that finished (``done`` or ``failed``), its items the steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from engine.jobs.base import Executor, JobKind
from engine.model import ItemResult
from storage.db import Database
from storage.pipelines import step_counts


class PipelineJob(JobKind):
    name = "pipeline"

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(
            "a pipeline runs in the process that starts it: "
            "`python -m engine.run pipeline MODULE:NAME` or engine.pipeline.run_pipeline"
        )

    def plan(self, db: Database, run_id: int, params: dict[str, Any]) -> Iterator[Sequence[Any]]:
        return iter(())

    def load_items(self, conn: sa.Connection, run_id: int, refs: list[Any]) -> list[Any]:
        return []

    def store(self, conn: sa.Connection, results: list[ItemResult]) -> int:
        return 0

    def outcome_counts(self, conn: sa.Connection, run_id: int) -> dict[str, int]:
        counts = step_counts(conn, run_id)
        return {k: v for k, v in counts.items() if k in ("done", "failed")}

    def ok_outcomes(self) -> set[str]:
        return {"done"}

    async def open_executor(self, params: dict[str, Any]) -> Executor:
        raise RuntimeError("pipeline runs have no tasks for workers")

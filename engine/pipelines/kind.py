"""Pipeline runs as a run kind, so summaries, ``status`` and the console can show them.

A pipeline run has no tasks (its steps run in the process that started it,
``engine.pipelines.run_pipeline``), so it is a ``RunKind``, not a ``JobKind``: its outcomes
are the steps that finished (``done`` or ``failed``), its items the steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.jobs.base import RunKind
from storage.pipelines import step_counts

if TYPE_CHECKING:
    import sqlalchemy as sa


class PipelineRuns(RunKind):
    name = "pipeline"

    def outcome_counts(self, conn: sa.Connection, run_id: int) -> dict[str, int]:
        counts = step_counts(conn, run_id)
        return {k: v for k, v in counts.items() if k in ("done", "failed")}

    def ok_outcomes(self) -> set[str]:
        return {"done"}

    def resume_command(self, run_id: int) -> str:
        return f"pipeline --resume {run_id}"

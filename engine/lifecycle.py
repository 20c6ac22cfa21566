"""Where runs end: the one place every path that gives a run its final status goes through.

A run ends in a coordinator (its tasks settle, or an operator's command from the console or
through the control socket), in a terminal without one (``engine.run cancel`` / ``stop``
open the database themselves), in a pipeline's own process, or when its planning fails.
Each path calls ``ended`` with the runs it finished, after its transaction committed;
``command`` does so for an operator's command. What ending a run means beyond its status
lives here, so no path can skip it: its uploads are deleted, and its alert event is recorded
(``engine.alerts.runs_ended``: run_completed / run_failed / run_stopped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from engine.model import TERMINAL
from engine.settings import Settings
from engine.version import code_version
from storage import runs
from storage.db import Database

log = logging.getLogger(__name__)


def command(
    db: Database, settings: Settings, run_id: int, action: str, source: str, settle: bool = True
) -> str:
    """Apply an operator's command (``storage.runs.apply_command``); a cancel ends the run at
    once. With ``settle`` also settle the runs it finished (a stop with nothing leased is
    stopped at once): a process without a coordinator; a coordinator settles in its own
    service thread, so its commands write only the run they name.
    Returns the run's status after the command; raises ValueError when it does not apply."""
    with db.begin() as conn:
        status = runs.apply_command(conn, run_id, action, source)
        if action == "resume":  # it goes on with this process's code: workers of it serve it
            runs.set_code_version(conn, run_id, code_version())
        settled = runs.settle(conn) if settle else []
    finished = [r for r, _ in settled]
    ended(db, settings, [run_id, *finished] if status in TERMINAL else finished)
    return status


def ended(db: Database, settings: Settings, run_ids: Iterable[int]) -> None:
    """Runs that reached their final status (committed): delete their uploads, record
    their alert events (neither raises: a run's end must not fail on them)."""
    done = sorted(set(run_ids))
    if done:
        forget_uploads(db, settings, done)
        from engine.alerts import runs_ended

        runs_ended(db, settings, done)


def on_auto_stopped(db: Database, run_id: int, rule: str, numbers: dict[str, Any]) -> None:
    """A stop rule stopped a run (``engine.stop_rules.check_runs``, after its transaction
    committed: the run is ``stopping``, its ``error`` and ``run_logs`` say why). The hook for
    what else an auto-stop means: it must not raise into the watchdog. Its alert is sent
    when the run has settled (``engine.alerts.record.run_end_event``), as one event."""
    log.info("run %s auto-stopped by %s: %s", run_id, rule, numbers)


def forget_uploads(db: Database, settings: Settings, run_ids: list[int]) -> None:
    """Delete the pasted or uploaded lists of runs that are over: planning copied their
    items into the database, and a list kept for ever is a list of proxies (and their
    passwords) lying on disk. Any parameter naming a file under data/uploads counts,
    whatever the kind; ``FETCHFLEET_KEEP_UPLOADS`` keeps them. A file that cannot be
    deleted is logged, never raised: it must not hold up the path that ended the run."""
    if settings.keep_uploads:
        return
    from engine.files import forget_upload

    uploads = settings.data_dir / "uploads"
    with db.connect() as conn:
        found = [runs.get_run(conn, run_id) for run_id in run_ids]
    for run in filter(None, found):
        for value in run.params.values():
            try:
                if isinstance(value, str) and forget_upload(value, uploads):
                    log.info("run %s: deleted its upload %s", run.id, value)
            except OSError as exc:
                log.warning("run %s: could not delete its upload %s: %s", run.id, value, exc)

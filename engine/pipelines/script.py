"""A ScriptStep: an existing scraper script run unchanged as a pipeline step.

The script runs as a subprocess in its own process group with the run's identity in its
environment:

- ``FETCHFLEET_RUN_ID``, ``FETCHFLEET_COUNTRY``, ``FETCHFLEET_PIPELINE``, ``FETCHFLEET_STEP``;
- ``FETCHFLEET_DB``: the database — the DuckDB file's absolute path, or a ``postgresql://``
  URL (with its password: only here, never in logs or the run's parameters). Both forms are
  what ``psycopg.connect`` / ``duckdb.connect`` and ``engine.run --db`` take. With DuckDB the
  pipeline process holds the file (one process per file), so a script cannot open it while
  the pipeline runs: scripts that write to the database need PostgreSQL;
- ``PYTHONUNBUFFERED=1`` (unless given), so a Python script's lines arrive as it prints them.

Its stdout and stderr are read line by line by two threads into one bounded queue (a script
that prints faster than the database takes lines is slowed by its pipe, memory stays
bounded; lines over 8 KiB are split) and written to ``run_logs`` in batches with their
stream. A stop request sends SIGTERM to the process group, SIGKILL after the step's grace
period.

Nothing the script starts outlives it. Every process below it carries the run's lineage tag
(``fetchers.lifeline``), whatever its process group or session: when the script exits, on
its own or after a stop, whatever it left running is killed (its group, and every tagged
process). On Linux the script gets SIGTERM if the pipeline process dies (``kill -9``); its
children cannot be reached then, so before a script of the run starts, the processes an
earlier start left behind are ended first (SIGTERM, SIGKILL after the grace period): a
resumed run never has a script running beside a leftover of itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import signal
import subprocess
import threading
import time
from typing import IO, TYPE_CHECKING

from fetchers.lifeline import die_with_parent, end_lineage, lineage_env
from storage.db import duckdb_path

if TYPE_CHECKING:
    from engine.pipelines.runner import ScriptStep, _Runner

MAX_LINE = 8192
QUEUE_LINES = 1000
DRAIN_AFTER_EXIT_S = 2.0


def script_db(url: str) -> str:
    """The database as a script should see it: a DuckDB path, or a libpq-style URL."""
    path = duckdb_path(url)
    if path is not None:
        return str(path.resolve())
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgresql") else url


def script_lineage(runner: _Runner) -> str:
    """The lineage tag of a run's scripts: the same in every process that runs the run on
    this database (a resume finds what a killed pipeline process left), and no other."""
    digest = hashlib.sha256(script_db(runner.db.url).encode()).hexdigest()[:16]
    return f"pipeline-{digest}-{runner.run_id}"


def script_env(runner: _Runner, step: ScriptStep, name: str) -> dict[str, str]:
    env = lineage_env(os.environ, script_lineage(runner))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env |= {
        "FETCHFLEET_RUN_ID": str(runner.run_id),
        "FETCHFLEET_COUNTRY": runner.country,
        "FETCHFLEET_PIPELINE": runner.pipeline.name,
        "FETCHFLEET_STEP": name,
        "FETCHFLEET_DB": script_db(runner.db.url),
    }
    env |= step.env or {}
    return env


def _reader(pipe: IO[bytes], stream: str, lines: queue.Queue[tuple[str, str] | None]) -> None:
    try:
        while chunk := pipe.readline(MAX_LINE):
            lines.put((stream, chunk.rstrip(b"\r\n").decode("utf-8", errors="replace")))
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


def run_script(runner: _Runner, step: ScriptStep, name: str) -> tuple[str, int | None, str | None]:
    """Run the script to its end or until a stop; returns (status, exit code, error).

    Exit 0 → done; nonzero → failed; ended after our stop signal → stopped (whatever its
    code: the step did not finish on its own, so a resume runs it again from the start)."""
    argv = [str(a) for a in step.argv]
    lineage = script_lineage(runner)
    if n := end_lineage([lineage], grace_s=step.grace_s):
        runner.engine_line(name, f"ended {n} process(es) left by an earlier start of a script")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=step.cwd,
            env=script_env(runner, step, name),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: signals reach its children too
            preexec_fn=die_with_parent(signal.SIGTERM),  # a chance to save, as on a stop
        )
    except OSError as exc:
        return "failed", None, f"cannot start {argv[0]!r}: {exc}"
    runner.engine_line(name, f"script started: pid {proc.pid}")
    lines: queue.Queue[tuple[str, str] | None] = queue.Queue(QUEUE_LINES)
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_reader, args=(pipe, stream, lines), daemon=True)
        for pipe, stream in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
    ]
    for t in readers:
        t.start()
    open_streams = len(readers)
    signalled_at: float | None = None
    killed = False
    exited_at: float | None = None
    last_stderr = ""
    try:
        while open_streams or exited_at is None:  # a script may close its output and go on
            try:
                item = lines.get(timeout=0.1)
            except queue.Empty:
                item = ()
            if item is None:
                open_streams -= 1
            elif item:
                stream, line = item
                runner.log.write(name, stream, line)
                if stream == "stderr" and line.strip():
                    last_stderr = line.strip()
            runner.log.maybe_flush()
            now = time.monotonic()
            if signalled_at is None and runner.control.stop_requested():
                signalled_at = now
                runner.engine_line(name, "stop requested: SIGTERM to the script")
                _signal(proc, signal.SIGTERM)
            elif signalled_at is not None and not killed and now - signalled_at > step.grace_s:
                killed = True
                runner.engine_line(name, f"no exit {step.grace_s:g}s after SIGTERM: SIGKILL")
                _signal(proc, signal.SIGKILL)
            if exited_at is None and _exited(proc):
                exited_at = now
                if n := _end_leftovers(proc, lineage):
                    runner.engine_line(name, f"killed {n} process(es) the script left running")
            elif exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT_S and open_streams:
                # a process outside its group and lineage holds the pipes: stop reading
                runner.engine_line(name, "a process the script left holds its output: ignored")
                break
        code = proc.wait()
    except BaseException:
        _end_leftovers(proc, lineage)  # the script too: it carries the lineage
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
    if signalled_at is not None:
        return "stopped", code, None
    if code == 0:
        return "done", code, None
    why = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
    return "failed", code, why + (f"; last stderr: {last_stderr[:500]}" if last_stderr else "")


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Has the script exited? Without reaping it: while it is a zombie its process group id
    cannot be reused, so killing the group afterwards hits only what it left."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped elsewhere
        return proc.poll() is not None


def _end_leftovers(proc: subprocess.Popen[bytes], lineage: str) -> int:
    """SIGKILL what the exited script left: every process of its lineage (however far it
    went: another session, a reparented daemon), then its group (one that cleared its
    environment); returns how many were found by lineage."""
    n = end_lineage([lineage])
    _signal(proc, signal.SIGKILL)
    return n

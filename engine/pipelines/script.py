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
period. On Linux the script also gets SIGTERM if the pipeline process dies (``kill -9``), so
a resumed run never has two copies of it running.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

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


def script_env(runner: _Runner, step: ScriptStep, name: str) -> dict[str, str]:
    env = dict(os.environ)
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


def _die_with_parent() -> Any:
    """A preexec function asking Linux to SIGTERM the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(143)

    return preexec


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
    try:
        proc = subprocess.Popen(
            argv,
            cwd=step.cwd,
            env=script_env(runner, step, name),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: signals reach its children too
            preexec_fn=_die_with_parent(),
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
        while open_streams:
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
            if proc.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > DRAIN_AFTER_EXIT_S and open_streams:
                    # something it started still holds the pipes: end the whole group
                    runner.engine_line(name, "killing processes the script left behind")
                    _signal(proc, signal.SIGKILL)
                    break
        code = proc.wait()
    except BaseException:
        _signal(proc, signal.SIGKILL)
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

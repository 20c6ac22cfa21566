"""Interpreter settings for the engine's long-running processes (coordinator and workers).

Why the garbage collector is tuned: a worker allocates tens of thousands of short-lived
objects a second (parsed nodes, rows, tuples handed over) and the coordinator holds
SQLAlchemy, DuckDB and every buffered result, so CPython's default thresholds (a young
collection every 700 allocations, a full one about every 70,000) spent 10–20% of their CPU
walking objects that were alive anyway. Reference counting still frees everything without
cycles at once; only cyclic garbage waits longer.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import NoReturn

#: (young, middle, old) collection thresholds for engine processes.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect less often; idempotent."""
    gc.set_threshold(*GC_THRESHOLDS)


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown.

    Why: freeing every module and object of a process that holds SQLAlchemy, DuckDB and the
    fetchers costs 0.05-0.1 s, which the user (or the coordinator) waits for on every run.
    Only call it once every database handle is disposed: exit hooks (atexit, logging, the
    multiprocessing queues' feeder threads) still run and stdio is flushed; finalizers of
    objects still alive do not run.
    """
    import atexit
    import logging
    import os
    import sys

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_with_parent(poll_s: float = 0.2) -> None:
    """End this process at once when the process that spawned it dies (kill -9): a pool
    worker of a DuckDB coordinator can store nothing once its coordinator is gone. What it
    started (browsers, drivers) goes first: nobody is left to end them afterwards."""
    import os
    import threading
    import time

    from fetchers.lifeline import end_own_lineage

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        end_own_lineage()
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def on_parent_death(callback: Callable[[], None], poll_s: float = 0.2) -> None:
    """Call ``callback`` (in a watcher thread) once the process that spawned this one died.

    A pool worker that connects to the database itself (PostgreSQL) could go on storing,
    but nobody supervises it any more (no replacement, no stop, no resize): it finishes
    what is in flight, hands its tasks back and ends (``Worker.request_exit``)."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        callback()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

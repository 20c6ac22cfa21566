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

#: (young, middle, old) collection thresholds for engine processes.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect less often; idempotent."""
    gc.set_threshold(*GC_THRESHOLDS)

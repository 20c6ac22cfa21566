"""Task queue backends, by name, and how a deployment chooses them.

| name     | class                         | who uses it                                        |
|----------|-------------------------------|----------------------------------------------------|
| ``sql``  | ``engine.queue.sql.SqlQueue`` | every process on PostgreSQL; the coordinator on DuckDB |
| ``pipe`` | ``engine.queue.pipe.PipeQueue`` (served by ``PipeServer``) | pool workers of a DuckDB coordinator |
| ``memory`` | ``engine.queue.memory.MemoryQueue`` | tests                                        |

The choice follows from the database, in one place (``pool_link``): DuckDB allows one
read-write process, so the coordinator holds it (``sql``) and serves its pool over pipes
(``pipe``); PostgreSQL is shared, so every process uses ``sql``. A pool worker learns its
backend and its rate limiter from the ``WorkerBoot`` it is spawned with: the pool and the
worker loop never branch on the deployment. The contract is ``engine.queue.base``.

Submodules load on demand: pool workers import only ``pipe`` and never SQLAlchemy.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.queue.base import QueueBackend
    from engine.queue.boot import BootFactory
    from engine.queue.pipe import PipeServer
    from engine.queue.sql import SqlQueue
    from storage.db import Database

BACKENDS: dict[str, str] = {
    "sql": "engine.queue.sql:SqlQueue",
    "pipe": "engine.queue.pipe:PipeQueue",
    "memory": "engine.queue.memory:MemoryQueue",
}


def backend_class(name: str) -> type[QueueBackend]:
    """The backend class registered as ``name`` (``sql``, ``pipe``, ``memory``)."""
    try:
        module, _, attr = BACKENDS[name].partition(":")
    except KeyError:
        raise ValueError(f"no queue backend {name!r}; known: {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), attr)


def pool_backend(db: Database) -> str:
    """The backend name of a coordinator's pool workers on ``db``."""
    return "pipe" if db.is_duckdb else "sql"


@dataclass(frozen=True, slots=True)
class PoolLink:
    """How a coordinator's pool reaches the queue: the factory of its workers' boots, and
    the server the coordinator must run for them (None when they connect themselves)."""

    backend: str
    boot: BootFactory
    server: PipeServer | None = None


def pool_link(
    db: Database,
    sql: SqlQueue,
    ctx: Any,
    *,
    closing: Callable[[], bool],
    on_completed: Callable[[], None],
) -> PoolLink:
    """The link for a coordinator on ``db`` whose own backend is ``sql``.

    DuckDB: a ``PipeServer`` over ``sql`` and ``PipeBoot`` workers that share rate limits
    through a file beside the database (per coordinator for an in-memory one). PostgreSQL:
    ``SqlBoot`` workers, each connecting on its own and limiting through the database."""
    if pool_backend(db) == "pipe":
        from engine.queue.pipe import PipeServer
        from engine.ratelimit.shared import shared_path_for

        server = PipeServer(
            sql,
            ctx,
            limits_path=str(shared_path_for(db.url, coordinator_pid=os.getpid())),
            flush_s=sql.settings.flush_s,
            closing=closing,
            on_completed=on_completed,
        )
        return PoolLink("pipe", server.boot, server)
    from engine.queue.sql import SqlBoot

    return PoolLink("sql", SqlBoot.factory(db.url, sql.version))

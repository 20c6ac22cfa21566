"""The fleet-wide limiter on PostgreSQL: one ``rate_limits`` row per key, one statement per grant.

    UPDATE rate_limits
       SET tat = greatest(tat, <db clock>) + T
     WHERE key = :key
    RETURNING tat, <db clock>

The row lock serialises every process of every machine on the key, and both times come from
the database, so machines with skewed clocks agree. The clock is ``clock_timestamp()``, not
``now()``: ``now()`` is the start of the transaction, taken *before* the statement waited
for the row lock; a stale "now" would let a grant start its interval in the past and the
next one come less than T later. ``clock_timestamp()`` in the SET list is read after the
lock is held (PostgreSQL re-evaluates the target list on the locked row).

From the new TAT the grant follows: TAT_new - T = max(TAT_old, now), so the wait
``max(TAT_old - tau - now, 0)`` is ``max(TAT_new - T - tau - now, 0)`` (the RETURNING clock
is read microseconds after the SET one, which only shortens the wait by those microseconds,
far inside the jitter allowance of ``engine.ratelimit.base``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa

from engine.ratelimit.base import Rate

CLOCK = "extract(epoch FROM clock_timestamp())::float8"

_ACQUIRE = sa.text(
    f"""UPDATE rate_limits
        SET tat = greatest(tat, {CLOCK}) + :interval,
            updated_at = (clock_timestamp() AT TIME ZONE 'UTC')
        WHERE key = :key
        RETURNING tat, {CLOCK}"""
)
_PENALIZE = sa.text(
    f"""UPDATE rate_limits
        SET tat = greatest(tat, {CLOCK} + :seconds + :tau),
            updated_at = (clock_timestamp() AT TIME ZONE 'UTC')
        WHERE key = :key
        RETURNING tat"""
)
_CREATE = sa.text(
    "INSERT INTO rate_limits (key, tat, updated_at) VALUES (:key, 0, "
    "(clock_timestamp() AT TIME ZONE 'UTC')) ON CONFLICT (key) DO NOTHING"
)


class PgLimiter:
    """GCRA in a PostgreSQL row; ``db`` is a ``storage.db.Database`` on PostgreSQL."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def _update(self, stmt: sa.TextClause, params: dict[str, Any]) -> Any:
        """Run ``stmt`` on the key's row, creating the row the first time (any process)."""
        with self.db.engine.begin() as conn:
            row = conn.execute(stmt, params).fetchone()
            if row is None:
                # No row yet. ON CONFLICT waits for a concurrent creator to commit; the retried
                # UPDATE (a new statement under READ COMMITTED) then sees its row.
                conn.execute(_CREATE, {"key": params["key"]})
                row = conn.execute(stmt, params).fetchone()
        return row

    def acquire_now(self, key: str, rate: Rate) -> float:
        tat, now = self._update(_ACQUIRE, {"key": key, "interval": rate.interval_s})
        return max(0.0, tat - rate.interval_s - rate.tau_s - now)

    async def acquire(self, key: str, rate: Rate) -> float:
        return await asyncio.to_thread(self.acquire_now, key, rate)

    def penalize_now(self, key: str, rate: Rate, seconds: float) -> None:
        self._update(_PENALIZE, {"key": key, "seconds": float(seconds), "tau": rate.tau_s})

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        await asyncio.to_thread(self.penalize_now, key, rate, seconds)

    async def aclose(self) -> None:
        return None

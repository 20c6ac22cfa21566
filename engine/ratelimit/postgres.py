"""The fleet-wide limiter on PostgreSQL: GCRA in one ``rate_limits`` row per key, one statement
per grant (the statements, and why they read the database clock, are in ``storage.ratelimit``).

From the new TAT the grant follows: TAT_new - T = max(TAT_old, now), so the wait
``max(TAT_old - tau - now, 0)`` is ``max(TAT_new - T - tau - now, 0)`` (the RETURNING clock
is read microseconds after the SET one, which only shortens the wait by those microseconds,
far inside the jitter allowance of ``engine.ratelimit.base``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from engine.ratelimit.base import Rate, bounded_penalty
from storage.ratelimit import push_back, reserve

if TYPE_CHECKING:
    from storage.db import Database


class PgLimiter:
    """GCRA in a PostgreSQL row; ``db`` is a ``storage.db.Database`` on PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def acquire_now(self, key: str, rate: Rate) -> float:
        with self.db.engine.begin() as conn:
            tat, now = reserve(conn, key, rate.interval_s)
        return max(0.0, tat - rate.interval_s - rate.tau_s - now)

    async def acquire(self, key: str, rate: Rate) -> float:
        return await asyncio.to_thread(self.acquire_now, key, rate)

    def penalize_now(self, key: str, rate: Rate, seconds: float) -> None:
        with self.db.engine.begin() as conn:
            push_back(conn, key, bounded_penalty(seconds, rate), rate.tau_s)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        await asyncio.to_thread(self.penalize_now, key, rate, seconds)

    async def aclose(self) -> None:
        return None

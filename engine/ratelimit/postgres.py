"""The fleet-wide limiter on PostgreSQL: GCRA in one ``rate_limits`` row per key, one statement
per grant (the statements, and why they read the database clock, are in ``storage.ratelimit``).

The statement also moves the key's margin (``engine.ratelimit.margin``) and returns it, so the
interval T of this grant is known here: TAT_new - T = max(TAT_old, now), so the wait
``max(TAT_old - tau - now, 0)`` is ``max(TAT_new - T - tau - now, 0)`` (the RETURNING clock
is read microseconds after the SET one, which only shortens the wait by those microseconds,
far inside the margin).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.ratelimit.base import Rate, Slot, bounded_penalty
from engine.ratelimit.margin import HALF_LIFE_S
from storage.errors import is_transient, outage_delay
from storage.ratelimit import push_back, reserve

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from storage.db import Database


class PgLimiter:
    """GCRA in a PostgreSQL row; ``db`` is a ``storage.db.Database`` on PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def reserve_now(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        if not math.isfinite(ask) or ask < 0:
            ask = 0.0
        if rate.jitter_s is not None:
            ask = max(ask, rate.jitter_s)
        with self.db.engine.begin() as conn:
            tat, now, stored = reserve(
                conn,
                key,
                window_s=rate.window_s,
                slots=rate.limit - rate.burst + 1,
                ask=ask,
                floor=rate.margin_floor,
                cap=rate.margin_cap,
                half_life_s=HALF_LIFE_S,
                fixed=rate.jitter_s,
            )
        used = rate.margin(stored)
        wait = tat - rate.interval_for(used) - rate.tau_for(used) - now
        return Slot(max(0.0, wait), used)

    def acquire_now(self, key: str, rate: Rate, ask: float = 0.0) -> float:
        """Seconds to wait for the next slot (``reserve_now``'s wait)."""
        return self.reserve_now(key, rate, ask).wait

    async def reserve(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        return await self._retrying(self.reserve_now, key, rate, ask)

    def penalize_now(self, key: str, rate: Rate, seconds: float) -> None:
        with self.db.engine.begin() as conn:
            push_back(conn, key, bounded_penalty(seconds, rate), rate.penalty_tau_s)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        await self._retrying(self.penalize_now, key, rate, seconds)

    async def _retrying(self, fn: Callable[..., Any], key: str, *args: Any) -> Any:
        """No slot without the database: while it is unreachable (restarting) the request
        waits, with backoff and a log line, instead of failing its item — the item did
        nothing wrong, and sending without a slot could break the limit."""
        failures = 0
        while True:
            try:
                return await asyncio.to_thread(fn, key, *args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                delay = outage_delay(failures)
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "rate limit %s: cannot reach the database (%s); try %d in %.1f s",
                        key, type(exc).__name__, failures + 1, delay,
                    )  # fmt: skip
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        return None
